"""The training loss: weighted next-token cross-entropy plus z-loss.

CM3Leon's loss is uniform over every token (retrieved documents included) except those
the data pipeline weights 0 (sentinels, padding); the successor adds a z-loss
`z_loss * logsumexp(logits)^2` (1e-5) that keeps the softmax normalizer near 1 and
training stable at scale.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from cm3leon_jax.model import cpu_kernels


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


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 `a @ b` of two matrices, each operand in its own dtype."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def fused_head_loss(x: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                    z_loss: float = 0.0, chunk: int = 512, impl: str = "xla"
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`cross_entropy_loss(x @ head^T, targets, weights, z_loss)`, `chunk` positions at a time.

    The output projection, the softmax and the loss's gradient with respect to the
    logits run position chunk by position chunk, and each chunk's logits gradient goes
    straight into the gradients of `x` and `head` while it is in cache: neither the
    [batch, length, vocab] logits nor their gradient is ever stored (autodiff keeps
    both). The loss is a sum the caller differentiates once, so the forward pass already
    takes the gradients (for a cotangent of 1) and the backward only scales them: three
    products per chunk, as unfused. Chunks run along the length axis, so a batch split
    over devices stays split. The gradient equals the unfused one to float rounding
    (`tests/model/test_loss.py`); `weights` are data (no gradient flows to them).

    Args:
        x: [batch, length, embed], the final norm's output in the compute dtype.
        head: [vocab, embed], the output projection (the tied token embedding).
        targets: int32[batch, length]; weights: float32[batch, length].
        z_loss: coefficient of the z-loss.
        chunk: positions per chunk (the length is padded to a multiple, at weight 0).
        impl: each chunk's softmax and logits gradient in jnp ("xla") or in one C++ pass
            over the chunk's logits (`cpu_kernels.softmax_grad`, "cpu": one CPU device).
    Returns:
        (loss, metrics) as `cross_entropy_loss` without `accuracy` (an argmax over every
        logit, left to the eval step).
    """
    if x.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(f"fused_head_loss: x {x.shape}, targets {targets.shape} and weights "
                         f"{weights.shape} must agree on [batch, length].")
    if head.ndim != 2 or head.shape[1] != x.shape[-1]:
        raise ValueError(f"fused_head_loss: head {head.shape} must be [vocab, {x.shape[-1]}].")
    if chunk < 1:
        raise ValueError(f"fused_head_loss: chunk must be >= 1, got {chunk}.")
    if impl not in ("xla", "cpu"):
        raise ValueError(f"fused_head_loss: impl={impl!r}; choose \"xla\" or \"cpu\".")
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    length = x.shape[1]
    pad = -length % chunk
    if pad:
        widen = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x, targets, weights = widen(x), widen(targets), widen(weights)
    loss, log_z, target_logit = _head_loss(x, head, targets, weights, float(z_loss), chunk,
                                           impl)
    # Statistics for the metrics only: the loss's gradient is the one above.
    log_z, target_logit = (jax.lax.stop_gradient(v[:, :length]) for v in (log_z, target_logit))
    weights = weights[:, :length]
    weight_sum = jnp.sum(weights)
    mean = lambda v: jnp.sum(v * weights) / jnp.maximum(weight_sum, 1.0)
    metrics = {"cross_entropy": mean(log_z - target_logit),
               "z_loss": mean(z_loss * jnp.square(log_z)), "weight_sum": weight_sum}
    return loss, metrics


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_loss(x, head, targets, weights, z_loss, chunk, impl):
    return _head_loss_fwd(x, head, targets, weights, z_loss, chunk, impl)[0]


def _softmax_grad(logits, targets, g, z_loss):
    """(d_logits, log_z, target_logit) of `sum(g * (log_z - target_logit + z_loss log_z^2))`,
    as `cpu_kernels.softmax_grad` computes them in one pass."""
    log_z, target_logit = _log_z_and_target(logits, targets)
    hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[:, None]
    d_logits = (jnp.exp(logits - log_z[:, None]) * (g * (1.0 + 2.0 * z_loss * log_z))[:, None]
                - jnp.where(hit, g[:, None], 0.0))
    return d_logits, log_z, target_logit


def _head_loss_fwd(x, head, targets, weights, z_loss, chunk, impl):
    batch, length, embed = x.shape
    scale = 1.0 / jnp.maximum(jnp.sum(weights), 1.0)
    softmax_grad = cpu_kernels.softmax_grad if impl == "cpu" else _softmax_grad

    def body(i, carry):
        loss, log_zs, target_logits, dx, d_head_t = carry
        start = i * chunk
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1)
        tokens = take(x).reshape(-1, embed)
        t, w = take(targets).reshape(-1), take(weights).reshape(-1)
        logits = _matmul(tokens, head.T)                                   # [tokens, vocab]
        # d loss / d logits: softmax * dloss/dlog_z, less the weight at the target.
        d_logits, log_z, target_logit = softmax_grad(logits, t, w * scale, z_loss)
        loss = loss + jnp.sum(w * (log_z - target_logit + z_loss * jnp.square(log_z)))
        dx = jax.lax.dynamic_update_slice_in_dim(
            dx, _matmul(d_logits, head).astype(dx.dtype).reshape(batch, chunk, embed), start,
            axis=1)
        # [embed, vocab], transposed once after the loop: as `layers.tied_logits`, a plain
        # product where XLA:CPU would otherwise copy the [tokens, vocab] gradient transposed.
        d_head_t = d_head_t + _matmul(jax.lax.optimization_barrier(tokens.T), d_logits)
        put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v.reshape(batch, chunk),
                                                               start, axis=1)
        return loss, put(log_zs, log_z), put(target_logits, target_logit), dx, d_head_t

    per_position = jnp.zeros((batch, length), jnp.float32)
    init = (jnp.zeros([], jnp.float32), per_position, per_position, jnp.zeros_like(x),
            jnp.zeros((embed, head.shape[0]), jnp.float32))
    loss, log_z, target_logit, dx, d_head_t = jax.lax.fori_loop(0, length // chunk, body, init)
    d_head = d_head_t.T.astype(head.dtype)
    return (loss * scale, log_z, target_logit), (dx, d_head)


def _head_loss_bwd(z_loss, chunk, impl, residuals, cotangents):
    del z_loss, chunk, impl
    dx, d_head = residuals
    g = cotangents[0]  # The per-position statistics leave `fused_head_loss` without gradient.
    return (g * dx).astype(dx.dtype), (g * d_head).astype(d_head.dtype), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def _bound_z_loss() -> float:
    """`cross_entropy_loss.z_loss` as gin binds it, else its default."""
    try:
        return float(gin.query_parameter("cross_entropy_loss.z_loss"))
    except ValueError:
        return inspect.signature(cross_entropy_loss).parameters["z_loss"].default


def head_matrix(config, params: Any) -> jax.Array:
    """The output projection as [vocab, embed] in the compute dtype: the token embedding
    when tied, else the transposed `lm_head` kernel."""
    if config.tie_embeddings:
        table = params["token_embed"]["embedding"]
    else:
        table = params["lm_head"]["kernel"].T
    return table.astype(config.compute_dtype)


def decoder_loss(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                 z_loss: float | None = None, accuracy: bool = True
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of `model` on one batch of the packed feature-converter layout.

    `batch` holds `decoder_input_tokens`, `decoder_target_tokens` and optionally
    `decoder_loss_weights` (default: 1 where the target is not padding),
    `decoder_segment_ids` and `decoder_positions`. `z_loss=None` takes the gin binding
    of `cross_entropy_loss.z_loss`. The loss's backward follows `model.config.custom_grads`.
    `accuracy=False` (the train step) drops the token accuracy from the metrics and lets
    `model.config.loss_chunk` fuse the head into the loss (`fused_head_loss`).
    """
    missing = [k for k in ("decoder_input_tokens", "decoder_target_tokens") if k not in batch]
    if missing:
        raise KeyError(f"decoder_loss: batch lacks {missing}; it has {sorted(batch)}.")
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (targets != 0).astype(jnp.float32)
    inputs = (batch["decoder_input_tokens"], batch.get("decoder_segment_ids"),
              batch.get("decoder_positions"))
    config = model.config
    if config.loss_chunk and not accuracy:
        x = model.apply({"params": params}, *inputs, hidden=True)
        z = _bound_z_loss() if z_loss is None else z_loss
        return fused_head_loss(x.astype(config.compute_dtype), head_matrix(config, params),
                               targets, weights, z, config.loss_chunk, config.loss_impl)
    logits = model.apply({"params": params}, *inputs)
    kwargs = {} if z_loss is None else {"z_loss": z_loss}
    loss, metrics = cross_entropy_loss(logits, targets, weights,
                                       custom_grad=config.custom_grads, **kwargs)
    if not accuracy:
        metrics = {k: v for k, v in metrics.items() if k != "accuracy"}
    return loss, metrics
