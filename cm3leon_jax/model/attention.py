"""Self-attention: projections, QK-norm, RoPE, the kernel seam and the KV cache.

The kernel seam
---------------
The softmax(QK^T)V part is a plain function looked up by name in `KERNELS`
(`DecoderConfig.attention_impl`), with one signature for every backend::

    kernel(query:  [batch, q_len, heads, head_dim],
           key:    [batch, kv_len, kv_heads, head_dim],
           value:  [batch, kv_len, kv_heads, head_dim],
           query_segment_ids: int32[batch, q_len] | None,
           kv_segment_ids:    int32[batch, kv_len] | None,
           query_offset: int32[]  # kv index of the first query (0 unless decoding)
           ) -> [batch, q_len, heads, head_dim]

Semantics: causal in kv index (query i sees kv slots <= query_offset + i) and, when
segment ids are given, only slots of its own segment. Segment ids, not a dense mask,
cross the seam so that block-sparse kernels (TPU splash attention's `SegmentIds`,
cuDNN's packed layouts) can skip whole blocks. "xla" and "cudnn" both go through
`jax.nn.dot_product_attention`; "chunked" (`attention_chunked.py`, registered when the
decoder is imported) skips the causal upper half in query chunks and has a hand-written
backward; "cpu" (`cpu_kernels.flash_attention`) runs FlashAttention's loops in C++ (built on
first use with the host's g++), the fastest on a CPU (`benchmarks/RESULTS_train.md`), and
hands a traced offset to "xla"; a TPU Pallas/splash kernel is added with
`register_kernel("splash", fn)` and selected in gin with
`DecoderConfig.attention_impl = "splash"`; nothing else changes.

The KV cache
------------
With `decode=True` the module keeps, per layer, `cached_key`/`cached_value` `[batch, max_len,
kv_heads, head_dim]`, the `cached_segment_ids` of the slots and a scalar `cache_index`
(next free slot, shared by the batch: rows of different prompt lengths are
left-padded with segment id 0, which no real token attends to). The cache's length
is the length of the tokens given to `init` (see `decoder.init_cache`). A call
writes its `q_len` new keys at `index` and attends over the whole cache; the causal
rule hides slots not yet written.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3leon_jax.model import layers, partitioning
from cm3leon_jax.model.config import DecoderConfig

Kernel = Callable[..., jax.Array]


def attention_mask(query_len: int, kv_len: int, query_segment_ids: jax.Array | None,
                   kv_segment_ids: jax.Array | None, query_offset) -> jax.Array:
    """bool[batch or 1, 1, q_len, kv_len]: causal in kv index, within a segment."""
    q_idx = query_offset + jnp.arange(query_len, dtype=jnp.int32)
    causal = jnp.arange(kv_len, dtype=jnp.int32)[None, :] <= q_idx[:, None]
    mask = causal[None, None]
    if query_segment_ids is not None:
        same = query_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = jnp.logical_and(mask, same[:, None])
    return mask


def _jax_nn_kernel(implementation: str) -> Kernel:
    def kernel(query, key, value, query_segment_ids, kv_segment_ids, query_offset):
        plain_causal = (query_segment_ids is None and isinstance(query_offset, int)
                        and query_offset == 0 and query.shape[1] == key.shape[1])
        if plain_causal:  # Lets cuDNN use its built-in causal mask.
            return jax.nn.dot_product_attention(query, key, value, is_causal=True,
                                                implementation=implementation)
        mask = attention_mask(query.shape[1], key.shape[1], query_segment_ids, kv_segment_ids,
                              query_offset)
        return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                            implementation=implementation)
    return kernel


def _cpu_kernel(query, key, value, query_segment_ids, kv_segment_ids, query_offset):
    """FlashAttention loops in C++ (`cpu_kernels.flash_attention`) for a static offset
    (training, a prefill from slot 0); a traced offset (the Decoder's own KV cache) goes
    through the "xla" kernel."""
    if not isinstance(query_offset, int):
        return KERNELS["xla"](query, key, value, query_segment_ids, kv_segment_ids,
                              query_offset)
    from cm3leon_jax.model import cpu_kernels  # Builds the kernels on first use.
    return cpu_kernels.flash_attention(query, key, value, query_segment_ids, kv_segment_ids,
                                       query_offset)


KERNELS: dict[str, Kernel] = {
    "xla": _jax_nn_kernel("xla"),
    "cudnn": _jax_nn_kernel("cudnn"),
    "cpu": _cpu_kernel,
}


def register_kernel(name: str, kernel: Kernel) -> None:
    """Make `kernel` selectable as `DecoderConfig.attention_impl = name` (see module doc)."""
    KERNELS[name] = kernel


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"DecoderConfig.attention_impl={name!r} is not a registered attention "
                         f"kernel; known: {sorted(KERNELS)}. Register new ones with "
                         "cm3leon_jax.model.attention.register_kernel.")
    return KERNELS[name]


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with no biases."""

    config: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
                 positions: jax.Array) -> jax.Array:
        """x: [batch, length, embed]; segment_ids, positions: int32[batch, length]."""
        c = self.config
        n, kvh, hd = c.num_heads, c.kv_heads, c.dims_per_head
        dense = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        w_init = layers.trunc_normal(c.init_std)
        out_init = nn.initializers.zeros if c.zero_init_output else w_init
        proj = lambda heads, axis, name: layers.Projection(
                (c.d_model,), (heads, hd), ("embed", axis, "kv"), w_init, name=name, **dense)(x)
        q, k, v = (
            proj(n, "heads", "query"),
            proj(kvh, "kv_heads", "key"),
            proj(kvh, "kv_heads", "value"),
        )

        if c.qk_norm:  # Chameleon: per-head LayerNorm with per-head scale and bias.
            qk = lambda heads, axis, name: layers.Norm(
                    kind="layernorm", use_params=True, eps=c.norm_eps, param_shape=(heads, hd),
                    axes=(axis, "kv"), param_dtype=c.weight_dtype, custom_grad=c.custom_grads,
                    name=name)
            q, k = qk(n, "heads", "query_norm")(q), qk(kvh, "kv_heads", "key_norm")(k)
        if c.position_embedding == "rope":
            q = layers.rotary_embedding(q, positions, c.rope_theta)
            k = layers.rotary_embedding(k, positions, c.rope_theta)

        q = partitioning.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = partitioning.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
        v = partitioning.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))

        if self.decode and segment_ids is None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        kv_segment_ids, offset = segment_ids, 0
        if self.decode:
            k, v, kv_segment_ids, offset = self._update_cache(k, v, segment_ids)
        out = get_kernel(c.attention_impl)(q, k, v, segment_ids, kv_segment_ids, offset)
        out = partitioning.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return layers.Projection((n, hd), (c.d_model,), ("heads", "kv", "embed"), out_init,
                                 name="out", **dense)(out)

    def _update_cache(self, k: jax.Array, v: jax.Array, segment_ids: jax.Array):
        """Write this call's keys/values at `index`; return the whole cache to attend over."""
        b, length = k.shape[:2]
        initializing = not self.has_variable("cache", "cached_key")
        names = ("batch", "length", "kv_heads", "kv")
        boxed = lambda shape, dtype, axes: nn.with_logical_partitioning(
                lambda: jnp.zeros(shape, dtype), axes)
        ck = self.variable("cache", "cached_key", boxed(k.shape, k.dtype, names))
        cv = self.variable("cache", "cached_value", boxed(v.shape, v.dtype, names))
        cs = self.variable(
            "cache", "cached_segment_ids", boxed((b, length), jnp.int32, ("batch", "length"))
        )
        ci = self.variable("cache", "cache_index", boxed((), jnp.int32, ()))
        if initializing:  # `init` only sizes the cache: its length is this call's length.
            return k, v, segment_ids, 0
        max_len = ck.value.shape[1]
        if length > max_len or ck.value.shape[0] != b:
            raise ValueError(f"KV cache holds [batch={ck.value.shape[0]}, length={max_len}]; got "
                             f"a call with batch={b}, length={length}. Re-create it with "
                             "decoder.init_cache for this batch size and a longer max_length.")
        index = ci.value
        # Writes past max_len would be clamped by dynamic_update_slice, silently
        # overwriting the tail: callers must keep index + length <= max_len.
        ck.value = partitioning.with_logical_constraint(
            jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, index, 0, 0)),
            names,
        )
        cv.value = partitioning.with_logical_constraint(
            jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, index, 0, 0)),
            names,
        )
        cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids.astype(jnp.int32), (0, index))
        ci.value = index + length
        return ck.value, cv.value, cs.value, index
