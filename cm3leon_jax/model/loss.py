"""The training loss: weighted next-token cross-entropy plus z-loss.

CM3Leon's loss is uniform over every token (retrieved documents included) except those
the data pipeline weights 0 (sentinels, padding); the successor adds a z-loss
`z_loss * logsumexp(logits)^2` (1e-5) that keeps the softmax normalizer near 1 and
training stable at scale.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp


def _log_z_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A masked sum rather than a gather: with the vocab split over `tensor` it becomes a
    # local sum plus an all-reduce, instead of all-gathering [batch, length, vocab].
    vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    return log_z, jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)


@jax.custom_vjp
def log_z_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logsumexp(logits), logits[target]) over the last axis, float32[batch, length] each.

    The backward is one fused pass over the logits, `exp(logits - log_z) * g_log_z +
    onehot(target) * g_target`: autodiff keeps the forward's `exp(logits - max)` (one more
    [tokens, vocab] array written and read) and materializes the one-hot select apart.
    """
    return _log_z_and_target(logits, targets)


def _log_z_and_target_fwd(logits, targets):
    log_z, target_logit = _log_z_and_target(logits, targets)
    return (log_z, target_logit), (logits, targets, log_z)


def _log_z_and_target_bwd(residuals, cotangents):
    logits, targets, log_z = residuals
    g_log_z, g_target = cotangents
    vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    d_logits = (jnp.exp(logits - log_z[..., None]) * g_log_z[..., None]
                + jnp.where(vocab_ids == targets[..., None], g_target[..., None], 0.0))
    return d_logits, None


log_z_and_target.defvjp(_log_z_and_target_fwd, _log_z_and_target_bwd)


@gin.configurable(denylist=["logits", "targets", "weights"])
def cross_entropy_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                       z_loss: float = 0.0, custom_grad: bool = True
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean over tokens of `-log p(target) + z_loss * logZ^2`.

    Args:
        logits: float32[batch, length, vocab].
        targets: int32[batch, length].
        weights: float32[batch, length] (e.g. `decoder_loss_weights`); None: all 1.
        z_loss: coefficient of the z-loss (0 for CM3Leon, 1e-5 for Chameleon).
        custom_grad: the fused backward of `log_z_and_target` (False: autodiff).
    Returns:
        (loss, metrics) where loss = sum(w * (ce + z)) / max(sum(w), 1) and metrics holds
        `cross_entropy`, `z_loss` (both weighted means), `accuracy` and `weight_sum`
        (the denominator, for averaging across micro-batches or hosts).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy_loss: logits {logits.shape} do not match targets "
                         f"{targets.shape}.")
    logits = logits.astype(jnp.float32)
    weights = (
        jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    )
    split = log_z_and_target if custom_grad else _log_z_and_target
    log_z, target_logit = split(logits, targets)
    ce = log_z - target_logit
    z = z_loss * jnp.square(log_z)
    weight_sum = jnp.sum(weights)
    denom = jnp.maximum(weight_sum, 1.0)
    mean = lambda v: jnp.sum(v * weights) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"cross_entropy": mean(ce), "z_loss": mean(z), "accuracy": mean(correct),
               "weight_sum": weight_sum}
    return mean(ce + z), metrics


def decoder_loss(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                 z_loss: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of `model` on one batch of the packed feature-converter layout.

    `batch` holds `decoder_input_tokens`, `decoder_target_tokens` and optionally
    `decoder_loss_weights` (default: 1 where the target is not padding),
    `decoder_segment_ids` and `decoder_positions`. `z_loss=None` takes the gin binding
    of `cross_entropy_loss.z_loss`. The loss's backward follows `model.config.custom_grads`.
    """
    missing = [k for k in ("decoder_input_tokens", "decoder_target_tokens") if k not in batch]
    if missing:
        raise KeyError(f"decoder_loss: batch lacks {missing}; it has {sorted(batch)}.")
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (targets != 0).astype(jnp.float32)
    logits = model.apply({"params": params}, batch["decoder_input_tokens"],
                         batch.get("decoder_segment_ids"), batch.get("decoder_positions"))
    kwargs = {} if z_loss is None else {"z_loss": z_loss}
    return cross_entropy_loss(logits, targets, weights, custom_grad=model.config.custom_grads,
                              **kwargs)
