"""The `sft` run mode: base parameters in, fresh optimizer, exact resume, refused bases.

Runs go through gin_configs/runs/sft.gin (the sizes: the base run's config.gin) on the
trainer tests' tiny corpus and a tiny SFT folder made from its vocabulary, shrunk by gin
bindings to seconds.
"""

import json
import os
import shutil

import gin
import numpy as np
import pytest
import train_testlib as lib

from cm3leon_jax.data import sft_examples, sft_prompts, shards
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

SFT_GIN = os.path.join(lib.REPO, "gin_configs", "runs", "sft.gin")


def build_sft_data(root: str, vocab_dir: str) -> None:
    """Every family's examples on 12 corpus scenes per split, images as random codes
    (each under 140 tokens: the runs train on 256-token rows)."""
    shutil.copytree(vocab_dir, os.path.join(root, "vocab"))
    vocab = MultimodalVocabulary(os.path.join(root, "vocab"))
    rng = np.random.default_rng(0)

    def codes(_):
        return rng.integers(0, vocab.layout.image_codes, vocab.layout.image_length)

    for family in sft_prompts.FAMILIES:
        for split in ("train", "validation", "test"):
            docs = []
            for i in range(12):
                ex = sft_examples.corpus_example(0, split, i, 32, family)
                prompt = ex.prompt.map_images(codes)
                output = codes(None) if prompt.output == "image" else ex.output
                ids = sft_prompts.example_ids(prompt, output, vocab)
                docs.append(shards.TokenizedDocument(f"{family}-{split}-{i}", ids))
            shards.write_split(docs, os.path.join(root, family), split, num_shards=1)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A 4-step pretraining run, and SFT data in its vocabulary."""
    path, vocab_size = corpus
    root = tmp_path_factory.mktemp("sft_base")
    base_dir = str(root / "pretrain")
    lib.run_in_process(lib.bindings(base_dir, path, vocab_size, **{
        "train.num_steps": 4, "DecoderConfig.max_length": 256}))
    build_sft_data(str(root / "sft_data"), os.path.join(path, "vocab"))
    return base_dir, str(root / "sft_data"), os.path.join(path, "vocab"), vocab_size


def sft_bindings(model_dir, base, **overrides):
    base_dir, sft_data, vocab_dir, vocab_size = base
    values = {k: v for k, v in (b.split("=", 1) for b in
                                lib.bindings(model_dir, "unused", vocab_size))}
    del values["data_dirs.synthetic"]
    values.update({"BASE_MODEL_DIR": repr(base_dir), "SFT_DATA": repr(sft_data),
                   "sft.base_vocab_dir": repr(vocab_dir), "train.seq_len": 256,
                   "DecoderConfig.max_length": 256,
                   "learning_rate_schedule.peak_lr": 1e-2})
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def run_sft(binding_list):
    from cm3leon_jax import main as main_lib
    gin.clear_config()
    try:
        main_lib.configure([SFT_GIN], binding_list)
        return main_lib.run()
    finally:
        gin.clear_config()


def _params(model_dir, vocab_size):
    from cm3leon_jax.decode import restore
    config = lib.tiny_config(vocab_size=vocab_size, max_length=256)
    return restore.restore_decoder(model_dir, config=config)[1]


def test_sft_starts_from_the_base_params_and_leaves_the_base_untouched(base, tmp_path,
                                                                       monkeypatch):
    """SFT starts from the base's parameters, restored over the run's mesh (on a pod no one
    host's devices hold the base, and an array on them cannot be put onto the run's
    shardings: tests/train/test_multihost.py), and leaves the base untouched."""
    from cm3leon_jax.decode import restore
    meshes, restore_decoder = [], restore.restore_decoder

    def recording(model_dir, step=None, config=None, mesh=None):
        meshes.append(mesh)
        return restore_decoder(model_dir, step, config, mesh)

    monkeypatch.setattr(restore, "restore_decoder", recording)
    before = lib.tree_digests(base[0])
    out = str(tmp_path / "sft")
    result = run_sft(sft_bindings(out, base, **{"train.num_steps": 1,
                                                "learning_rate_schedule.peak_lr": 1e-12}))
    assert result["step"] == 1 and result["base"] == {"model_dir": base[0], "step": 4}
    with open(os.path.join(out, "sft_base.json")) as f:  # The base it read, for a resume.
        assert json.load(f) == result["base"]
    assert len(meshes) == 1 and meshes[0] is not None and meshes[0].size == 8
    monkeypatch.undo()
    assert lib.tree_digests(base[0]) == before
    import jax
    got, want = _params(out, base[3]), _params(base[0], base[3])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    metrics = lib.read_metrics(out)
    assert metrics[1]["learning_rate"] < 1e-12  # A fresh schedule: warm-up from step 0.


@pytest.mark.slow
def test_a_resume_reads_no_base_and_refuses_another(base, tmp_path):
    """The SFT run records the base it read; a rerun resumes without reading it (it may be
    gone) and refuses a different base, or a step given as text."""
    copy = str(tmp_path / "base_copy")
    shutil.copytree(base[0], copy)
    out = str(tmp_path / "sft")
    run_sft(sft_bindings(out, (copy, *base[1:]), **{"train.num_steps": 1,
                                                     "Checkpointer.save_every": 1}))
    with pytest.raises(ModelDirMismatchError, match=r"started from .*base_copy.* at step 4"):
        run_sft(sft_bindings(out, base, **{"train.num_steps": 2}))
    with pytest.raises(ModelDirMismatchError, match="at step 4"):
        run_sft(sft_bindings(out, (copy, *base[1:]), **{"train.num_steps": 2,
                                                         "sft.base_step": 2}))
    with pytest.raises(UserInputError, match=r"sft.base_step='4': give a step number"):
        run_sft(sft_bindings(str(tmp_path / "other"), base, **{"sft.base_step": "'4'"}))
    shutil.rmtree(copy)
    result = run_sft(sft_bindings(out, (copy, *base[1:]), **{"train.num_steps": 2}))
    assert result["step"] == 2 and result["base"] == {"model_dir": copy, "step": 4}


def test_a_missing_sft_data_folder_is_named(base, tmp_path):
    missing = str(tmp_path / "no_sft_data")
    with pytest.raises(UserInputError, match=r"SFT data folder .*no_sft_data.* does not exist"):
        run_sft(sft_bindings(str(tmp_path / "sft"), base, SFT_DATA=repr(missing)))


@pytest.mark.slow
def test_an_export_is_a_base(base, tmp_path):
    """An export (imported weights are one) is fine-tuned in the precision the run trains
    in, from its bfloat16 parameters, with the sizes of its manifest."""
    import jax

    from cm3leon_jax.export import params_export
    export = str(tmp_path / "export")
    params_export.export("unused", checkpoint=base[0], output_dir=export, dtype="bfloat16",
                         shard=False, config=lib.tiny_config(vocab_size=base[3], max_length=256),
                         vocab_dir=None, image_tokenizer_dir=None)
    out = str(tmp_path / "sft")
    result = run_sft(sft_bindings(out, (export, *base[1:]), **{
        "train.num_steps": 1, "learning_rate_schedule.peak_lr": 1e-12}))
    assert result["base"] == {"model_dir": export, "step": 4}
    got, want = _params(out, base[3]), _params(base[0], base[3])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-3)


@pytest.mark.slow  # Four trainer runs; the trainer's own resume tests run by default.
def test_sft_resumes_exactly(base, tmp_path):
    """4 steps straight = 2 steps, then the same command to 4 (from the SFT checkpoint,
    not the base again)."""
    ref = str(tmp_path / "reference")
    run_sft(sft_bindings(ref, base, **{"train.num_steps": 4, "Checkpointer.save_every": 2}))
    cut = str(tmp_path / "resumed")
    run_sft(sft_bindings(cut, base, **{"train.num_steps": 2, "Checkpointer.save_every": 2}))
    run_sft(sft_bindings(cut, base, **{"train.num_steps": 4, "Checkpointer.save_every": 2}))
    assert lib.losses(ref) == lib.losses(cut) and sorted(lib.losses(ref)) == [1, 2, 3, 4]


def test_without_base_vocab_dir_the_bases_own_record_is_the_vocabulary(base, tmp_path,
                                                                       monkeypatch):
    """sft.gin named the demo's vocabulary for every base: a user's base failed with a
    mismatch it had not made. Unbound, the base run's record is what the data must match."""
    from cm3leon_jax import sft as sft_lib

    def past_the_vocabulary_checks(*_):  # The next check: the base's record against the task.
        raise LookupError("reached")

    monkeypatch.setattr(sft_lib, "check_base_record", past_the_vocabulary_checks)
    with pytest.raises(LookupError, match="reached"):
        run_sft(sft_bindings(str(tmp_path / "a"), base, **{"sft.base_vocab_dir": "None"}))
    record = os.path.join(base[0], "vocabulary.json")
    os.rename(record, record + ".away")
    try:
        with pytest.raises(UserInputError, match=r"records no vocabulary .* give "
                                                 r"sft\.base_vocab_dir"):
            run_sft(sft_bindings(str(tmp_path / "b"), base, **{"sft.base_vocab_dir": "None"}))
    finally:
        os.rename(record + ".away", record)


def test_a_base_of_another_config_or_vocabulary_is_one_clear_error(base, tmp_path):
    checkpoints = os.path.join(base[0], "checkpoints")
    before = lib.tree_digests(checkpoints)
    with pytest.raises(ValueError, match="model config mismatch.*num_layers: trained 2, bound 3"):
        run_sft(sft_bindings(str(tmp_path / "a"), base, **{"DecoderConfig.num_layers": 3}))
    other = tmp_path / "other_vocab"
    shutil.copytree(base[2], other)
    with open(other / "text.model", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="vocabulary mismatch.*other_vocab"):
        run_sft(sft_bindings(str(tmp_path / "b"), base, **{"sft.base_vocab_dir": repr(str(other))}))
    # The base's own record (its trainer's vocabulary.json) names another vocabulary: a
    # base_vocab_dir that is the task's own folder would pass the file comparison.
    record = os.path.join(base[0], "vocabulary.json")
    with open(record) as f:
        kept = f.read()
    assert json.loads(kept)["fingerprint"] == MultimodalVocabulary(base[2]).fingerprint
    with open(record, "w") as f:
        f.write(json.dumps({**json.loads(kept), "fingerprint": "0123456789abcdef"}))
    try:
        with pytest.raises(UserInputError, match=r"the base run .*fingerprint 0123456789abcdef"):
            run_sft(sft_bindings(str(tmp_path / "d"), base))
    finally:
        with open(record, "w") as f:
            f.write(kept)
    # Refused before main.run writes MODEL_DIR/config.gin: the base's stays as it was.
    whole_base = lib.tree_digests(base[0])
    with pytest.raises(UserInputError, match="base run's folder"):
        run_sft(sft_bindings(base[0] + "/", base))
    link = tmp_path / "link_to_base"  # The same folder by another name, and one inside it.
    link.symlink_to(base[0])
    for model_dir in (str(link), os.path.join(base[0], "sft")):
        with pytest.raises(UserInputError, match="base run's folder"):
            run_sft(sft_bindings(model_dir, base))
    assert lib.tree_digests(base[0]) == whole_base
    # A base without config.gin: its checkpoint's shapes are still checked.
    config_gin = os.path.join(base[0], "config.gin")
    os.rename(config_gin, config_gin + ".away")
    try:
        with pytest.raises(ValueError, match="does not fit DecoderConfig"):
            run_sft(sft_bindings(str(tmp_path / "c"), base, **{"DecoderConfig.num_layers": 3}))
    finally:
        os.rename(config_gin + ".away", config_gin)
    assert lib.tree_digests(checkpoints) == before


def test_the_base_vocabulary_may_be_on_a_bucket(base, tmp_path):
    """On a pod sft.base_vocab_dir is a gs:// folder (here TensorFlow's ram://): compared
    byte for byte through fs (filecmp read only local files), a changed file refused."""
    from cm3leon_jax import fs, sft
    from cm3leon_jax import main as main_lib
    from cm3leon_jax.vocab.multimodal import vocabulary_files

    files = vocabulary_files(base[2])
    remote = f"ram://{tmp_path.name}/vocab"
    for name in files:
        with fs.open(fs.join(remote, name), "wb") as f:
            f.write(fs.read_bytes(os.path.join(base[2], name)))
    gin.clear_config()
    try:
        main_lib.configure([SFT_GIN], sft_bindings(str(tmp_path / "sft"), base))
        task = gin.query_parameter("train.task")
        sft.check_vocabulary(remote, task)
        with fs.open(fs.join(remote, files[-1]), "ab") as f:
            f.write(b" ")
        with pytest.raises(UserInputError, match="vocabulary mismatch"):
            sft.check_vocabulary(remote, task)
    finally:
        gin.clear_config()


def test_sft_data_without_the_eval_split_is_refused_before_training(tmp_path):
    """SFT data made from a train split only (FormatSource.splits={'train': [...]}) is
    refused before the base is read or a model is built, not at the first evaluation (the
    eval dataset is built there, after train.eval_every steps). A mixture needs one family
    with the split (the others are left out of it, as before), a single family its own."""
    from cm3leon_jax import main as main_lib
    from cm3leon_jax import sft

    data = tmp_path / "sft_data"

    def write(family, split):
        doc = shards.TokenizedDocument(f"{family}-{split}", np.arange(1, 9, dtype=np.int32))
        shards.write_split([doc], str(data / family), split, num_shards=1)

    for family in ("caption", "vqa"):
        write(family, "train")
    no_base = (str(tmp_path / "no_base"), str(data), str(tmp_path / "vocab"), 300)
    out = str(tmp_path / "sft")
    refused = (r"sft_data' has no 'validation' split for train.task='cm3leon_sft_mix', .*"
               r"FormatSource.splits=.*new folder, or bind train.eval_split='train'")
    with pytest.raises(UserInputError, match=refused):
        run_sft(sft_bindings(out, no_base))
    assert not os.path.exists(out)  # Refused before main.run writes config.gin.
    gin.clear_config()
    try:
        main_lib.configure([SFT_GIN], sft_bindings(out, no_base))
        with pytest.raises(UserInputError, match=refused):
            sft.sft(out)  # Called directly (sft_stage), before the base is read.
        sft.check_eval_data("cm3leon_sft_mix", "train")
        write("caption", "validation")
        sft.check_eval_data("cm3leon_sft_mix", "validation")
        with pytest.raises(UserInputError, match="no 'validation' split"):
            sft.check_eval_data("cm3leon_sft_vqa", "validation")
    finally:
        gin.clear_config()
    try:
        main_lib.configure([SFT_GIN], sft_bindings(out, no_base, **{
            "train.eval_split": "'train'"}))
        assert sft.eval_split() == "train"
    finally:
        gin.clear_config()


def test_a_missing_base_and_pretraining_data_as_sft_data_are_named(base, tmp_path):
    """A base folder that is not there is named as such (its missing config.gin and record
    read as the default sizes and an older run's), before anything is written; SFT_DATA
    naming a pretraining data folder is told it is not sft_preprocess's output (it was told
    it had no validation split, and then no train split)."""
    from cm3leon_jax.errors import MissingInputError
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(MissingInputError, match=f"no checkpoints in {nowhere!r}: give the "):
        run_sft(sft_bindings(str(tmp_path / "a"), base, BASE_MODEL_DIR=repr(nowhere),
                             **{"sft.base_vocab_dir": None}))
    assert not (tmp_path / "a").exists()
    pretraining = os.path.dirname(base[2])
    with pytest.raises(UserInputError, match="holds no family folder.*not what the "
                                             "sft_preprocess run mode writes"):
        run_sft(sft_bindings(str(tmp_path / "b"), base, SFT_DATA=repr(pretraining)))
