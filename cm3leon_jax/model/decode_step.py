"""`DecoderStep`: the decoder's decode path, a `tokens_to_logits` callable for the sampler.

    step = DecoderStep(config)
    weights = step.prepare(params)                 # once: the layout the steps read
    cache = step.init_cache(rows, prompt_len + max_new_tokens)
    logits, cache = step(weights, cache, prompts, segment_ids, positions)   # prefill
    logits, cache = step(weights, cache, next_tokens, ones, positions + 1)  # one token

`logits` are float32[rows, vocab] at each row's last given token. The sampler
(`decode/sampler.py`) only needs this shape of object (`init_cache` and the call; the
`prepare` and `check` hooks are optional), so a stub model, a sharded model or an
imported one plugs in the same way (t5x's `tokens_to_logits`).

Why a decode path beside `Decoder(decode=True)` (which computes the same numbers, and
which the tests hold this one to): generating one token reads every weight and the
cache for a handful of rows, so a step is bound by memory traffic, and the scanned,
stacked layers the training forward wants are the wrong shape for it
(`benchmarks/RESULTS_decode.md`):

* Layers unstacked once (`prepare`), so the loop never slices the stacked `[layers,
  ...]` weights or cache (a slice of the scanned stack is a copy on XLA:CPU: the
  scanned `Decoder` copied the whole cache and every weight once per token).
* Weights kept in the training layout `[in..., out...]`, one layer's slice each. On
  this CPU a one-token product `x @ W` read them 1.4x faster than the transposed
  `[out, in]` layout this path first used (`benchmarks/RESULTS_decode.md`); written as
  multiply-and-reduce instead, XLA:CPU fused the producers (norm, GELU, the
  attention's softmax) into the reduction and recomputed them for every output
  element: 3-5x slower. A tied output head reads the `[vocab, embed]` embedding as it
  is (no transposed copy).
* Cache `[batch, kv_heads, length, head_dim]`, a step's attention reading each head's
  keys contiguously; each step writes its one slot in place (`dynamic_update_slice` on
  the loop carry).
* On CPU, `DecoderStep(config, cpu_kernels=True)` reads each matrix as column tiles
  through an XLA FFI kernel (`cpu_kernels.py`) that streams them at about twice the rate of
  XLA:CPU's dot for a step's few rows, and a one-token step's attention through a second
  kernel that reads only the cache slots each row sees. Off by default: it needs a C++
  compiler on the host (built once, cached) and one device, and its float32 sums run in
  another order than XLA's (the same numbers to about 1e-6).
Several tokens at once (the prefill) use ordinary matmuls and the configured attention
kernel. Parameters and cache carry logical axis names: under a mesh they shard by the
training rules (`partitioning.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.model import attention, cpu_kernels, layers, norms, partitioning
from cm3leon_jax.model.config import DecoderConfig

_NEG = -0.7 * float(np.finfo(np.float32).max)  # jax.nn's fill for masked logits.
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DecoderStep:
    """`Decoder(config)`'s decode path: `(weights, cache, tokens, seg, pos) -> (logits, cache)`.

    Hashable (a frozen dataclass of a frozen config): the sampler caches its compiled loop
    on it. `weights` are `prepare(params)` of the `Decoder`'s params. `cpu_kernels`: run the
    step's products and attention through `cpu_kernels.py` (CPU, one device; see the
    module docstring).
    """

    config: DecoderConfig
    cpu_kernels: bool = False

    # -- weights and cache --------------------------------------------------------------
    def prepare(self, params: Any) -> dict:
        """The Decoder's params -> per-layer weights, matrices `[in..., out...]`.

        Weights this returned pass through unchanged, so a server can prepare once
        (`jax.jit(step.prepare)(params)`) and hand the result to every `sampler.sample`
        call: with `cpu_kernels` that saves the tiles' copy of the weights per call.
        """
        if isinstance(params, dict) and isinstance(params.get("layers"), list):
            return params  # Already this step's layout.
        if self.cpu_kernels:
            cpu_kernels.check_one_cpu_device("DecoderStep(cpu_kernels=True)",
                                             "leave cpu_kernels off here")
        c, p = self.config, nn.unbox(params)
        p = p.get("params", p)
        att, mlp = p["layers"]["attention"], p["layers"]["mlp"]
        # (stacked kernel [layers, in..., out...], the logical names of its in and out axes)
        mats = {"query": (att["query"]["kernel"], ("embed", "heads", "kv")),
                "key": (att["key"]["kernel"], ("embed", "kv_heads", "kv")),
                "value": (att["value"]["kernel"], ("embed", "kv_heads", "kv")),
                "out": (att["out"]["kernel"], ("heads", "kv", "embed")),
                "wo": (mlp["wo"]["kernel"], ("mlp", "embed"))}
        for name in ("wi", "wi_gate", "wi_up"):
            if name in mlp:
                mats[name] = (mlp[name]["kernel"], ("embed", "mlp"))
        vectors = {f"{n}/{k}": (p["layers"][n][k], ("embed",))
                   for n in ("attention_norm", "mlp_norm") for k in ("scale", "bias")
                   if k in p["layers"].get(n, {})}
        vectors.update({f"{n}/{k}": (att[n][k], (axis, "kv")) for n, axis in
                        (("query_norm", "heads"), ("key_norm", "kv_heads"))
                        for k in ("scale", "bias") if k in att.get(n, {})})
        n_in = {"out": 2}
        per_layer = []
        for i in range(c.num_layers):
            w = {}
            for name, (kernel, names) in mats.items():
                w[name] = (self._pack(kernel[i], n_in.get(name, 1)) if self.cpu_kernels else
                           partitioning.with_logical_constraint(kernel[i], names))
            for name, (v, names) in vectors.items():
                w[name] = partitioning.with_logical_constraint(v[i], names)
            per_layer.append(w)
        embed = p["token_embed"]["embedding"]
        out = {"embed": embed, "layers": per_layer,
               "final_norm": p.get("final_norm", {})}
        if c.position_embedding == "learned":
            out["positions"] = p["position_embed"]["embedding"]
        if c.image_grid:
            out["image_places"] = dict(p["image_places"])
        if not c.tie_embeddings:
            out["head"] = partitioning.with_logical_constraint(p["lm_head"]["kernel"],
                                                               ("embed", "vocab"))
        if self.cpu_kernels:  # Tied: a tiled copy of the table's transpose (the lookup keeps it).
            out["head"] = self._pack(out["head"] if "head" in out else embed.T, 1)
        return out

    def _pack(self, kernel, n_in):
        """Tiles in bfloat16 where the step computes or stores in it (the dot's cast), else f32."""
        c = self.config
        bf16 = jnp.dtype(jnp.bfloat16) in (jnp.dtype(c.compute_dtype), jnp.dtype(kernel.dtype))
        return cpu_kernels.pack(kernel.astype(jnp.bfloat16 if bf16 else _F32), n_in)

    def init_cache(self, rows: int, length: int) -> dict:
        """An empty cache for `rows` sequences of at most `length` tokens.

        keys/values: per layer [rows, kv_heads, length, head_dim] (compute dtype);
        segment_ids: int32[rows, length] of the written slots (0: empty or padding);
        index: int32[], the next slot to write;
        image_carry (with DecoderConfig.image_grid): int32[rows], the place in its image
        the next image code takes (layers.image_code_places).
        """
        c = self.config
        if c.position_embedding == "learned" and length > c.max_length:
            raise ValueError(f"init_cache: length={length} exceeds the learned position "
                             f"table (DecoderConfig.max_length={c.max_length}).")
        names = ("batch", "kv_heads", "length", "kv")
        zeros = lambda: partitioning.with_logical_constraint(
                jnp.zeros((rows, c.kv_heads, length, c.dims_per_head), c.compute_dtype), names)
        cache = {"keys": [zeros() for _ in range(c.num_layers)],
                 "values": [zeros() for _ in range(c.num_layers)],
                 "segment_ids": jnp.zeros((rows, length), jnp.int32),
                 "index": jnp.zeros([], jnp.int32)}
        if c.image_grid:
            cache["image_carry"] = jnp.zeros((rows,), jnp.int32)
        return cache

    def select_rows(self, cache: dict, rows: jax.Array) -> dict:
        """The cache of the rows `rows` (int32[n], indices into `cache`'s rows, repeats
        allowed): how rows that share a prompt take its prefill (sampler.sample)."""
        names = ("batch", "kv_heads", "length", "kv")
        take = lambda a: jnp.take(a, rows, axis=0)
        out = {k: take(v) for k, v in cache.items() if k not in ("keys", "values", "index")}
        for k in ("keys", "values"):
            out[k] = [partitioning.with_logical_constraint(take(a), names) for a in cache[k]]
        return {**out, "index": cache["index"]}

    # -- the step -----------------------------------------------------------------------
    def __call__(self, weights: dict, cache: dict, tokens: jax.Array, segment_ids: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict]:
        """tokens, segment_ids, positions: int32[rows, n] -> (float32[rows, vocab], cache).

        Writes the n tokens' keys and values at `cache["index"]`; callers keep
        index + n <= the cache's length (a write past it would be clamped).
        """
        c = self.config
        x = jnp.take(weights["embed"], tokens, axis=0).astype(c.compute_dtype)
        if c.position_embedding == "learned":
            x = x + jnp.take(weights["positions"], positions, axis=0).astype(c.compute_dtype)
        new_cache = {}
        if c.image_grid:
            places, new_cache["image_carry"] = layers.image_code_places(
                tokens, positions, c, cache["image_carry"])
            x = x + layers.embed_image_places(weights["image_places"], places,
                                              c).astype(c.compute_dtype)
        index = cache["index"]
        kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"],
                                              segment_ids.astype(jnp.int32), (0, index))
        keys, values = [], []
        for w, ck, cv in zip(weights["layers"], cache["keys"], cache["values"]):
            x, ck, cv = self._layer(w, x, ck, cv, segment_ids, kv_seg, index, positions)
            keys.append(ck)
            values.append(cv)
        fn = weights["final_norm"]
        x = norms.normalize(x[:, -1:], fn.get("scale"), fn.get("bias"), kind=c.norm,
                            eps=c.norm_eps)
        if c.tie_embeddings and "head" not in weights:  # The [vocab, embed] table as it is.
            logits = jax.lax.dot_general(x[:, 0], weights["embed"].astype(x.dtype),
                                         (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        else:
            logits = project(x, weights["head"], 1, _F32)[:, 0]
        logits = partitioning.with_logical_constraint(logits, ("batch", "vocab"))
        return logits, {"keys": keys, "values": values, "segment_ids": kv_seg,
                        "index": index + tokens.shape[1], **new_cache}

    def _layer(self, w, x, ck, cv, segment_ids, kv_seg, index, positions):
        c = self.config
        norm = lambda y, n: norms.normalize(y, w.get(f"{n}/scale"), w.get(f"{n}/bias"),
                                            kind=c.norm, eps=c.norm_eps)
        h = norm(x, "attention_norm") if c.block_order == "pre" else x
        a, ck, cv = self._attention(w, h, ck, cv, segment_ids, kv_seg, index, positions)
        x = x + (a if c.block_order == "pre" else norm(a, "attention_norm"))
        h = norm(x, "mlp_norm") if c.block_order == "pre" else x
        m = self._mlp(w, h)
        x = x + (m if c.block_order == "pre" else norm(m, "mlp_norm"))
        return partitioning.with_logical_constraint(x, ("batch", "length", "embed")), ck, cv

    def _mlp(self, w, x):
        c = self.config
        act = layers.ACTIVATIONS[c.mlp_activation]
        if c.gated_mlp:
            h = act(project(x, w["wi_gate"], 1, c.compute_dtype)) * \
                project(x, w["wi_up"], 1, c.compute_dtype)
        else:
            h = act(project(x, w["wi"], 1, c.compute_dtype))
        return project(h, w["wo"], 1, c.compute_dtype)

    def _attention(self, w, x, ck, cv, segment_ids, kv_seg, index, positions):
        c = self.config
        q = project(x, w["query"], 1, c.compute_dtype)  # [b, n, heads, head_dim]
        k = project(x, w["key"], 1, c.compute_dtype)
        v = project(x, w["value"], 1, c.compute_dtype)
        if c.qk_norm:
            qk = lambda y, n: norms.normalize(y, w[f"{n}/scale"], w[f"{n}/bias"],
                                              kind="layernorm", eps=c.norm_eps)
            q, k = qk(q, "query_norm"), qk(k, "key_norm")
        if c.position_embedding == "rope":
            q = layers.rotary_embedding(q, positions, c.rope_theta)
            k = layers.rotary_embedding(k, positions, c.rope_theta)
        names = ("batch", "kv_heads", "length", "kv")
        write = lambda cache, new: partitioning.with_logical_constraint(
                _write_slots(cache, jnp.swapaxes(new, 1, 2), index), names)
        ck, cv = write(ck, k), write(cv, v)
        if x.shape[1] == 1:
            out = _one_query_attention(q, ck, cv, segment_ids, kv_seg, index, self.cpu_kernels)
        else:  # Several queries: the configured kernel over the cache's [b, len, h, d] view.
            kernel = attention.get_kernel(c.attention_impl)
            out = kernel(q, jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2), segment_ids,
                         kv_seg, index)
        return project(out, w["out"], 2, c.compute_dtype), ck, cv

    def check(self, prompts: np.ndarray, max_new_tokens: int) -> None:
        """Refuse prompts this model cannot read: ids outside the vocabulary, too long."""
        c = self.config
        if prompts.min() < 0 or prompts.max() >= c.vocab_size:
            raise ValueError(f"prompts hold ids outside [0, {c.vocab_size}) "
                             f"(DecoderConfig.vocab_size); were they made with this model's "
                             "vocabulary?")
        total = prompts.shape[1] + max_new_tokens
        if c.position_embedding == "learned" and total > c.max_length:
            raise ValueError(f"prompt length {prompts.shape[1]} + max_new_tokens "
                             f"{max_new_tokens} = {total} > DecoderConfig.max_length="
                             f"{c.max_length}; shorten the prompts (fewer retrieved "
                             "documents) or generate fewer tokens.")


def project(x: jax.Array, kernel: jax.Array | cpu_kernels.Packed, n_in: int,
            dtype) -> jax.Array:
    """`x: [b, n, *in]` times `kernel: [*in, *out]` -> `[b, n, *out]` in `dtype`.

    One 2-D matmul `[b * n, in] @ [in, out]` (f32 accumulation); through the CPU kernel
    for a `cpu_kernels.Packed` kernel and at most `cpu_kernels.MAX_ROWS` rows.
    """
    b, n = x.shape[:2]
    x2 = x.reshape(b * n, math.prod(x.shape[2:2 + n_in]))
    if isinstance(kernel, cpu_kernels.Packed):
        out_shape = kernel.out_shape
        if b * n <= cpu_kernels.MAX_ROWS:
            return cpu_kernels.matvec(x2, kernel).astype(dtype).reshape((b, n) + out_shape)
        k2 = kernel.unpack()
    else:
        in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
        k2 = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
    y = jax.lax.dot_general(x2, k2.astype(x.dtype), (((1,), (0,)), ((), ())),
                            preferred_element_type=_F32)
    return y.astype(dtype).reshape((b, n) + out_shape)


def _write_slots(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """`new: [b, kv_heads, n, d]` written into the cache at slot `index`, in place.

    A bfloat16 cache is updated through its 16-bit integer view: XLA:CPU widened a bfloat16
    update-slice to float32 and copied the whole cache per layer and step (1.2 of 7 ms a
    step in the decode benchmark's bf16 model, `benchmarks/RESULTS_decode.md`). The bits
    written are the same.
    """
    new = new.astype(cache.dtype)
    if cache.dtype != jnp.bfloat16:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    bits = lambda a, t: jax.lax.bitcast_convert_type(a, t)
    out = jax.lax.dynamic_update_slice(bits(cache, jnp.uint16), bits(new, jnp.uint16),
                                       (0, 0, index, 0))
    return bits(out, jnp.bfloat16)


def _one_query_attention(q, ck, cv, segment_ids, kv_seg, index, cpu_kernel=False):
    """q: [b, 1, heads, d]; cache [b, kv_heads, len, d] -> [b, 1, heads, d].

    Sees the written slots up to `index` of the query's own segment.
    """
    b, _, heads, d = q.shape
    kv_heads, length = ck.shape[1], ck.shape[2]
    q = q.reshape(b, kv_heads, heads // kv_heads, 1, d).astype(_F32) / np.sqrt(d)
    visible = (jnp.arange(length) <= index)[None] & (kv_seg == segment_ids[:, :1])
    if cpu_kernel:
        out = cpu_kernels.one_query_attention(q[:, :, :, 0], ck, cv, visible)
        return out.reshape(b, 1, heads, d).astype(ck.dtype)
    s = jnp.einsum("bhgqd,bhsd->bhgqs", q, ck.astype(_F32))[:, :, :, 0]  # [b, kvh, g, len]
    s = jnp.where(visible[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, cv.astype(_F32))
    return out.reshape(b, 1, heads, d).astype(ck.dtype)
