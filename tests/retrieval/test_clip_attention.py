"""`ClipConfig.attention_impl = "cpu"`: both towers through the C++ flash kernel give the
einsum attention's embeddings and gradients (patch dropout and text padding included)."""

import dataclasses

import jax
import numpy as np
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import clip


def _embeddings(params, cfg, impl, pixels, keep, tokens, lengths):
    model = clip.CLIP(dataclasses.replace(cfg, attention_impl=impl))
    img = model.apply({"params": params}, pixels, keep, method=clip.CLIP.encode_image)
    txt = model.apply({"params": params}, tokens, lengths, method=clip.CLIP.encode_text)
    return img, txt


# The demo's image grid (8 x 8 patches + the class token: 65 positions, past one 64-key
# tile) and a smaller one; texts of full, partial and one-token length.
@pytest.mark.parametrize("image_size", [32, 16])
def test_cpu_attention_is_the_einsum_attention_in_values_and_gradients(image_size):
    cfg = dataclasses.replace(clip.ClipConfig.tiny(), image_size=image_size, patch_size=4)
    params = clip.init_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, image_size, image_size, 3)).astype(np.float32)
    keep = rng.random((3, cfg.num_patches)) > 0.3
    tokens = rng.integers(1, cfg.vocab_size, (3, 11)).astype(np.int32)
    lengths = np.array([11, 5, 1], np.int32)
    weights = [rng.standard_normal((3, cfg.projection_dim)).astype(np.float32)
               for _ in range(2)]

    def loss(params, impl):
        img, txt = _embeddings(params, cfg, impl, pixels, keep, tokens, lengths)
        return (img * weights[0]).sum() + (txt * weights[1]).sum(), (img, txt)

    (want, want_out), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                           static_argnums=1)(params, "xla")
    (got, got_out), got_grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                        static_argnums=1)(params, "cpu")
    for a, b in zip(want_out, got_out):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    flat_got = jax.tree.leaves(got_grads)
    # Float32 sums in other orders, against the largest gradient (some are zero in exact
    # arithmetic: a key bias moves every score of a query alike).
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(want_grads))
    for (path, a), b in zip(flat_want, flat_got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # Dropped patches matter (the comparison can fail).
    moved, _ = _embeddings(params, cfg, "cpu", pixels, np.ones_like(keep), tokens, lengths)
    assert not np.allclose(moved, got_out[0], atol=1e-3)


def test_an_unknown_attention_impl_is_refused_by_name():
    with pytest.raises(UserInputError, match="attention_impl='flash'"):
        clip.ClipConfig.tiny().__class__(attention_impl="flash")
