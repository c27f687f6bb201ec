"""The Hugging Face layout: transformers loads our folders and gives our logits; we read
them back exactly. Tiny random configs; the reference is transformers itself (f32)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.export import hf_export, hf_import
from cm3leon_jax.model import hf_weights
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from tests.export.conftest import TEXTS
from tests.model.model_testlib import forward, random_params, tiny_chameleon, tiny_config

RTOL = 1e-4


def _tokens(config, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, 20))


def _relative_error(ours, theirs):
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


def _assert_same_tree(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, want)


@pytest.mark.parametrize("tie", [True, False])
def test_cm3leon_loads_as_opt_and_comes_back(tie, vocab_dir, tmp_path):
    config = tiny_config(tie_embeddings=tie)
    params = random_params(config, seed=5)
    out = str(tmp_path / "hf")
    cfg = hf_export.write_hf(out, config, params, vocab_dir=vocab_dir, step=9)
    assert cfg["architectures"] == ["OPTForCausalLM"] and cfg["enable_bias"] is False
    assert cfg["layer_norm_elementwise_affine"] is False

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "OPTForCausalLM"
    tokens = _tokens(config)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert _relative_error(np.asarray(forward(config)(params, tokens)), theirs) <= RTOL

    back, got_params, extras = hf_import.read_hf(out)
    assert back == config and extras["step"] == 9
    _assert_same_tree(got_params, params)
    assert MultimodalVocabulary(extras["vocab_dir"]).layout == \
        MultimodalVocabulary(vocab_dir).layout


def test_successor_loads_as_chameleon_with_its_vq_model(vocab_dir, hf_image_tokenizer, tmp_path):
    config = tiny_chameleon(block_order="swin")
    params = random_params(config, seed=6)
    vq_config, vq_params = hf_image_tokenizer
    out = str(tmp_path / "hf")
    hf_export.write_hf(out, config, params, vocab_dir=vocab_dir,
                       image_tokenizer=hf_image_tokenizer)

    model = transformers.ChameleonForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    tokens = _tokens(config, seed=1)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(forward(config)(params, tokens))
    layout = MultimodalVocabulary(vocab_dir).layout
    # transformers' Chameleon masks the image tokens' logits (it generates text only):
    # that it masks exactly ours shows the vocabulary_map names our image ids.
    image_ids = np.arange(layout.image_start, layout.used_size)
    assert (theirs[..., image_ids] == np.finfo(np.float32).min).all()
    text = np.setdiff1d(np.arange(config.vocab_size), image_ids)
    assert _relative_error(ours[..., text], theirs[..., text]) <= RTOL

    # Its VQ encoder + vocabulary_map turn pixels into our image ids.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
    codes = ImageTokenizer(vq_config, vq_params).encode(pixels)
    with torch.no_grad():
        x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        hf_ids = model.model.get_image_tokens(x).numpy()
    np.testing.assert_array_equal(hf_ids, layout.codes_to_ids(codes))

    back, got_params, extras = hf_import.read_hf(out)
    assert back == config
    _assert_same_tree(got_params, params)
    got_vq_config, got_vq_params = extras["image_tokenizer"]
    assert got_vq_config == vq_config
    _assert_same_tree(got_vq_params, vq_params)  # The decoder too, which transformers drops.
    # What save_pretrained keeps of it (no cm3leon_* side files): named, not misread.
    os.remove(os.path.join(out, hf_export.OURS))
    shutil.rmtree(os.path.join(out, hf_export.VOCAB))
    with pytest.raises(UserInputError, match="not Chameleon's own .* side files dropped"):
        hf_import.read_hf(out)


def test_a_bfloat16_export_reads_back(vocab_dir, tmp_path):
    """export.dtype's default: safetensors.numpy cannot read BF16, our reader does."""
    config = tiny_config().replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16),
                          random_params(tiny_config(), seed=7))
    out = str(tmp_path / "hf")
    hf_export.write_hf(out, config, params, vocab_dir=vocab_dir)
    back, got_params, _ = hf_import.read_hf(out)
    assert back == config
    _assert_same_tree(got_params, params)
    assert jax.tree.leaves(got_params)[0].dtype == jnp.bfloat16
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserInputError, match="model.safetensors: not a complete safetensors"):
        hf_import.read_hf(out)


def test_a_plain_transformers_folder_imports_from_its_config(tmp_path):
    config = tiny_config(tie_embeddings=False, norm_params=True)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(
        **hf_weights.hf_config_kwargs(config, "opt")))
    hf.save_pretrained(str(tmp_path / "opt"))
    back, params, extras = hf_import.read_hf(str(tmp_path / "opt"))
    assert back == config and extras["vocab_dir"] is None
    _assert_same_tree(params, hf_weights.from_hf(hf.state_dict(), config, "opt"))


def test_bad_folders_name_the_file_and_tensor(tmp_path):
    config = tiny_config()
    out = tmp_path / "hf"
    hf_export.write_hf(str(out), config, random_params(config))
    # config.json edited away from our record: the two are named (it imported silently).
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(UserInputError, match="num_hidden_layers=3 .* num_layers=2: the two "
                                             "records of one model disagree"):
        hf_import.read_hf(str(out))
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = fs.read_safetensors(str(out / "model.safetensors"))
    tensors["model.decoder.layers.1.fc1.weight"] = np.zeros((3, 64), np.float32)
    hf_export.write_safetensors(str(out / "model.safetensors"), tensors)
    with pytest.raises(ValueError, match=r"hf.*layers\.1\.fc1\.weight.*\(3, 64\)"):
        hf_import.read_hf(str(out))
    os.remove(out / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_import.read_hf(str(out))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="config.json: model_type 'llama'"):
        hf_import.read_hf(str(out))
    with pytest.raises(UserInputError, match="holds an earlier export"):
        hf_export.write_hf(str(out), config, random_params(config))
    with pytest.raises(UserInputError, match=r"config.json: \['hidden_size'\] missing"):
        hf_import.config_from_hf({k: v for k, v in cfg.items() if k != "hidden_size"},
                                 "config.json")
    out = tmp_path / "hf2"
    hf_export.write_hf(str(out), config, random_params(config))
    os.remove(out / "model.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(UserInputError, match='index.json: no "weight_map"'):
        hf_import.read_hf(str(out))
    out = tmp_path / "hf3"  # Its record cut to nothing useful.
    hf_export.write_hf(str(out), config, random_params(config))
    (out / hf_export.OURS).write_text(json.dumps({"step": 3}))
    with pytest.raises(UserInputError, match="holds no decoder_config"):
        hf_import.read_hf(str(out))


@pytest.mark.parametrize("change", [{"hidden_act": "gelu"},
                                    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                    {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 10000.0}}])
def test_a_chameleon_config_the_decoder_cannot_compute_is_refused(change):
    """These load silently before, with logits 9% off transformers'."""
    hf = hf_weights.hf_config_kwargs(tiny_chameleon(), "chameleon")
    hf = dict(hf, model_type="chameleon", **change)
    with pytest.raises(UserInputError, match=next(iter(change))):
        hf_import.config_from_hf(hf, "config.json")
    assert hf_import.config_from_hf(dict(hf, **{k: None for k in change if k != "hidden_act"},
                                         hidden_act="silu"), "config.json")


def test_export_and_import_run_modes_round_trip_through_hf(train_run, vocab_dir, tmp_path):
    from cm3leon_jax.decode.restore import restore_decoder
    from cm3leon_jax.export import import_run, params_export
    from tests.export.conftest import CONFIG
    hf_dir = str(tmp_path / "hf")
    params_export.export("unused", checkpoint=train_run[0], output_dir=hf_dir, layout="hf",
                         dtype=None, vocab_dir=vocab_dir, shard=False, config=CONFIG)
    assert import_run.detect_layout(hf_dir) == "hf"
    manifest = import_run.import_weights(str(tmp_path / "run"), source=hf_dir)
    assert manifest["imported_from"] == "hf" and manifest["step"] == 3
    assert manifest["vocab"] == "vocab"
    config, params, step = restore_decoder(str(tmp_path / "run" / "import"))
    assert (config, step) == (CONFIG, 3)
    _assert_same_tree(params, train_run[1])
    with pytest.raises(ValueError, match=r"in no layout this importer knows \(found \['x.txt'\]"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x.txt").write_text("")
        import_run.import_weights(str(tmp_path / "run2"), source=str(tmp_path / "junk"))
    assert not (tmp_path / "run2").exists()


def test_tokenizer_files_give_our_ids(vocab_dir, tmp_path):
    out = str(tmp_path / "hf")
    hf_export.write_hf(out, tiny_config(), random_params(tiny_config()), vocab_dir=vocab_dir)
    ours = MultimodalVocabulary(vocab_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:20] + ["  two  spaces", " lead", "trail ", "digits 12345, ünïcödé ✓",
                              "a\nnew line"]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == list(ours.encode(text)), text
        assert theirs.decode(ids) == text
    layout = ours.layout
    assert theirs.convert_tokens_to_ids(["<break>", "<eoss>", "<sentinel:1>", "IMGIMGBDZ"]) == \
        [2, 3, layout.sentinel_id(1), layout.codes_to_ids(13)]
    # Our sequences open with <eos>: config.json's bos_token_id and the tokenizer's bos_token.
    assert theirs.bos_token == "<eos>" and theirs.bos_token_id == 1
    with open(f"{out}/config.json") as f:
        assert json.load(f)["bos_token_id"] == 1
