"""The Flax CLIP against `transformers`' CLIPModel on a tiny random config."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cm3leon_jax.retrieval import clip, clip_weights  # noqa: E402

EOS = 98


def _hf_model(tmp_path, act="quick_gelu"):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, hidden_act=act, eos_token_id=EOS),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48,
                           intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, hidden_act=act),
        projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    # Random init leaves LayerNorms at 1/0; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


def _inputs(rng):
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    lengths = np.array([5, 16, 2], np.int32)
    tokens = rng.integers(0, EOS, size=(3, 16)).astype(np.int32)
    for i, n in enumerate(lengths):
        tokens[i, n - 1] = EOS
        tokens[i, n:] = 0
    return pixels, tokens, lengths


def _features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def _hf_embeddings(model, pixels, tokens, lengths):
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        txt = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                                      attention_mask=torch.from_numpy(mask))
    return _features(img), _features(txt)


def _ours(cfg, params, pixels, tokens, lengths):
    model = clip.CLIP(cfg)
    # Jitted: one compilation per tower instead of one per operation run eagerly.
    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.CLIP.encode_image))(
        params, jnp.asarray(pixels))
    txt = jax.jit(lambda p, t, n: model.apply({"params": p}, t, n, method=clip.CLIP.encode_text))(
        params, jnp.asarray(tokens), jnp.asarray(lengths))
    return np.asarray(img), np.asarray(txt)


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_imported_weights_match_transformers(tmp_path, act):
    model = _hf_model(tmp_path, act)
    cfg, params = clip_weights.load_hf_checkpoint(str(tmp_path / "hf"))
    assert cfg.activation == act and cfg.eos_token_id == EOS and cfg.projection_dim == 24
    pixels, tokens, lengths = _inputs(np.random.default_rng(0))
    ref_img, ref_txt = _hf_embeddings(model, pixels, tokens, lengths)
    img, txt = _ours(cfg, params, pixels, tokens, lengths)
    assert _rel(img, ref_img) < 1e-4, _rel(img, ref_img)
    assert _rel(txt, ref_txt) < 1e-4, _rel(txt, ref_txt)
    np.testing.assert_allclose(
        float(params["logit_scale"]), float(model.logit_scale.detach()), rtol=1e-6
    )


def test_saved_checkpoint_opens_in_transformers(tmp_path):
    cfg = clip.ClipConfig(image_size=32, patch_size=16, vision_width=32, vision_layers=1,
                          vision_heads=2, vision_mlp=64, vocab_size=99, context_length=16,
                          text_width=32, text_layers=1, text_heads=2, text_mlp=64,
                          eos_token_id=EOS, projection_dim=16)
    params = clip.init_params(cfg, seed=3)
    clip_weights.save_hf_checkpoint(str(tmp_path / "ours"), cfg, params)
    model = transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).eval()
    pixels, tokens, lengths = _inputs(np.random.default_rng(1))
    ref_img, ref_txt = _hf_embeddings(model, pixels, tokens, lengths)
    img, txt = _ours(cfg, params, pixels, tokens, lengths)
    assert _rel(img, ref_img) < 1e-4 and _rel(txt, ref_txt) < 1e-4
    cfg2, params2 = clip_weights.load_hf_checkpoint(str(tmp_path / "ours"))
    assert cfg2 == cfg


def test_missing_tensors_are_named(tmp_path):
    cfg = clip.ClipConfig.tiny()
    with pytest.raises(ValueError, match="lacks .*vision_model.embeddings.class_embedding"):
        clip_weights.params_from_state_dict(cfg, {"logit_scale": np.zeros(())})
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_weights.load_hf_checkpoint(str(tmp_path))
