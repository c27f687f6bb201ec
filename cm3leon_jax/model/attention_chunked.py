"""The "chunked" attention kernel: causal attention in query chunks, backward by hand.

Same seam, signature and semantics as the "xla" kernel (`attention.py`), including
grouped-query heads, segment ids, `query_offset` and rows with nothing visible (they
get the mean of the values, as `jax.nn.dot_product_attention` gives). Two things make
it cheaper on a CPU, where the [batch, heads, q_len, kv_len] arrays do not fit in cache
and every pass over them costs memory bandwidth:

* Chunks: the queries are cut into chunks of `chunk` rows and chunk i only looks at
  the kv slots a causal query of that chunk can see (`:query_offset + end_i`), so about
  half of the score matrix is neither computed nor stored. Needs a static
  `query_offset` (training, prefill); when decoding it is traced, and the kernel runs
  as one chunk over the whole cache.
* Backward: FlashAttention's identity `dS = P * (dP - D)` with `D = rowsum(dO * O)`, a
  reduction over [.., q_len, head_dim] instead of over the probabilities; and the
  softmax is never divided out: the saved `E = exp(S - max)` and the row factor
  `1 / sum(E)` scale the small [q_len, head_dim] operands instead.

Inside, heads are laid out `[batch, kv_heads, group, length, head_dim]` so that every
product is a plain batched matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.model import attention

CHUNK = 128  # Query rows per chunk: the fastest of 64-512 for the `small` step on a CPU.
_NEG = -0.7 * float(np.finfo(np.float32).max)  # jax.nn's fill for masked logits.
_F32 = dict(preferred_element_type=jnp.float32)


def _spans(q_len: int, kv_len: int, query_offset, chunk: int) -> tuple[tuple[int, int, int], ...]:
    """(q_start, q_end, kv_end) per chunk; one chunk over everything if the offset is traced."""
    if not isinstance(query_offset, (int, np.integer)):
        return ((0, q_len, kv_len),)
    starts = range(0, q_len, chunk)
    return tuple((s, min(s + chunk, q_len), min(kv_len, int(query_offset) + min(s + chunk, q_len)))
                 for s in starts)


def _chunk_mask(span, query_segment_ids, kv_segment_ids, query_offset) -> jax.Array:
    """bool[batch or 1, 1, 1, chunk, kv_end] for the `[b, kv_heads, group, t, s]` layout."""
    q0, q1, kv_end = span
    q_seg = None if query_segment_ids is None else query_segment_ids[:, q0:q1]
    kv_seg = None if kv_segment_ids is None else kv_segment_ids[:, :kv_end]
    mask = attention.attention_mask(q1 - q0, kv_end, q_seg, kv_seg, query_offset + q0)
    return mask[:, :, None]


def _forward(spans, q, k, v, query_segment_ids, kv_segment_ids, query_offset):
    scale = q.shape[-1] ** -0.5
    # A row that sees nothing gets the mean of all values, as with jax.nn's fill value.
    mean_v = jnp.mean(v.astype(jnp.float32), axis=2, keepdims=True)[:, :, None]
    outs, exps, inv_sums, blind = [], [], [], []
    for span in spans:
        q0, q1, kv_end = span
        s = jnp.einsum("bkgth,bksh->bkgts", q[:, :, :, q0:q1], k[:, :, :kv_end], **_F32) * scale
        s = jnp.where(_chunk_mask(span, query_segment_ids, kv_segment_ids, query_offset), s, _NEG)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - row_max)
        sees = row_max > 0.5 * _NEG
        inv_sum = jnp.where(sees, 1.0 / jnp.sum(e, axis=-1, keepdims=True), 0.0)
        o = jnp.einsum("bkgts,bksh->bkgth", e.astype(v.dtype), v[:, :, :kv_end], **_F32)
        outs.append(jnp.where(sees, o * inv_sum, mean_v))
        exps.append(e)
        inv_sums.append(inv_sum)
        blind.append(jnp.logical_not(sees))
    out = jnp.concatenate(outs, axis=3)
    return out.astype(q.dtype), (q, k, v, out, exps, inv_sums, jnp.concatenate(blind, axis=3))


def _sum_over_queries(a: jax.Array, b: jax.Array) -> jax.Array:
    """`sum_{g,t} a[.., g, t, h] * b[.., g, t, s]` -> `[b, kv_heads, h, s]`: dK^T, dV^T.

    Written as `a^T @ b` with the small transpose of `a` materialized (the barrier stops
    XLA from folding it back): as `b^T @ a`, XLA:CPU writes a transposed copy of the
    [chunk, kv_len] operand first.
    """
    batch, kv_heads, group, rows, head_dim = a.shape
    a_t = jax.lax.optimization_barrier(
            a.reshape(batch, kv_heads, group * rows, head_dim).swapaxes(2, 3))
    return jnp.einsum("bkhx,bkxs->bkhs", a_t, b.reshape(batch, kv_heads, group * rows, -1),
                      **_F32)


def _backward(spans, residuals, d_out):
    q, k, v, out, exps, inv_sums, blind = residuals
    scale = q.shape[-1] ** -0.5
    d_out = d_out.astype(jnp.float32)
    row_d = jnp.sum(d_out * out, axis=-1, keepdims=True)  # D = rowsum(dO * O)
    kv_len = k.shape[2]
    # Rows that saw nothing took the mean of all values: d mean / d v = 1 / kv_len.
    blind_dv = jnp.sum(jnp.where(blind, d_out, 0.0), axis=(2, 3))[..., None] / kv_len
    batch, kv_heads, _, head_dim = k.shape
    dq, dk_t, dv_t = [], [], [jnp.broadcast_to(blind_dv, (batch, kv_heads, head_dim, kv_len))]
    for (q0, q1, kv_end), e, inv_sum in zip(spans, exps, inv_sums):
        do = d_out[:, :, :, q0:q1]
        dv_t.append(_sum_over_queries((do * inv_sum).astype(v.dtype), e.astype(v.dtype)))
        dp = jnp.einsum("bkgth,bksh->bkgts", do.astype(v.dtype), v[:, :, :kv_end], **_F32)
        ds = (e * ((dp - row_d[:, :, :, q0:q1]) * (inv_sum * scale))).astype(q.dtype)
        dq.append(jnp.einsum("bkgts,bksh->bkgth", ds, k[:, :, :kv_end], **_F32))
        dk_t.append(_sum_over_queries(q[:, :, :, q0:q1], ds))

    def total(parts):  # [b, kv_heads, h, kv_end_i] each -> [b, kv_heads, kv_len, h]
        padded = [jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, kv_len - p.shape[3]))) for p in parts]
        return jax.lax.optimization_barrier(sum(padded)).swapaxes(2, 3)

    return (jnp.concatenate(dq, axis=3).astype(q.dtype), total(dk_t).astype(k.dtype),
            total(dv_t).astype(v.dtype), None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spans, q, k, v, query_segment_ids, kv_segment_ids, query_offset):
    return _forward(spans, q, k, v, query_segment_ids, kv_segment_ids, query_offset)[0]


_attend.defvjp(_forward, _backward)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      query_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                      query_offset, chunk: int = CHUNK) -> jax.Array:
    """The attention kernel seam's signature (see `attention.py`); `chunk`: query rows per chunk."""
    b, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    q = query.reshape(b, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    spans = _spans(q_len, key.shape[1], query_offset, chunk)
    out = _attend(spans, q, k, v, query_segment_ids, kv_segment_ids, query_offset)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, q_len, heads, head_dim)


attention.register_kernel("chunked", chunked_attention)
