"""The one-pass norm backward (`norms.normalize`) equals autodiff of the plain formulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.model import norms

# name: (kind, x shape, param shape or None, with bias)
CASES = {
    "layernorm_plain": ("layernorm", (3, 7, 32), None, False),
    "layernorm_affine": ("layernorm", (3, 7, 32), (32,), True),
    "layernorm_scale_only": ("layernorm", (2, 5, 24), (24,), False),
    "rmsnorm_plain": ("rmsnorm", (3, 7, 32), None, False),
    "rmsnorm_scale": ("rmsnorm", (3, 7, 32), (32,), False),
    "qk_norm_per_head": ("layernorm", (2, 6, 4, 16), (4, 16), True),
}


def _inputs(shape, param_shape, bias, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    scale = b = None
    if param_shape is not None:
        scale = jnp.asarray(1 + 0.2 * rng.standard_normal(param_shape), jnp.float32)
        if bias:
            b = jnp.asarray(0.2 * rng.standard_normal(param_shape), jnp.float32)
    return x, scale, b, dy


def _vjp(custom_grad, kind, x, scale, bias, dy):
    fn = lambda x, scale, bias: norms.normalize(x, scale, bias, kind=kind, eps=1e-5,
                                                custom_grad=custom_grad)
    y, pullback = jax.vjp(fn, x, scale, bias)
    return y, pullback(dy)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_autodiff(name):
    kind, shape, param_shape, bias = CASES[name]
    x, scale, b, dy = _inputs(shape, param_shape, bias)
    y, grads = jax.jit(lambda *a: _vjp(True, kind, *a))(x, scale, b, dy)
    y_ref, grads_ref = jax.jit(lambda *a: _vjp(False, kind, *a))(x, scale, b, dy)
    np.testing.assert_array_equal(y, y_ref)  # The same forward code.
    assert len(jax.tree.leaves(grads)) == 1 + (scale is not None) + (b is not None)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_input_keeps_its_dtype():
    x, scale, b, dy = _inputs((2, 5, 32), (32,), True)
    x, dy = x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
    y, (dx, d_scale, d_bias) = _vjp(True, "layernorm", x, scale, b, dy)
    y_ref, (dx_ref, _, _) = _vjp(False, "layernorm", x, scale, b, dy)
    assert y.dtype == dx.dtype == jnp.bfloat16 and d_scale.dtype == d_bias.dtype == jnp.float32
    np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), atol=0.02, rtol=0.02)


def test_the_gradient_is_not_trivial():
    """dx of a norm is orthogonal to the rows' mean direction, but not zero."""
    x, _, _, dy = _inputs((4, 16), None, False)
    _, (dx, _, _) = _vjp(True, "layernorm", x, None, None, dy)
    np.testing.assert_allclose(jnp.sum(dx, axis=-1), 0.0, atol=1e-5)
    assert float(jnp.max(jnp.abs(dx))) > 1e-3


@pytest.mark.parametrize("kind", norms.KINDS)
def test_an_overflowed_variance_gives_a_nan_gradient(kind):
    """Activations blown up to ~1e30 overflow the variance: the norm's output is then
    meaningless, and the gradient must say so rather than be a silent 0 (the trainer
    stops on a non-finite gradient). Rows that did not overflow are unaffected."""
    x = jnp.asarray([[1e30, -1e30, 3e29, 1.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
    y, (dx, _, _) = _vjp(True, kind, x, None, None, jnp.ones_like(x))
    assert np.isfinite(np.asarray(y)).all()  # The forward alone would not notice.
    assert np.isnan(np.asarray(dx[0])).all()
    _, (dx_ref, _, _) = _vjp(False, kind, x, None, None, jnp.ones_like(x))
    np.testing.assert_allclose(dx[1], dx_ref[1], atol=1e-6)


def test_clear_errors():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="kind='batchnorm'"):
        norms.normalize(x, kind="batchnorm")
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        norms.normalize(x, jnp.ones(8), jnp.zeros(8), kind="rmsnorm")
