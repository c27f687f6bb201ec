"""The loss: weighted cross-entropy, z-loss, metrics; checked against numpy by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.model.loss import cross_entropy_loss, fused_head_loss


def _reference(logits, targets, weights, z):
    log_z = np.log(np.exp(logits).sum(-1))
    ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((ce + z * log_z**2) * weights).sum() / weights.sum(), (
        ce * weights
    ).sum() / weights.sum()


def test_matches_numpy_with_weights_and_z_loss():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    loss, m = cross_entropy_loss(logits, targets, weights, z_loss=1e-2)
    want, want_ce = _reference(logits.astype(np.float64), targets, weights, 1e-2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["cross_entropy"], want_ce, rtol=1e-5)
    assert m["weight_sum"] == weights.sum()
    assert m["z_loss"] > 0


def test_zero_weight_tokens_do_not_count():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 2] = [100.0, 0, 0, 0]  # A terrible prediction for target 1 ...
    loss, _ = cross_entropy_loss(logits, np.array([[0, 0, 1]]), np.array([[1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(loss, np.log(4), rtol=1e-6)  # ... weighted 0.
    loss, _ = cross_entropy_loss(logits, np.array([[0, 0, 1]]), np.zeros((1, 3)))
    assert loss == 0  # All-zero weights: no NaN.


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="do not match targets"):
        cross_entropy_loss(np.zeros((1, 3, 4)), np.zeros((1, 2), np.int32))


def _head_inputs(seed=0, batch=2, length=13, embed=8, vocab=37):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, embed)).astype(np.float32)
    head = rng.standard_normal((vocab, embed)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    weights = (rng.random((batch, length)) > 0.3).astype(np.float32)
    return x, head, targets, weights


# 4 and 64 pad the 13 positions; "cpu": the chunk's softmax and gradient in C++.
@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_fused_head_loss_equals_the_loss_on_whole_logits(chunk, impl):
    x, head, targets, weights = _head_inputs()

    def whole(x, head):
        logits = jnp.einsum("ble,ve->blv", x, head)
        return cross_entropy_loss(logits, targets, weights, z_loss=1e-2, custom_grad=False)

    fused = lambda x, head: fused_head_loss(x, head, targets, weights, 1e-2, chunk, impl)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, head)
    (loss, metrics), grads = grad(fused)
    (want_loss, want_metrics), want_grads = grad(whole)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for key in ("cross_entropy", "z_loss", "weight_sum"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
    assert "accuracy" not in metrics
    for g, w in zip(grads, want_grads):
        assert g.shape == w.shape and float(jnp.max(jnp.abs(w))) > 0
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_fused_head_loss_scales_with_the_cotangent_and_ignores_zero_weights(impl):
    x, head, targets, _ = _head_inputs(seed=1)
    weights = np.zeros(targets.shape, np.float32)
    fused = lambda x: fused_head_loss(x, head, targets, weights, 0.0, 4, impl)[0]
    loss, grads = jax.value_and_grad(lambda x: 3.0 * fused(x))(x)
    assert loss == 0 and not np.any(grads)  # No NaN from an empty batch.
    weights[0, :5] = 1.0
    one = jax.grad(fused)(x)
    three = jax.grad(lambda x: 3.0 * fused(x))(x)
    np.testing.assert_allclose(three, 3.0 * one, rtol=1e-6)
    assert not np.any(one[1]) and np.any(one[0, :5]) and not np.any(one[0, 5:])


def test_fused_head_loss_names_bad_inputs():
    x, head, targets, weights = _head_inputs()
    with pytest.raises(ValueError, match="must agree on"):
        fused_head_loss(x, head, targets[:, :5], weights)
    with pytest.raises(ValueError, match=r"must be \[vocab, 8\]"):
        fused_head_loss(x, head.T, targets, weights)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        fused_head_loss(x, head, targets, weights, chunk=0)
    with pytest.raises(ValueError, match="impl='gpu'; choose"):
        fused_head_loss(x, head, targets, weights, impl="gpu")
