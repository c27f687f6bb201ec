"""Building blocks of the decoder: norms, projections, MLP, embeddings, RoPE.

Every parameter is created through `_param`, which attaches its logical axis names
(`nn.with_logical_partitioning`), so `partitioning.logical_axes(variables)` can tell
the trainer where each one lives. Every activation that crosses a block boundary is
constrained by logical names with `partitioning.with_logical_constraint`.

Projections use named-axis kernels (for instance the query kernel is `[embed, heads,
kv]`) rather than `nn.Dense` on flattened heads: the head axis then has its own logical
name and shards over `tensor`. The product itself is one 2-D matmul over free reshapes
(merging a sharded major axis with whole minor ones, which needs no communication).

Three backward passes are written by hand (`config.custom_grads`): the norms'
(`norms.py`), the tied output projection's (`tied_logits`) and, in `loss.py`, the
softmax's; each equals autodiff of the plain formulation, which the tests check.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3leon_jax.model import norms, partitioning
from cm3leon_jax.model.config import DecoderConfig

Initializer = Callable[..., jax.Array]


def trunc_normal(std: float) -> Initializer:
    """Normal(0, std) truncated at +-3 std, as `torch.nn.init.trunc_normal_(std, -3std, 3std)`."""
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def _param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
           names: Sequence[str | None], dtype) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32.

    `use_params=False` gives CM3Leon's LayerNorm without learnable parameters.
    `axes` names the normalized array's trailing axes for the parameters' logical
    names (e.g. `("heads", "kv")` for QK-norm, whose scale is per head).
    """

    kind: str = "layernorm"
    use_params: bool = False
    use_bias: bool = True  # LayerNorm only.
    eps: float = 1e-5
    param_shape: tuple[int, ...] | None = None  # None: (x.shape[-1],)
    axes: tuple[str | None, ...] = ("embed",)
    param_dtype: jnp.dtype = jnp.float32
    custom_grad: bool = True  # The one-pass backward of `norms.normalize`.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in norms.KINDS:
            raise ValueError(f"Norm.kind={self.kind!r}; choose one of {norms.KINDS}.")
        scale = bias = None
        if self.use_params:
            shape = self.param_shape or (x.shape[-1],)
            scale = _param(self, "scale", nn.initializers.ones, shape, self.axes, self.param_dtype)
            if self.kind == "layernorm" and self.use_bias:
                bias = _param(self, "bias", nn.initializers.zeros, shape, self.axes,
                              self.param_dtype)
        return norms.normalize(x, scale, bias, kind=self.kind, eps=self.eps,
                               custom_grad=self.custom_grad)


def make_norm(config: DecoderConfig, name: str) -> Norm:
    """The residual-stream norm the config asks for."""
    return Norm(kind=config.norm, use_params=config.norm_params, eps=config.norm_eps,
                param_dtype=config.weight_dtype, custom_grad=config.custom_grads, name=name)


class Projection(nn.Module):
    """`einsum(x, kernel)` with a named kernel of shape `in_shape + out_shape`.

    Contracts the trailing `len(in_shape)` axes of `x` (no bias: CM3Leon has none).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # Logical names of the kernel's axes.
    init: Initializer
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None  # e.g. float32 logits from bf16 inputs (f32 accumulation).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", self.init, self.in_shape + self.out_shape, self.axes,
                        self.param_dtype)
        n_in = len(self.in_shape)
        if x.shape[-n_in:] != self.in_shape:
            raise ValueError(
                f"{self.name}: input trailing shape {x.shape[-n_in:]} != {self.in_shape}."
            )
        # One [tokens, in] x [in, out] matmul: with two free (or contracted) axes XLA:CPU
        # takes the kernel's gradient through transposed copies of the activations, and
        # the GELU MLP's forward + backward ran 2x slower (`benchmarks/RESULTS_train.md`).
        lead = x.shape[:-n_in]
        y = jax.lax.dot_general(x.astype(self.dtype).reshape(-1, math.prod(self.in_shape)),
                                kernel.astype(self.dtype).reshape(math.prod(self.in_shape), -1),
                                (((1,), (0,)), ((), ())), preferred_element_type=self.out_dtype)
        return y.reshape(lead + self.out_shape)


def _normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu(x: jax.Array) -> jax.Array:
    return x * _normal_cdf(x)


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, `x * Phi(x)`, in the erf form, with its derivative `Phi(x) + x phi(x)`
    written out (one pass over the saved input; autodiff of `jax.nn.gelu`'s erfc form
    takes more). The same function as `jax.nn.gelu(approximate=False)` to float rounding."""
    return _gelu(x)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_grad(x, g):
    """g * GELU'(x) = g * (Phi(x) + x phi(x))."""
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return g * (_normal_cdf(x) + x * pdf)


def _gelu_bwd(x, g):
    # Phi(x) afresh from the saved x: behind the barrier XLA cannot merge this erf with the
    # forward's (common subexpressions), which kept the forward's erf as a second
    # [tokens, mlp_dim] activation a layer, written in the forward and read here (64 of
    # the `small` train step's 410 MiB of temporaries; benchmarks/RESULTS_train.md).
    return (_gelu_grad(jax.lax.optimization_barrier(x), g),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
    """`act(x W_in) W_out`, or gated `(act(x W_gate) * x W_up) W_out` (SwiGLU)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        w_init = trunc_normal(c.init_std)
        out_init = nn.initializers.zeros if c.zero_init_output else w_init
        act = (gelu_exact if c.custom_grads and c.mlp_activation == "gelu"
               else ACTIVATIONS[c.mlp_activation])
        up = lambda name: Projection((c.d_model,), (c.mlp_dim,), ("embed", "mlp"), w_init,
                                     name=name, **dense)(x)
        h = act(up("wi_gate")) * up("wi_up") if c.gated_mlp else act(up("wi"))
        h = partitioning.with_logical_constraint(h, ("batch", "length", "mlp"))
        return Projection((c.mlp_dim,), (c.d_model,), ("mlp", "embed"), out_init, name="wo",
                          **dense)(h)


class Embed(nn.Module):
    """The token embedding table `[vocab, embed]`; also the tied output projection."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embedding = _param(self, "embedding", trunc_normal(c.init_std),
                                (c.vocab_size, c.d_model), ("vocab", "embed"), c.weight_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32[batch, length] -> [batch, length, embed]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [batch, length, embed] -> float32 logits [batch, length, vocab] (tied head)."""
        dtype = self.config.compute_dtype
        x, embedding = x.astype(dtype), self.embedding.astype(dtype)
        if self.config.custom_grads:
            return tied_logits(x, embedding)
        return _logits(x, embedding)


def _logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    return jnp.einsum("ble,ve->blv", x, embedding, preferred_element_type=jnp.float32)


@jax.custom_vjp
def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """float32 `x @ embedding^T`: x [batch, length, embed], embedding [vocab, embed].

    The backward is written out for the embedding's gradient: autodiff takes it as
    `[vocab, embed]` straight from the [tokens, vocab] logits gradient, which XLA:CPU
    runs through a transposed copy of that gradient (or as a slow transposed-operand
    matmul). Here it is `x^T @ d_logits` (a plain matmul after a transposed copy of the
    small `x`), transposed after; the barriers stop XLA from folding either transpose
    back into the product. The same gradients up to float rounding; the head's forward
    + backward ~12% faster on a CPU (`benchmarks/RESULTS_train.md`).
    """
    return _logits(x, embedding)


def _tied_logits_fwd(x, embedding):
    return _logits(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals, d_logits):
    x, embedding = residuals
    tokens = x.reshape(-1, x.shape[-1])
    d_logits = d_logits.reshape(-1, d_logits.shape[-1])
    # As autodiff does: the float32 gradient meets the operands in their own dtype.
    matmul = lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
    dx = matmul(d_logits, embedding).reshape(x.shape)
    barrier = jax.lax.optimization_barrier
    d_emb = barrier(matmul(barrier(tokens.T), d_logits)).T  # [embed, vocab] -> [vocab, embed]
    return dx.astype(x.dtype), d_emb.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class LearnedPositions(nn.Module):
    """Absolute position embeddings `[max_length, embed]`, looked up by per-segment position."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions: int32[batch, length] -> [batch, length, embed]."""
        c = self.config
        table = _param(self, "embedding", trunc_normal(c.position_init_std),
                       (c.max_length, c.d_model), ("length", "embed"), c.weight_dtype)
        return jnp.take(table, positions, axis=0).astype(c.compute_dtype)


def image_code_places(tokens: jax.Array, positions: jax.Array, config: DecoderConfig,
                      carry: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Each token's place in its image's code grid, from the ids alone.

    A run of image codes that follows anything but a CM3 sentinel (a `<break>`, an
    `<eos>`, padding) or starts a segment (position 0) is an image from its first code:
    its codes take places 0, 1, ... in raster order. Codes after a sentinel (an infilled
    span), past the grid, and every other token get `grid**2`: no place.

    Args:
      tokens, positions: int32[batch, n] (positions restart at 0 in each segment).
      carry: int32[batch], the place the next code would take after the tokens before
        these (-1: none), so a sequence fed in pieces gets the places it gets whole.
        None: these tokens start their rows.
    Returns: (int32[batch, n] places, int32[batch] the carry after them).
    """
    c, n = config, tokens.shape[1]
    cells = c.image_grid * c.image_grid
    is_code = (tokens >= c.image_code_ids[0]) & (tokens < c.image_code_ids[1])
    is_sentinel = (tokens >= c.sentinel_ids[0]) & (tokens < c.sentinel_ids[1])
    at = jnp.arange(1, n + 1, dtype=jnp.int32)[None]  # 1-based: 0 means "none yet"
    # The latest boundary before each code, as 4 * (1-based index) + 1 for a sentinel: a
    # non-code token is one; a code that starts its segment has one just before it.
    key = jnp.where(~is_code, 4 * at + is_sentinel,
                    jnp.where(positions == 0, 4 * at - 2, 0))
    last = jax.lax.cummax(key, axis=1)
    if carry is None:
        carry = jnp.zeros(tokens.shape[:1], jnp.int32)  # A row's start: images from 0.
    place = jnp.where(last > 0, at - (last + 1) // 4 - 1, carry[:, None] + at - 1)
    placed = is_code & jnp.where(last > 0, last % 4 != 1, carry[:, None] >= 0)
    places = jnp.where(placed & (place < cells), place, cells)
    next_carry = jnp.where(is_code[:, -1], jnp.where(placed[:, -1], place[:, -1] + 1, -1),
                           jnp.where(is_sentinel[:, -1], -1, 0))
    return places, next_carry.astype(jnp.int32)


class ImagePlaces(nn.Module):
    """A learned row and column embedding `[grid, embed]` each, added to the image codes
    with a place (`image_code_places`); zero for every other token. With
    `image_next_place`, a second pair embeds the place of the code each one predicts."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, places: jax.Array) -> jax.Array:
        """places: int32[batch, length] -> [batch, length, embed]."""
        c = self.config
        init = trunc_normal(c.init_std)
        rows = _param(self, "rows", init, (c.image_grid, c.d_model), (None, "embed"),
                      c.weight_dtype)
        cols = _param(self, "cols", init, (c.image_grid, c.d_model), (None, "embed"),
                      c.weight_dtype)
        tables = {"rows": rows, "cols": cols}
        if c.image_next_place:
            for name in ("next_rows", "next_cols"):
                tables[name] = _param(self, name, init, (c.image_grid, c.d_model),
                                      (None, "embed"), c.weight_dtype)
        return embed_image_places(tables, places, c).astype(c.compute_dtype)


def embed_image_places(tables: dict, places: jax.Array, config: DecoderConfig) -> jax.Array:
    """The `ImagePlaces` sum from its tables (`rows`, `cols`, and with
    `image_next_place` `next_rows`, `next_cols`: the place after each code's own; none
    after an image's last code)."""
    grid = config.image_grid
    out = image_place_embedding(tables["rows"], tables["cols"], places, grid)
    if config.image_next_place:
        cells = grid * grid
        following = jnp.where(places < cells - 1, places + 1, cells)
        out = out + image_place_embedding(tables["next_rows"], tables["next_cols"],
                                          following, grid)
    return out


def image_place_embedding(rows: jax.Array, cols: jax.Array, places: jax.Array,
                          grid: int) -> jax.Array:
    """rows, cols: [grid, embed] -> rows[place // grid] + cols[place % grid], 0 where
    place == grid**2 (no place)."""
    placed = (places < grid * grid)[..., None]
    safe = jnp.minimum(places, grid * grid - 1)
    out = jnp.take(rows, safe // grid, axis=0) + jnp.take(cols, safe % grid, axis=0)
    return jnp.where(placed, out, jnp.zeros((), out.dtype))


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate `x: [batch, length, heads, head_dim]` by `positions: int32[batch, length]`.

    Rotate-half convention (dims i and i + head_dim/2 form a pair), matching
    `transformers`' Llama and Chameleon, so their weights need no permutation.
    Computed in float32.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
