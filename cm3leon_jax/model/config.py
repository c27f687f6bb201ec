"""`DecoderConfig`: every switch of the one decoder, CM3Leon and its successor alike.

The defaults are the CM3Leon paper's choices (OPT-like pre-LN, LayerNorm without
parameters, GELU MLP, learned absolute positions, no biases anywhere, no dropout,
truncated-normal init with std 0.006, zero-initialized output projections). The
successor (Chameleon) is the same code with other switches::

    DecoderConfig(norm="rmsnorm", mlp_activation="silu", gated_mlp=True,
                  position_embedding="rope", qk_norm=True, tie_embeddings=False,
                  block_order="swin"  # 34B only
                  )

Sizes live in `gin_configs/models/*.gin`; bind fields there as `DecoderConfig.x = ...`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import gin
import jax.numpy as jnp

from cm3leon_jax.errors import UserInputError

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
POSITION_EMBEDDINGS = ("learned", "rope")
BLOCK_ORDERS = ("pre", "swin")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LOSS_IMPLS = ("xla", "cpu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and switches of `Decoder`.

    Sizes:
        vocab_size: rows of the embedding (a multiple of 128 shards evenly).
        num_layers, d_model: depth and width.
        num_heads: query heads. num_kv_heads: key/value heads (None: = num_heads;
            fewer: grouped-query attention; must divide num_heads).
        head_dim: None means d_model // num_heads.
        mlp_dim: hidden width of the MLP (4 * d_model for CM3Leon).
        max_length: longest sequence; the learned position table has this many rows
            and the KV cache is at most this long.
    Architecture switches:
        norm: "layernorm" or "rmsnorm". norm_params: whether norms have a learnable
            scale (and, for LayerNorm, bias). CM3Leon: LayerNorm without parameters.
        norm_eps: epsilon of every norm (1e-5 in OPT and Chameleon).
        block_order: "pre" (`h = x + f(norm(x))`) or "swin" (`h = x + norm(f(x))`,
            Chameleon 34B; keeps the residual stream's growth in check).
        mlp_activation: "gelu" (exact erf, as OPT's), "gelu_tanh", "relu", "silu".
        gated_mlp: `act(x W_gate) * (x W_up)` (SwiGLU with silu) instead of `act(x W_in)`.
        position_embedding: "learned" (absolute, added to the token embedding) or
            "rope" (rotary, rotate-half convention as in `transformers`' Llama/Chameleon).
        rope_theta: RoPE base.
        image_grid: side of an image's code grid (8 for 64 codes); > 0 adds a learned row
            and column embedding to every image code whose place in its image is known
            (layers.image_code_places), as DALL-E did for its image tokens. Not in the
            paper: a sequence-only position table leaves a small decoder to infer each
            code's row and column from its distance to the image's start. 0: off.
        image_next_place: with image_grid, a second learned row and column embedding
            of the place the *next* code takes (the code this position predicts), added
            to every placed code but an image's last. A head can then find the code at
            that place in an earlier image (an edit's source, a retrieved image) by
            matching one place against another, instead of learning the raster step
            from row and column. Not in the paper.
        image_code_ids: [start, stop) of the image codes' ids (IdLayout.image_start and
            used_size); sentinel_ids: [start, stop) of the CM3 sentinels' ids (a run of
            codes after a sentinel is an infilled span of unknown place).
        qk_norm: LayerNorm over each head's query and key vectors, with a per-head
            scale and bias (Chameleon's QK-norm), before RoPE.
        tie_embeddings: the output projection is the transposed token embedding.
    Initialization:
        init_std: std of the (untruncated) normal, truncated at 3 std, for every
            matrix and the token embedding (0.006 in the paper).
        position_init_std: same, for the learned position table (0.0002).
        zero_init_output: attention-output and MLP-output projections start at 0,
            so each block starts as the identity.
    Numerics and memory:
        dtype: activation/compute dtype ("float32" or "bfloat16"); params stay in
            param_dtype. Norms, softmax and logits are computed in float32.
        remat_policy: what the backward pass keeps per layer: "none" (everything),
            "full" (only the layer input), "dots" (matmul outputs),
            "dots_no_batch" (matmuls without a batch dim: the weights' products).
        scan_unroll: layers per iteration of the layer scan; `num_layers` unrolls it
            (no loop: the per-layer saved activations need no stacked buffers, which
            XLA:CPU zero-fills and copies every step; compile time grows with depth,
            so only small models on a CPU set it, e.g. `small.gin`).
        attention_impl: name of the attention kernel (`attention.KERNELS`): "xla",
            "cudnn", or one registered with `attention.register_kernel` (a TPU
            Pallas/splash kernel goes there), or "chunked" (`attention_chunked.py`:
            causal query chunks and a hand-written backward; the fastest on a CPU).
        custom_grads: norms, the tied output projection, the exact GELU and the loss's
            softmax use hand-written backward passes (`norms.py`, `layers.tied_logits`,
            `layers.gelu_exact`, `loss.log_z_and_target`): the same gradients as
            autodiff in fewer passes over memory. False: plain autodiff (the reference the
            tests compare with).
        loss_chunk: the training loss applies the output projection and the
            cross-entropy this many positions at a time (`loss.fused_head_loss`) and
            takes the head's gradients in the same pass, so neither the [batch, length,
            vocab] logits nor their gradient is ever stored: at the paper's 65,536 ids
            that is 0.5 MiB a token. 0: the whole logits at once (the eval step always).
        loss_impl: how `loss_chunk`'s chunks take the softmax and the logits' gradient:
            "xla" (jnp, any backend) or "cpu" (`cpu_kernels.softmax_grad`, C++, one CPU
            device: one pass over each chunk's logits where XLA:CPU's fusions made five).
    """

    vocab_size: int = 65536
    num_layers: int = 24
    d_model: int = 1024
    num_heads: int = 16
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int = 4096
    max_length: int = 4096

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_params: bool = False
    norm_eps: float = 1e-5
    block_order: Literal["pre", "swin"] = "pre"
    mlp_activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    gated_mlp: bool = False
    position_embedding: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    image_grid: int = 0
    image_next_place: bool = False
    image_code_ids: tuple[int, int] = (0, 0)
    sentinel_ids: tuple[int, int] = (0, 0)
    qk_norm: bool = False
    tie_embeddings: bool = True

    init_std: float = 0.006
    position_init_std: float = 0.0002
    zero_init_output: bool = True

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_impl: str = "xla"
    custom_grads: bool = True
    loss_chunk: int = 0
    loss_impl: Literal["xla", "cpu"] = "xla"

    def __post_init__(self):
        for name in ("image_code_ids", "sentinel_ids"):  # JSON (an export's manifest) and
            object.__setattr__(self, name, tuple(getattr(self, name)))  # gin give lists
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "max_length",
                     "scan_unroll"):
            if getattr(self, name) < 1:
                raise UserInputError(f"DecoderConfig.{name} must be >= 1, got "
                                     f"{getattr(self, name)}.")
        for name in ("num_kv_heads", "head_dim"):  # None: derived from num_heads, d_model.
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserInputError(f"DecoderConfig.{name} must be >= 1 (or None), got "
                                     f"{getattr(self, name)}.")
        for name in ("image_code_ids", "sentinel_ids"):
            if len(getattr(self, name)) != 2:
                raise UserInputError(f"DecoderConfig.{name} must be a [start, stop) pair of "
                                     f"ids, got {getattr(self, name)}.")
        if not self.norm_eps > 0 or (self.position_embedding == "rope"
                                     and not self.rope_theta > 0):
            raise UserInputError(f"DecoderConfig: norm_eps={self.norm_eps} and rope_theta="
                                 f"{self.rope_theta} must be > 0.")
        if self.loss_chunk < 0:
            raise UserInputError(f"DecoderConfig.loss_chunk must be >= 0 (0: off), got "
                                 f"{self.loss_chunk}.")
        choices = {"norm": NORMS, "mlp_activation": ACTIVATIONS,
                   "position_embedding": POSITION_EMBEDDINGS, "block_order": BLOCK_ORDERS,
                   "remat_policy": REMAT_POLICIES, "dtype": tuple(DTYPES),
                   "param_dtype": tuple(DTYPES), "loss_impl": LOSS_IMPLS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"DecoderConfig.{name}={getattr(self, name)!r}; "
                                     f"choose one of {allowed}.")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise UserInputError(f"DecoderConfig: d_model={self.d_model} is not divisible by "
                                 f"num_heads={self.num_heads}; set head_dim explicitly.")
        if self.num_heads % self.kv_heads:
            raise UserInputError(f"DecoderConfig: num_heads={self.num_heads} must be a multiple of "
                                 f"num_kv_heads={self.num_kv_heads} (grouped-query attention).")
        if self.image_grid < 0 or (self.image_grid and not
                                   0 <= self.image_code_ids[0] < self.image_code_ids[1]
                                   <= self.vocab_size):
            raise UserInputError(
                f"DecoderConfig: image_grid={self.image_grid} needs image_code_ids = [start, "
                f"stop) of the image codes' ids inside the vocabulary, got "
                f"{self.image_code_ids} (vocab_size {self.vocab_size}); image_grid = 0 is off.")
        if self.image_next_place and not self.image_grid:
            raise UserInputError("DecoderConfig: image_next_place=True needs image_grid > 0 (the "
                                 "places it embeds); set image_grid or drop image_next_place.")
        if self.position_embedding == "rope" and self.dims_per_head % 2:
            raise UserInputError(
                f"DecoderConfig: RoPE needs an even head_dim, got {self.dims_per_head}."
            )

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dims_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def vocabulary_mismatch(self, layout: Any) -> str | None:
        """How a vocabulary's `IdLayout` (vocab/layout.py) does not fit this model, or None:
        more ids than the embedding table (an id past it is clamped silently on TPU and
        GPU) or, with `image_grid`, other image-code or sentinel ids or another grid."""
        if layout.vocab_size > self.vocab_size:
            return (f"the vocabulary has {layout.vocab_size} ids but DecoderConfig.vocab_size="
                    f"{self.vocab_size}")
        if self.image_grid:
            want = {"image_code_ids": (layout.image_start, layout.used_size),
                    "sentinel_ids": (layout.sentinel_start, layout.text_start)}
            got = {k: getattr(self, k) for k in want}
            if got != want or self.image_grid ** 2 != layout.image_length:
                return (f"DecoderConfig.image_grid={self.image_grid}, {got} do not match the "
                        f"vocabulary's {layout.image_length} codes per image and {want}")
        return None

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)
