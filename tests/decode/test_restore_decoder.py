"""Reading a decoder's parameters from a trainer's checkpoints, and the errors on misuse."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from cm3leon_jax import fs
from cm3leon_jax.decode import restore
from cm3leon_jax.decode.restore import restore_decoder
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.train import checkpoints, vocab_record
from tests.model.model_testlib import tiny_config, write_train_checkpoints

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MODEL_DIR with checkpoints at steps 1 and 2, written by the trainer's Checkpointer."""
    model_dir = tmp_path_factory.mktemp("train_run")
    return str(model_dir), write_train_checkpoints(str(model_dir / "checkpoints"), CONFIG, (1, 2))


def test_restores_the_newest_or_the_asked_step_params_only(trained):
    model_dir, states = trained
    for step, want_step in ((None, 2), (1, 1)):
        config, params, got_step = restore_decoder(model_dir, step, CONFIG)
        assert got_step == want_step and config == CONFIG
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(states[want_step].params)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The checkpoints/ folder itself works too.
    assert restore_decoder(os.path.join(model_dir, "checkpoints"), None, CONFIG)[2] == 2


def test_a_config_that_does_not_fit_is_named(trained):
    model_dir, _ = trained
    with pytest.raises(UserInputError, match=r"token_embed.*checkpoint \(512, 64\), "
                                             r"DecoderConfig \(896, 64\)"):
        restore_decoder(model_dir, None, CONFIG.replace(vocab_size=896))
    with pytest.raises(UserInputError, match="no checkpoint at step 7"):
        restore_decoder(model_dir, 7, CONFIG)


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="MODEL_DIR of a train run"):
        restore_decoder(str(tmp_path / "nothing"), None, CONFIG)


def _copy(trained, tmp_path):
    model_dir, states = trained
    shutil.copytree(model_dir, tmp_path / "run")
    return tmp_path / "run", states


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _assert_params(params, state):
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path, caplog,
                                                                 damage):
    run, states = _copy(trained, tmp_path)
    victim = _largest_file(run / "checkpoints" / "2" / "state")
    with open(victim, "r+b") as f:
        if damage == "truncated":
            f.truncate(os.path.getsize(victim) // 2)
        else:
            f.seek(os.path.getsize(victim) // 3)
            chunk = f.read(64)
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in chunk))
    with caplog.at_level(logging.WARNING):
        _, params, step = restore_decoder(str(run), None, CONFIG)
    assert step == 1
    _assert_params(params, states[1])
    assert any("step 2" in r.getMessage() and "using step 1" in r.getMessage()
               for r in caplog.records)
    assert (run / "checkpoints" / "2").is_dir()  # Generation only reads: nothing is moved.
    with pytest.raises(UserInputError, match=r"step 2 .* is unreadable .*another of \[1, 2\]"):
        restore_decoder(str(run), 2, CONFIG)  # Asked for by step: no silent substitute.


def test_a_checkpoint_without_checksums_loads_with_a_warning(trained, tmp_path, caplog):
    run, states = _copy(trained, tmp_path)
    os.remove(run / "checkpoints" / "2" / checkpoints.CHECKSUMS)
    with caplog.at_level(logging.WARNING):
        _, params, step = restore_decoder(str(run), None, CONFIG)
    assert step == 2
    _assert_params(params, states[2])
    assert any("has no checksums.json" in r.getMessage() for r in caplog.records)


def test_the_vocabulary_to_generate_with_is_checked_before_the_read(trained, tmp_path, vocab,
                                                                    monkeypatch):
    """`restore_decoder(..., vocab=)`: the Python API's check that generate, eval and export
    make (a same-size vocabulary of another text model reads every word as other tokens)."""
    model_dir = str(_copy(trained, tmp_path)[0])
    vocab_record.write(model_dir, vocab)
    assert restore_decoder(model_dir, None, CONFIG, vocab=vocab)[2] == 2
    other = {**vocab_record.of(vocab), "fingerprint": "0123456789abcdef",
             "directory": "/data/other/vocab"}
    with open(os.path.join(model_dir, vocab_record.FILE), "w") as f:
        json.dump(other, f)
    monkeypatch.setattr(restore, "_read_params", None)  # Refused before a checkpoint is read.
    with pytest.raises(UserInputError, match=r"^vocabulary '.*' does not fit the model of "
                       r"model_dir '.*': its model was trained on the vocabulary in "
                       r"'/data/other/vocab' \(fingerprint 0123456789abcdef\)"):
        restore_decoder(model_dir, None, CONFIG, vocab=vocab)
    with pytest.raises(UserInputError, match=r"DecoderConfig.vocab_size=64\. Give the voc"):
        restore_decoder(model_dir, None, CONFIG.replace(vocab_size=64), vocab=vocab)


def test_a_data_folder_other_than_the_models_is_named(tmp_path):
    """Two preprocessings of the same captions share a vocabulary, not their bank, held-out
    split or document layout: the trainer records its data folder's plan, and a run given a
    data_dir (generate's, eval's) is refused another one; a copy of the folder is the same."""
    class Vocab:  # What the record reads of a vocabulary.
        fingerprint = "f" * 16
        directory = str(tmp_path / "data" / "vocab")
        layout = type("Layout", (), {"vocab_size": 64})()

    for name, first in (("data", 0.0), ("copy", 0.0), ("other", 0.5)):
        (tmp_path / name / "retrieval").mkdir(parents=True)
        (tmp_path / name / "plan.json").write_text(json.dumps(
            {"source": "pairs", "preprocess.image_first_prob": first}))
    (tmp_path / "bare" / "vocab").mkdir(parents=True)  # vocab/ and retrieval/ copied alone
    model_dir = str(tmp_path / "model")
    vocab_record.write(model_dir, Vocab)
    assert vocab_record.read(model_dir)["data"]["directory"] == str(tmp_path / "data")
    for accepted in ("data", "copy"):
        restore.check_data_dir(model_dir, str(tmp_path / accepted), "evaluate")
    restore.check_data_dir(model_dir, None, "evaluate")  # No data_dir bound: nothing to check.
    with pytest.raises(UserInputError, match=r"^evaluate.data_dir '.*other' is not the data of "
                       r"evaluate.checkpoint '.*model': its model was trained on the data folder "
                       r"'.*data' \(plan \w{16}\), and this one was made otherwise .* bind "
                       r"evaluate.vocab_dir and evaluate.retrieval_dir instead"):
        restore.check_data_dir(model_dir, str(tmp_path / "other"), "evaluate")
    with pytest.raises(UserInputError, match=r"and this one holds no plan.json to compare"):
        restore.check_data_dir(model_dir, str(tmp_path / "bare"), "evaluate")
    os.remove(os.path.join(model_dir, vocab_record.FILE))  # A run saved before the record.
    restore.check_data_dir(model_dir, str(tmp_path / "other"), "evaluate")


def test_a_fine_tuned_models_record_names_no_data_folder(tmp_path):
    """SFT reads a copy of its base's vocabulary in its own data folder (plan.json, no
    bank): it generates and is evaluated with the base's data, which it must not refuse."""
    class Vocab:
        fingerprint = "f" * 16
        directory = str(tmp_path / "sft_data" / "vocab")
        layout = type("Layout", (), {"vocab_size": 64})()

    (tmp_path / "sft_data" / "vocab").mkdir(parents=True)
    (tmp_path / "sft_data" / "plan.json").write_text(json.dumps({"families": ["vqa"]}))
    (tmp_path / "data" / "retrieval").mkdir(parents=True)
    (tmp_path / "data" / "plan.json").write_text(json.dumps({"source": "pairs"}))
    vocab_record.write(str(tmp_path / "sft"), Vocab)
    assert "data" not in vocab_record.read(str(tmp_path / "sft"))
    restore.check_data_dir(str(tmp_path / "sft"), str(tmp_path / "data"), "generate")


def test_a_data_folders_own_vocab_and_bank_are_taken_however_a_bucket_path_is_written():
    """`data_dir` with vocab_dir / retrieval_dir bound to its own folders (a trailing slash
    on a bucket path is the same folder) is taken; another folder is named."""
    data = "ram://restore_test/my_data"
    fs.makedirs(f"{data}/vocab")
    fs.write_text(f"{data}/vocab/layout.json", "{}")
    assert restore.data_folders("ram://no_run", data, f"{data}/vocab/", f"{data}/retrieval/",
                                "evaluate", "eval") == (f"{data}/vocab/", f"{data}/retrieval/")
    assert restore.data_folders("ram://no_run", f"{data}/", None, None, "generate",
                                "generate") == (f"{data}/vocab", f"{data}/retrieval")
    with pytest.raises(UserInputError, match="evaluate.data_dir=.* and evaluate.vocab_dir="
                       "'ram://restore_test/vocab' name different folders"):
        restore.data_folders("ram://no_run", data, "ram://restore_test/vocab", None,
                             "evaluate", "eval")
