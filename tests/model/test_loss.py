"""The loss: weighted cross-entropy, z-loss, metrics; checked against numpy by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon_jax.model.loss import cross_entropy_loss


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
