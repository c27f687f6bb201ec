"""Params-only export: what is in it, where it restores, and what it refuses."""

from __future__ import annotations

import hashlib
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import main
from cm3leon_jax.decode.restore import restore_decoder
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.export import params_export
from cm3leon_jax.model import partitioning
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from tests.export.conftest import CONFIG


def _export(train_run, out, **kwargs):
    kwargs = {"dtype": None, "shard": False, "config": CONFIG, **kwargs}
    return params_export.export("unused", checkpoint=train_run[0], output_dir=str(out), **kwargs)


def tree_digests(root) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {os.path.relpath(os.path.join(d, f), root):
            hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


def _assert_params_equal(got, want, dtype=np.float32):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.asarray(w, dtype)))


def test_export_holds_params_vocab_tokenizer_and_a_manifest_of_every_file(
        train_run, vocab_dir, image_tokenizer_dir, tmp_path):
    out = tmp_path / "export"
    manifest = _export(train_run, out, vocab_dir=vocab_dir, image_tokenizer_dir=image_tokenizer_dir)
    assert manifest["step"] == 3 and manifest["source"] == train_run[0]
    assert pc.config_from_dict(manifest["decoder_config"]) == CONFIG
    assert manifest["vocab"] == "vocab" and manifest["image_tokenizer"] == "image_tokenizer"
    on_disk = sorted(os.path.relpath(os.path.join(d, n), out)
                     for d, _, names in os.walk(out) for n in names)
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == pc.sha256(str(out / rel)), rel
    assert os.listdir(tmp_path) == ["export"]  # The staging folder is gone.
    # Params only: the optimizer state is not there, every parameter is.
    config, params, step = pc.load_decoder(str(out))
    assert (config, step) == (CONFIG, 3)
    _assert_params_equal(params, train_run[1])
    assert sorted(os.listdir(out / "vocab")) == sorted(os.listdir(vocab_dir))
    tok = ImageTokenizer.from_checkpoint(str(out / "image_tokenizer"))
    assert tok.codebook_size == 32 and tok.image_size == 16


def test_dtype_is_selectable_and_recorded(train_run, tmp_path):
    manifest = _export(train_run, tmp_path / "bf16", dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16"
    config, params, _ = pc.load_decoder(str(tmp_path / "bf16"))
    assert config == CONFIG.replace(param_dtype="bfloat16")
    _assert_params_equal(params, train_run[1], jnp.bfloat16)
    _, back, _ = pc.load_decoder(str(tmp_path / "bf16"), dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(back))


def test_restores_sharded_on_any_mesh(train_run, tmp_path):
    out = str(tmp_path / "export")
    _export(train_run, out, shard=True)  # Written from the default (data-parallel) mesh.
    mesh = partitioning.make_mesh(data=1, fsdp=2, tensor=4)
    _, params, _ = pc.load_decoder(out, mesh=mesh)
    _assert_params_equal(params, train_run[1])
    query = params["layers"]["attention"]["query"]["kernel"]  # [layers, embed, heads, kv]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert query.addressable_shards[0].data.shape == (2, 32, 1, 16)


def test_decode_restore_reads_an_export(train_run, tmp_path):
    out = str(tmp_path / "export")
    _export(train_run, out)
    config, params, step = restore_decoder(out)
    assert (config, step) == (CONFIG, 3)
    _assert_params_equal(params, train_run[1])
    assert restore_decoder(out, config=CONFIG.replace(attention_impl="chunked"))[0] \
        .attention_impl == "chunked"
    with pytest.raises(ValueError, match="export of step 3, not 7"):
        restore_decoder(out, step=7)
    with pytest.raises(ValueError, match="was made with"):
        restore_decoder(out, config=CONFIG.replace(d_model=32, num_heads=2))


def test_refuses_to_overwrite_and_leaves_nothing_half_written(train_run, vocab_dir, tmp_path):
    out = tmp_path / "export"
    _export(train_run, out)
    with pytest.raises(UserInputError, match="holds an earlier export.*overwrite=True"):
        _export(train_run, out)
    with pytest.raises(FileNotFoundError, match="no_such_vocab"):
        _export(train_run, out, overwrite=True, vocab_dir=str(tmp_path / "no_such_vocab"))
    assert sorted(os.listdir(tmp_path)) == ["export"]  # Old export intact, no staging left.
    assert pc.load_decoder(str(out))[2] == 3
    _export(train_run, out, overwrite=True, vocab_dir=vocab_dir)
    assert json.loads((out / "manifest.json").read_text())["vocab"] == "vocab"


def test_an_export_never_replaces_or_writes_into_what_it_reads(train_run, vocab_dir, tmp_path):
    """overwrite=True replaces an earlier export, never another folder; the output and the
    run's MODEL_DIR (whose config.gin main.run writes) stay apart from the trained run."""
    before = tree_digests(train_run[0])
    for target in (train_run[0], os.path.join(train_run[0], "export"), vocab_dir):
        with pytest.raises(UserInputError, match="is, holds or lies inside export"):
            _export(train_run, target, overwrite=True, vocab_dir=vocab_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not an export"):
        _export(train_run, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    # Preprocessed data and SFT data hold a manifest.json of their own: not an export.
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"splits": {"train": {"documents": 4}}}))
    (data / "train-00000.tfrecord").write_bytes(b"shard")
    with pytest.raises(UserInputError, match="not an export"):
        _export(train_run, data, overwrite=True)
    assert sorted(os.listdir(data)) == ["manifest.json", "train-00000.tfrecord"]
    for model_dir in (train_run[0], os.path.join(train_run[0], "exports")):
        argv = ["--gin_file=gin_configs/runs/export.gin", f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.export.checkpoint='{train_run[0]}'", "--gin.export.vocab_dir=None",
                "--gin.export.image_tokenizer_dir=None"]
        try:
            assert main.main(argv) == 2
        finally:
            gin.clear_config()
    assert tree_digests(train_run[0]) == before
    own = str(tmp_path / "export_run")  # output_dir = the export run's own MODEL_DIR.
    argv = ["--gin_file=gin_configs/runs/export.gin", f"--gin.MODEL_DIR='{own}'",
            f"--gin.export.checkpoint='{train_run[0]}'", "--gin.export.vocab_dir=None",
            "--gin.export.image_tokenizer_dir=None", f"--gin.export.output_dir='{own}'"]
    try:
        assert main.main(argv) == 2
    finally:
        gin.clear_config()
    assert not os.path.exists(own)


def test_the_hf_layout_refuses_what_transformers_cannot_express_before_restoring(
        train_run, monkeypatch, tmp_path):
    """A model with image place embeddings (the demo's) has no transformers layout: a
    one-line UserInputError, before the checkpoint is read (it was a ValueError traceback
    after the whole restore)."""
    def no_restore(*args, **kwargs):
        raise AssertionError("restored before refusing")
    assert params_export.restore.saved_config(train_run[0]) == CONFIG
    monkeypatch.setattr(params_export.restore, "restore_decoder", no_restore)
    for config in (CONFIG.replace(image_grid=2, image_code_ids=(10, 20)), None):
        if config is None:  # Read from the run's config.gin.
            monkeypatch.setattr(params_export.restore, "saved_config",
                                lambda _: CONFIG.replace(image_grid=2, image_code_ids=(10, 20)))
        with pytest.raises(UserInputError, match=r"has \{'image_grid': 2\}.*layout='params'"):
            _export(train_run, tmp_path / "hf", layout="hf", config=config)
    assert not (tmp_path / "hf").exists()
    # From the command line: refused before main.run writes config.gin into MODEL_DIR.
    model_dir = tmp_path / "hf_run"
    argv = ["--gin_file=gin_configs/runs/export.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.export.checkpoint='{train_run[0]}'", "--gin.export.vocab_dir=None",
            "--gin.export.image_tokenizer_dir=None", "--gin.export.layout='hf'"]
    try:
        assert main.main(argv) == 2
    finally:
        gin.clear_config()
    assert not model_dir.exists()


def test_folders_to_copy_are_checked_before_restoring(train_run, monkeypatch, tmp_path):
    """A vocab_dir or image_tokenizer_dir that is not a folder is named before the long
    restore (on a pod it failed on process 0 alone, after it)."""
    def no_restore(*args, **kwargs):
        raise AssertionError("restored before refusing")
    monkeypatch.setattr(params_export.restore, "restore_decoder", no_restore)
    for name in ("vocab_dir", "image_tokenizer_dir"):
        with pytest.raises(UserInputError, match=rf"export.{name}=.*nowhere.* is not a folder"):
            _export(train_run, tmp_path / "out", **{name: str(tmp_path / "nowhere")})
    assert not (tmp_path / "out").exists()


def test_a_damaged_file_is_named(train_run, tmp_path):
    out = tmp_path / "export"
    manifest = _export(train_run, out)
    victim = max(manifest["files"], key=lambda r: manifest["files"][r]["bytes"])
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    with pytest.raises(pc.CorruptExportError, match=victim.replace(".", r"\.")):
        pc.load_decoder(str(out))
    os.remove(out / victim)
    with pytest.raises(pc.CorruptExportError, match="missing"):
        restore_decoder(str(out))


def test_export_run_mode_from_the_command_line(train_run, vocab_dir, tmp_path, capsys):
    model_dir = tmp_path / "run"
    argv = ["--gin_file=gin_configs/runs/export.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.export.checkpoint='{train_run[0]}'", f"--gin.export.vocab_dir='{vocab_dir}'",
            "--gin.export.image_tokenizer_dir=None", "--gin.export.dtype='float32'"]
    # No size bound: export.gin takes the decoder from the run's config.gin.
    try:
        assert main.main(argv) == 0
    finally:
        import gin
        gin.clear_config()
    assert "step 3" in capsys.readouterr().out
    config, params, _ = restore_decoder(str(model_dir / "export"))
    assert config == CONFIG
    _assert_params_equal(params, train_run[1])
