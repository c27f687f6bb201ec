"""What export and import refuse before they write anything: a vocabulary or image tokenizer
that is not the model's, an image tokenizer transformers' Chameleon cannot hold, a cut-short
or newer manifest (named, not taken for another layout), a folder that is no train run, and
an import whose MODEL_DIR is its source."""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import pytest

from cm3leon_jax import main
from cm3leon_jax.decode import restore
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.export import hf_export, hf_import, import_run, params_export
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.vocab import vqgan_checkpoint
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from tests.export.conftest import CONFIG, TEXTS, TINY_VQ, random_vq_params
from tests.model.model_testlib import random_params, tiny_chameleon


def _no_restore(*args, **kwargs):
    raise AssertionError("restored before refusing")


def _export(train_run, out, **kwargs):
    kwargs = {"dtype": None, "shard": False, **kwargs}
    return params_export.export("unused", checkpoint=train_run[0], output_dir=str(out), **kwargs)


def test_a_vocabulary_or_image_tokenizer_not_the_models_is_refused_before_restoring(
        train_run, vocab_dir, tmp_path, monkeypatch):
    """export.gin binds the demo's vocabulary and tokenizer: exporting another run bundled
    them beside it (an 8576-id vocabulary beside an 896-id model was accepted)."""
    big_vocab = str(tmp_path / "big_vocab")
    MultimodalVocabulary.create(big_vocab, TextTokenizer.train(TEXTS, vocab_size=280),
                                image_codes=1024, num_sentinels=4, image_length=16)
    wide_vq = dataclasses.replace(TINY_VQ, channel_multipliers=(1, 2))  # 8 x 8 codes, not 4 x 4
    vq_64_codes = str(tmp_path / "vq_64_codes")
    vqgan_checkpoint.save_params(vq_64_codes, 1, wide_vq, random_vq_params(wide_vq, seed=3))
    big_book = dataclasses.replace(TINY_VQ, codebook_size=64)
    vq_big_book = str(tmp_path / "vq_big_book")
    vqgan_checkpoint.save_params(vq_big_book, 1, big_book, random_vq_params(big_book, seed=4))
    monkeypatch.setattr(params_export.restore, "restore_decoder", _no_restore)
    out = tmp_path / "out"
    for config in (None, CONFIG):  # The run's config.gin, or the DecoderConfig given.
        with pytest.raises(UserInputError, match=r"^export.vocab_dir .*big_vocab.* does not fit "
                           r"the model of export.checkpoint .*: the vocabulary has \d+ ids but "
                           r"DecoderConfig.vocab_size=512"):
            _export(train_run, out, vocab_dir=big_vocab, config=config)
    with pytest.raises(UserInputError, match=r"^export.image_tokenizer_dir .*vq_64_codes.* gives "
                       r"64 codes per image from a codebook of 32; the vocabulary .* 16 codes "
                       r"per image from 32"):
        _export(train_run, out, vocab_dir=vocab_dir, image_tokenizer_dir=vq_64_codes)
    with pytest.raises(UserInputError, match=r"export.image_tokenizer_dir .* codebook of 64"):
        _export(train_run, out, vocab_dir=vocab_dir, image_tokenizer_dir=vq_big_book)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [
        "big_vocab", "vq_64_codes", "vq_big_book"]


def test_through_main_a_folder_that_does_not_fit_is_refused_before_config_gin_is_replaced(
        train_run, vocab_dir, tmp_path, monkeypatch, capsys):
    """The fit and folder checks run in `preflight`, before `main.run` writes
    MODEL_DIR/config.gin (it used to replace the earlier export's, then refuse)."""
    wide_vq = dataclasses.replace(TINY_VQ, channel_multipliers=(1, 2))  # 8 x 8 codes, not 4 x 4
    vq_64_codes = str(tmp_path / "vq_64_codes")
    vqgan_checkpoint.save_params(vq_64_codes, 1, wide_vq, random_vq_params(wide_vq, seed=3))
    monkeypatch.setattr(params_export.restore, "restore_decoder", _no_restore)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.gin").write_text("# the earlier export's\n")
    common = ["--gin_file=gin_configs/runs/export.gin", f"--gin.MODEL_DIR='{model_dir}'",
              f"--gin.export.checkpoint='{train_run[0]}'"]
    for bindings, message in (
            ([f"--gin.export.vocab_dir='{vocab_dir}'",
              f"--gin.export.image_tokenizer_dir='{vq_64_codes}'"],
             "gives 64 codes per image from a codebook of 32"),
            ([f"--gin.export.vocab_dir='{tmp_path}/nowhere'",
              "--gin.export.image_tokenizer_dir=None"], "is not a folder")):
        try:
            assert main.main(common + bindings) == 2
        finally:
            gin.clear_config()
        assert message in capsys.readouterr().err
        assert (model_dir / "config.gin").read_text() == "# the earlier export's\n"
        assert os.listdir(model_dir) == ["config.gin"]


def test_a_chameleon_export_without_its_vq_in_config_json_is_refused_unless_asked_for(
        train_run, vocab_dir, image_tokenizer_dir, tmp_path, monkeypatch, caplog):
    """transformers builds a random VQ model where config.json has no vq_config; the demo's
    tiny VQGAN (4 GroupNorm groups, not 32) cannot be described there."""
    config = tiny_chameleon()
    tokenizer = (TINY_VQ, random_vq_params(TINY_VQ, seed=1))
    out = tmp_path / "hf"
    with pytest.raises(UserInputError, match=r"num_groups=4 .*32.*export.image_tokenizer_dir="
                       r"None.*export.layout='params'.*export.hf_without_vq=True"):
        hf_export.write_hf(str(out), config, random_params(config, seed=3), vocab_dir=vocab_dir,
                           image_tokenizer=tokenizer)
    assert not out.exists()
    # The run mode refuses before the restore (with the tokenizer that fits the vocabulary).
    monkeypatch.setattr(params_export.restore, "restore_decoder", _no_restore)
    with pytest.raises(UserInputError, match=r"num_groups=4.*hf_without_vq=True"):
        _export(train_run, out, layout="hf", config=config, vocab_dir=vocab_dir,
                image_tokenizer_dir=image_tokenizer_dir)
    assert not out.exists()
    # Asked for: written without vq_config, and the omission recorded and said.
    with caplog.at_level("WARNING"):
        hf_export.write_hf(str(out), config, random_params(config, seed=3), vocab_dir=vocab_dir,
                           image_tokenizer=tokenizer, without_vq=True)
    assert "vq_config" not in json.loads((out / hf_export.CONFIG).read_text())
    omitted = json.loads((out / hf_export.OURS).read_text())["vq_config_omitted"]
    assert "num_groups=4" in omitted and "num_groups=4" in caplog.text
    assert (out / hf_export.VQGAN).exists()  # The whole tokenizer still comes back on import.
    assert hf_import.read_image_tokenizer(str(out))[0] == TINY_VQ
    weights = out / hf_export.VQGAN  # Cut short: one error naming it once (it was twice).
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserInputError) as cut:
        hf_import.read_image_tokenizer(str(out))
    assert str(cut.value).count(str(weights)) == 1 and "not a complete safetensors" in str(
        cut.value)


def _manifest_folder(root, text: str) -> str:
    os.makedirs(root)
    with open(os.path.join(root, pc.MANIFEST), "w") as f:
        f.write(text)
    return str(root)


def test_a_cut_short_or_newer_manifest_is_named_not_taken_for_another_layout(tmp_path):
    """A partial download was "a train run with no committed checkpoint yet; train first"
    to restore_decoder, and "in no layout this importer knows" to the import."""
    whole = json.dumps({"format": pc.FORMAT, "version": pc.VERSION, "decoder_config": {}})
    cut = _manifest_folder(tmp_path / "cut", whole[:30])
    newer = _manifest_folder(tmp_path / "newer", whole.replace(
        f'"version": {pc.VERSION}', f'"version": {pc.VERSION + 1}'))
    for read in (restore.restore_decoder, restore.saved_config, pc.read_manifest,
                 lambda p: import_run.import_weights(str(tmp_path / "run"), source=p)):
        with pytest.raises(UserInputError, match=r"cut/manifest.json: not valid JSON .*copy it"):
            read(cut)
        with pytest.raises(UserInputError, match=rf"newer/manifest.json: format '{pc.FORMAT}' "
                           rf"version {pc.VERSION + 1}; .*up to version {pc.VERSION}: upgrade"):
            read(newer)
    assert import_run.detect_layout(cut) == import_run.detect_layout(newer) == "params"
    # Another tool's manifest.json (preprocess writes one) is not an export.
    assert not pc.is_export(_manifest_folder(tmp_path / "data", '{"num_docs": 1}'))
    # A cut-short config.json is a transformers folder whose file is named.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / hf_export.CONFIG).write_text('{"model_type": "chameleon", "vocab_')
    assert import_run.detect_layout(str(hf)) == "hf"
    with pytest.raises(UserInputError, match=r"hf/config.json: not valid JSON"):
        import_run.import_weights(str(tmp_path / "run"), source=str(hf))
    (hf / hf_export.CONFIG).write_text('{"model_type": "llama"}')
    with pytest.raises(UserInputError, match="in no layout this importer knows"):
        import_run.detect_layout(str(hf))
    assert not (tmp_path / "run").exists()


def test_a_folder_without_checkpoints_says_which_folder_to_give(tmp_path):
    """A demo's MODEL_DIR holds its runs one level down: "train first" sent the user off to
    train what was trained."""
    demo = tmp_path / "demo"
    for sub in ("stages", "pretrain/checkpoints/700/state", "sft/checkpoints/200/state",
                "image_tokenizer/checkpoints/5/state", "data"):
        (demo / sub).mkdir(parents=True)
    for run in ("pretrain", "sft"):
        (demo / run / "config.gin").write_text("DecoderConfig.d_model = 64\n")
    with pytest.raises(MissingInputError, match=r"demo' holds neither checkpoints/ nor step "
                       r"folders: not a train run's MODEL_DIR; the runs and exports inside it: "
                       r"\['[^,]*demo/pretrain', '[^,]*demo/sft'\]. Give .*such as "
                       r"runs/demo/pretrain"):
        restore.restore_decoder(str(demo))
    # A run that has not saved yet still says so; a folder that is not there, as before.
    (demo / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(MissingInputError, match="has no committed checkpoint yet; train first"):
        restore.restore_decoder(str(demo / "fresh"))
    with pytest.raises(MissingInputError, match=r"^no checkpoints in .*nowhere'"):
        restore.restore_decoder(str(tmp_path / "nowhere"))


def test_an_import_into_its_own_source_is_refused_before_config_gin_is_written(tmp_path,
                                                                               capsys):
    source = tmp_path / "weights"
    source.mkdir()
    (source / "x.txt").write_text("")
    for model_dir in (source, source / "run"):
        argv = ["--gin_file=gin_configs/runs/import.gin", f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.import_weights.source='{source}'"]
        try:
            assert main.main(argv) == 2
        finally:
            gin.clear_config()
        assert sorted(os.listdir(source)) == ["x.txt"]  # No config.gin written there.
        assert "import MODEL_DIR" in capsys.readouterr().err
    for mode, gin_file in (("import_weights", "import"), ("export", "export")):
        argv = [f"--gin_file=gin_configs/runs/{gin_file}.gin",
                f"--gin.MODEL_DIR='{tmp_path}/{mode}'", f"--gin.{mode}.dtype='bf16'"]
        argv += ([f"--gin.import_weights.source='{source}'"] if mode == "import_weights" else [])
        try:
            assert main.main(argv) == 2
        finally:
            gin.clear_config()
        assert not (tmp_path / mode).exists()  # Before anything is read or written.
        assert f"{mode}.dtype='bf16'; choose one of" in capsys.readouterr().err


def test_the_recorded_vocabulary_is_checked_and_carried_into_the_export(
        train_run, vocab_dir, tmp_path, monkeypatch):
    """A train run records its vocabulary (vocabulary.json): exporting it with another of the
    same size is refused before the restore; with its own, the export's manifest carries the
    record, so a run that reads the export with another vocabulary is refused too."""
    import shutil

    from cm3leon_jax.train import vocab_record

    run = str(tmp_path / "run")
    shutil.copytree(train_run[0], run)
    vocab = MultimodalVocabulary(vocab_dir)
    other = MultimodalVocabulary.create(
        str(tmp_path / "other"), TextTokenizer.train([t.upper() for t in TEXTS], vocab_size=280),
        image_codes=32, num_sentinels=4, image_length=16)
    assert other.layout == vocab.layout and other.fingerprint != vocab.fingerprint
    vocab_record.write(run, other)
    with monkeypatch.context() as patch:
        patch.setattr(params_export.restore, "restore_decoder", _no_restore)
        with pytest.raises(UserInputError, match=rf"^export.vocab_dir .* does not fit the model "
                           rf"of export.checkpoint .*\(fingerprint {other.fingerprint}\), not "
                           rf"this one \(fingerprint {vocab.fingerprint}"):
            _export((run,), tmp_path / "refused", vocab_dir=vocab_dir)
    assert not (tmp_path / "refused").exists()

    vocab_record.write(run, vocab)
    manifest = _export((run,), tmp_path / "export", vocab_dir=vocab_dir)
    assert manifest["vocabulary"]["fingerprint"] == vocab.fingerprint
    export_dir = str(tmp_path / "export")
    assert restore.vocabulary_mismatch(export_dir, vocab) is None
    assert "fingerprint " + vocab.fingerprint in restore.vocabulary_mismatch(export_dir, other)


def test_a_refused_rerun_leaves_config_gin_and_the_folders_it_reads_as_they_were(
        train_run, vocab_dir, tmp_path, capsys):
    """A rerun refused for its existing export (another dtype) left its own settings in
    config.gin beside the earlier export; MODEL_DIR = export.vocab_dir got a config.gin in
    the vocabulary; import.output_dir = MODEL_DIR advised overwrite=True, then refused it."""
    model_dir = tmp_path / "run"

    def run(*bindings, gin_file="export"):
        argv = [f"--gin_file=gin_configs/runs/{gin_file}.gin", *bindings]
        try:
            return main.main(argv)
        finally:
            gin.clear_config()

    common = [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.export.checkpoint='{train_run[0]}'",
              f"--gin.export.vocab_dir='{vocab_dir}'", "--gin.export.image_tokenizer_dir=None"]
    assert run(*common, "--gin.export.dtype='bfloat16'") == 0
    config = (model_dir / "config.gin").read_text()
    assert run(*common, "--gin.export.dtype='float32'") == 2
    assert "holds an earlier export; choose another output folder or set overwrite=True" in (
        capsys.readouterr().err)
    assert (model_dir / "config.gin").read_text() == config
    assert sorted(os.listdir(model_dir)) == ["config.gin", "export"]
    before = sorted(os.listdir(vocab_dir))
    assert run(f"--gin.MODEL_DIR='{vocab_dir}'", *common[1:]) == 2
    assert "is, holds or lies inside export.vocab_dir" in capsys.readouterr().err
    assert sorted(os.listdir(vocab_dir)) == before
    fresh = tmp_path / "fresh"
    assert run(f"--gin.MODEL_DIR='{fresh}'", f"--gin.import_weights.source='{model_dir}/export'",
               f"--gin.import_weights.output_dir='{fresh}'", gin_file="import") == 2
    assert "import_weights.output_dir" in capsys.readouterr().err and not fresh.exists()
    # An empty output folder is written into; a damaged export is one error line.
    (tmp_path / "empty").mkdir()
    assert run(f"--gin.MODEL_DIR='{tmp_path}/again'", *common[1:],
               f"--gin.export.output_dir='{tmp_path}/empty'") == 0
    victim = sorted((tmp_path / "empty").rglob("*.json"))[-1]
    victim.write_text(victim.read_text() + " ")
    assert run(f"--gin.MODEL_DIR='{tmp_path}/imported'",
               f"--gin.import_weights.source='{tmp_path}/empty'", gin_file="import") == 2
    assert "does not match" in capsys.readouterr().err


def test_a_chameleon_folder_in_its_own_ids_without_its_tokenizer_is_refused(tmp_path):
    """It imported with its token rows where Chameleon has them, read as our ids."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "chameleon", "vocabulary_map": {"<s>": 0, "IMGIMGBAZ": 4}}))
    with pytest.raises(UserInputError, match="Chameleon's own token ids .* without its "
                                             "tokenizer.json"):
        hf_import._chameleon_ids_vocab(str(folder), json.loads(
            (folder / "config.json").read_text()))
    ours = {"model_type": "chameleon", "vocabulary_map": {"<image>": 4, "IMGIMGBAZ": 5}}
    assert hf_import._chameleon_ids_vocab(str(folder), ours) is None
