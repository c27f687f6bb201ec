"""The hand-written backward passes (norms, tied head, exact GELU, loss softmax, "chunked"
attention, the fused head and loss of `loss_chunk`), each alone and end to end: the whole
decoder's loss and gradients with them equal plain autodiff with the "xla" kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testlib import packed_batch, random_params, tiny_chameleon, tiny_config

from cm3leon_jax.model import layers, loss
from cm3leon_jax.model.decoder import Decoder

FAST = dict(custom_grads=True, attention_impl="chunked")
PLAIN = dict(custom_grads=False, attention_impl="xla")
VARIANTS = {
    "cm3leon": tiny_config,
    "cm3leon_affine_norms": lambda **c: tiny_config(norm_params=True, **c),
    "chameleon_gqa": tiny_chameleon,
    "chameleon_swin_tied": lambda **c: tiny_chameleon(block_order="swin", tie_embeddings=True, **c),
    "cm3leon_remat_unrolled": lambda **c: tiny_config(remat_policy="dots", scan_unroll=2, **c),
}


def _loss_and_grads(config, params, batch):
    fn = lambda p: loss.decoder_loss(Decoder(config), p, batch, z_loss=1e-4)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decoder_loss_and_grads_equal_plain_autodiff(name):
    fast, plain = VARIANTS[name](**FAST), VARIANTS[name](**PLAIN)
    params = random_params(plain, seed=1)
    batch = packed_batch(2, 40, plain.vocab_size, seed=5)  # Several documents and padding.
    value, grads = _loss_and_grads(fast, params, batch)
    want_value, want_grads = _loss_and_grads(plain, params, batch)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    flat, want_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
    for (path, g), w in zip(flat, want_flat):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_head_loss_equals_plain_autodiff(name):
    """`DecoderConfig.loss_chunk` (the train step's loss: no accuracy) against the plain
    decoder's loss on whole logits; 40 positions in chunks of 16 (the last one padded),
    the chunks' softmax in jnp for the first two variants, in C++ (`loss_impl = "cpu"`) for
    the rest."""
    impl = "xla" if name in sorted(VARIANTS)[:2] else "cpu"
    fused = VARIANTS[name](loss_chunk=16, loss_impl=impl, **FAST)
    plain = VARIANTS[name](**PLAIN)
    params = random_params(plain, seed=1)
    batch = packed_batch(2, 40, plain.vocab_size, seed=5)
    fn = lambda p: loss.decoder_loss(Decoder(fused), p, batch, z_loss=1e-4, accuracy=False)
    (value, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    want_value, want_grads = _loss_and_grads(plain, params, batch)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert sorted(metrics) == ["cross_entropy", "weight_sum", "z_loss"]
    flat, want_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
    for (path, g), w in zip(flat, want_flat):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_exact_gelu_and_its_gradient_equal_jax_nn_gelu():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 300)) * 3, jnp.float32)
    plain = lambda x: jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(layers.gelu_exact(x), plain(x), atol=2e-6, rtol=1e-6)
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
    got = jax.vjp(layers.gelu_exact, x)[1](d_out)[0]
    want = jax.vjp(plain, x)[1](d_out)[0]
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_exact_gelu_backward_keeps_no_forward_erf():
    """The backward computes its own erf from the saved input: XLA does not keep the
    forward's erf alive as a second activation of the MLP's width (the compiled gradient
    computes erf twice, and needs less scratch than the same MLP with the forward's erf
    shared)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    wi, wo = (jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)
              for shape in ((32, 256), (256, 32)))

    def grads(gelu):
        mlp = lambda x, wi, wo: jnp.sum((gelu(x @ wi) @ wo) ** 2)
        return jax.jit(jax.grad(mlp, argnums=(1, 2))).lower(x, wi, wo).compile()

    ours = grads(layers.gelu_exact)
    assert ours.as_text().count(" erf(") == 2
    shared = jax.custom_vjp(layers._gelu)  # The same backward without the barrier.
    shared.defvjp(lambda x: (layers._gelu(x), x), lambda x, g: (layers._gelu_grad(x, g),))
    assert (ours.memory_analysis().temp_size_in_bytes
            < grads(shared).memory_analysis().temp_size_in_bytes)


def test_tied_logits_gradients_equal_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    embedding = jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)
    d_logits = jnp.asarray(rng.standard_normal((2, 5, 48)), jnp.float32)
    plain = lambda x, e: jnp.einsum("ble,ve->blv", x, e)
    got = jax.vjp(layers.tied_logits, x, embedding)[1](d_logits)
    want = jax.vjp(plain, x, embedding)[1](d_logits)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_same_seed_same_result():
    config = tiny_config(**FAST)
    params = random_params(config, seed=2)
    batch = packed_batch(2, 32, config.vocab_size, seed=6)
    a, b = _loss_and_grads(config, params, batch), _loss_and_grads(config, params, batch)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_loss_softmax_gradients_equal_autodiff():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 6, 40)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, (2, 6)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 6)) > 0.3, jnp.float32)
    fn = lambda custom: jax.value_and_grad(lambda x: loss.cross_entropy_loss(
            x, targets, weights, z_loss=1e-2, custom_grad=custom)[0])(logits)
    (value, grad), (want_value, want_grad) = fn(True), fn(False)
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_allclose(grad, want_grad, atol=1e-7, rtol=1e-5)
    assert float(jnp.max(jnp.abs(grad))) > 1e-3
