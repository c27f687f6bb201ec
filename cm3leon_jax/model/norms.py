"""LayerNorm and RMSNorm over the last axis, as functions with a one-pass backward.

Autodiff of `(x - mean) * rsqrt(var + eps)` differentiates each of its reductions
separately: several passes over the activations per norm. The backward written out is
one fused expression with two row reductions (in the CPU `small` step XLA fuses either
form into the matmul before it, and the step time did not measurably change;
`benchmarks/RESULTS_train.md`):

    y = x_hat * scale + bias,   x_hat = (x - mean(x)) * r,   r = rsqrt(var + eps)
    g = dy * scale
    dx = r * (g - mean(g) - x_hat * mean(g * x_hat))      # RMSNorm: without mean(g)
    dscale = sum(dy * x_hat),   dbias = sum(dy)           # over every leading axis

`normalize(..., custom_grad=False)` is the plain formulation, kept as the reference
the tests hold the hand-written backward to. Both compute in float32 and return
`x.dtype`. One deliberate difference: a row whose variance overflows to inf (blown-up
activations) gets a NaN dx, where autodiff gives 0 or NaN by accident.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KINDS = ("layernorm", "rmsnorm")


def _center(x: jax.Array, mean: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    return x if mean is None else x - mean


def _stats(x: jax.Array, kind: str, eps: float) -> tuple[jax.Array | None, jax.Array]:
    """(mean, r) of the float32 rows, `r = rsqrt(var + eps)`; mean None for RMSNorm."""
    mean = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True) if kind == "layernorm" else None
    r = jax.lax.rsqrt(jnp.mean(jnp.square(_center(x, mean)), axis=-1, keepdims=True) + eps)
    return mean, r


def _x_hat(x: jax.Array, kind: str, eps: float) -> jax.Array:
    mean, r = _stats(x, kind, eps)
    return _center(x, mean) * r


def _affine(x_hat: jax.Array, scale: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    if scale is not None:
        x_hat = x_hat * scale.astype(jnp.float32)
    if bias is not None:
        x_hat = x_hat + bias.astype(jnp.float32)
    return x_hat


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, scale, bias, kind, eps):
    return _affine(_x_hat(x, kind, eps), scale, bias).astype(x.dtype)


def _fused_fwd(x, scale, bias, kind, eps):
    mean, r = _stats(x, kind, eps)
    y = _affine(_center(x, mean) * r, scale, bias).astype(x.dtype)
    # x, not x_hat: half the bytes in bfloat16; x_hat is recomputed inside the fusion.
    return y, (x, mean, r, scale, bias)


def _fused_bwd(kind, eps, residuals, dy):
    del eps
    x, mean, r, scale, bias = residuals
    x_hat = _center(x, mean) * r
    g = dy.astype(jnp.float32)
    if scale is not None:
        g = g * scale.astype(jnp.float32)
    centered = g - jnp.mean(g, axis=-1, keepdims=True) if kind == "layernorm" else g
    dx = r * (centered - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
    # A variance that overflowed to inf (blown-up activations) gives r = 0, a meaningless
    # all-zero output and dx = 0 here; autodiff gives 0 or NaN (0 * inf) depending on the
    # upstream gradient. Make it NaN, so that the blow-up reaches the trainer's check.
    dx = jnp.where(r > 0, dx, jnp.nan)

    def reduce_to(value, param):  # Sum over the axes the parameter was broadcast along.
        lead = tuple(range(value.ndim - param.ndim))
        return jnp.sum(value, axis=lead).astype(param.dtype)

    d_scale = None if scale is None else reduce_to(dy.astype(jnp.float32) * x_hat, scale)
    d_bias = None if bias is None else reduce_to(dy.astype(jnp.float32), bias)
    return dx.astype(x.dtype), d_scale, d_bias


_fused.defvjp(_fused_fwd, _fused_bwd)


def normalize(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
              kind: str = "layernorm", eps: float = 1e-5, custom_grad: bool = True) -> jax.Array:
    """LayerNorm or RMSNorm of `x: [..., d]` over its last axis, then `* scale + bias`.

    scale, bias: None or broadcastable to the trailing axes of `x` (e.g. `[d]`, or
    `[heads, head_dim]` for a per-head QK-norm). custom_grad: the one-pass backward
    (False: autodiff of the same forward).
    """
    if kind not in KINDS:
        raise ValueError(f"normalize: kind={kind!r}; choose one of {KINDS}.")
    if bias is not None and kind != "layernorm":
        raise ValueError("normalize: RMSNorm has no bias; pass bias=None.")
    if custom_grad:
        return _fused(x, scale, bias, kind, eps)
    return _affine(_x_hat(x, kind, eps), scale, bias).astype(x.dtype)
