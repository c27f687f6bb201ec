"""`Decoder`: the decoder-only transformer of CM3Leon and its successor.

    config = DecoderConfig()                      # gin fills it from gin_configs/models/*.gin
    model = Decoder(config)
    variables = model.init(rng, tokens)           # params carry logical axis names
    logits = model.apply(variables, tokens, segment_ids, positions)   # f32[b, l, vocab]

Packed inputs follow the feature converter (`train/feature_converter.py`): tokens of
several documents share a row; `segment_ids` (1, 2, ...; 0 = padding) keep attention
inside a document and `positions` restart at 0 in each one. With
`DecoderConfig.image_grid`, image codes also get a row and a column embedding, placed
from the ids alone (`layers.image_code_places`; in the cache when decoding).

Layers are one `nn.scan` over a single block (parameters stacked on a leading
`layers` axis): compile time and HLO size stay flat in depth, which is what lets the
7B/34B configs compile ahead of time on a CPU host (`scan_unroll` trades that back for
speed on small CPU models). Remat wraps the scanned block.

Decoding (see `attention.py` for the cache)::

    cache = init_cache(model, batch_size, max_length)
    logits, vars = model.apply({"params": p, "cache": cache}, prompt, seg, pos,
                               decode=True, mutable=["cache"])          # prefill
    logits, vars = model.apply({"params": p, "cache": vars["cache"]}, next_tok, seg1, pos1,
                               decode=True, mutable=["cache"])          # one step
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3leon_jax.model import (
    attention,
    attention_chunked,  # noqa: F401  (registers the "chunked" kernel)
    layers,
    partitioning,
)
from cm3leon_jax.model.config import DecoderConfig

_REMAT_POLICIES = {
    "full": None,  # Save nothing but the block's input.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_RESIDUAL = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
    """One layer: attention then MLP, each in a residual branch, pre- or swin-norm."""

    config: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
                 positions: jax.Array) -> tuple[jax.Array, None]:
        c = self.config
        attn = attention.Attention(c, self.decode, name="attention")
        mlp = layers.Mlp(c, name="mlp")
        attn_norm, mlp_norm = layers.make_norm(c, "attention_norm"), layers.make_norm(c, "mlp_norm")
        if c.block_order == "pre":
            x = x + attn(attn_norm(x), segment_ids, positions)
            x = x + mlp(mlp_norm(x))
        else:  # swin: normalize each branch's output instead of its input.
            x = x + attn_norm(attn(x, segment_ids, positions))
            x = x + mlp_norm(mlp(x))
        return partitioning.with_logical_constraint(x, _RESIDUAL), None


class Decoder(nn.Module):
    """tokens int32[batch, length] -> logits float32[batch, length, vocab]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, *, decode: bool = False,
                 hidden: bool = False) -> jax.Array:
        """Args:
            tokens: int32[batch, length] input ids.
            segment_ids: int32[batch, length]; tokens attend only within their segment
                (0 marks padding). None: the whole row is one segment.
            positions: int32[batch, length], position of each token in its segment.
                None: 0..length-1 (required when decoding).
            decode: read and extend the KV cache (collection "cache"; pass
                `mutable=["cache"]`).
            hidden: return the final norm's output [batch, length, embed] instead of
                the logits (the fused training loss applies the head itself,
                `loss.fused_head_loss`).
        """
        c = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Decoder: tokens must be int[batch, length]; got {tokens.dtype}"
                             f"{list(tokens.shape)}.")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and arr.shape != tokens.shape:
                raise ValueError(
                    f"Decoder: {name} shape {arr.shape} != tokens shape {tokens.shape}."
                )
        if positions is None:
            if decode and not self.is_initializing():
                raise ValueError("Decoder(decode=True) needs explicit positions: the index of "
                                 "each new token in its segment.")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if not decode and tokens.shape[1] > c.max_length:
            raise ValueError(f"Decoder: length {tokens.shape[1]} > DecoderConfig.max_length="
                             f"{c.max_length}.")

        embed = layers.Embed(c, name="token_embed")
        x = embed(tokens)
        if c.position_embedding == "learned":
            x = x + layers.LearnedPositions(c, name="position_embed")(positions)
        if c.image_grid:
            places = self._image_places(tokens, positions, decode)
            x = x + layers.ImagePlaces(c, name="image_places")(places)
        x = partitioning.with_logical_constraint(x, _RESIDUAL)

        block = DecoderBlock
        if c.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                        length=c.num_layers, unroll=min(c.scan_unroll, c.num_layers),
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(c, decode, name="layers")(x, segment_ids, positions)
        x = layers.make_norm(c, "final_norm")(x)
        if hidden:
            return x
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers.Projection((c.d_model,), (c.vocab_size,), ("embed", "vocab"),
                                       layers.trunc_normal(c.init_std), dtype=c.compute_dtype,
                                       param_dtype=c.weight_dtype, out_dtype=jnp.float32,
                                       name="lm_head")(x)
        return partitioning.with_logical_constraint(logits.astype(jnp.float32),
                                                    ("batch", "length", "vocab"))

    def _image_places(self, tokens: jax.Array, positions: jax.Array, decode: bool) -> jax.Array:
        """layers.image_code_places; when decoding, the carry between calls lives in the
        cache ("image_carry": the place the next code takes, -1 none)."""
        if not decode:
            return layers.image_code_places(tokens, positions, self.config)[0]
        carry = self.variable("cache", "image_carry", jnp.zeros, tokens.shape[:1], jnp.int32)
        places, after = layers.image_code_places(tokens, positions, self.config, carry.value)
        if not self.is_initializing():
            carry.value = after
        return places


def abstract_variables(config: DecoderConfig, batch: int = 1, length: int = 1,
                       decode: bool = False):
    """Shapes (and logical names, boxed) of the variables, without allocating any."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.eval_shape(lambda t: Decoder(config).init(jax.random.key(0), t, decode=decode),
                          tokens)


def count_params(config: DecoderConfig) -> int:
    """Number of parameters, from `jax.eval_shape` (nothing is allocated)."""
    params = nn.unbox(abstract_variables(config)["params"])
    return sum(int(x.size) for x in jax.tree.leaves(params))


def init_cache(model: Decoder, batch_size: int, max_length: int):
    """An empty KV cache (collection "cache") for `batch_size` rows of `max_length` tokens."""
    if max_length > model.config.max_length and model.config.position_embedding == "learned":
        raise ValueError(f"init_cache: max_length={max_length} exceeds the learned position "
                         f"table (DecoderConfig.max_length={model.config.max_length}).")
    shapes = abstract_variables(model.config, batch_size, max_length, decode=True)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))
