"""A CLIP-style dual encoder in Flax: ViT image tower, causal text tower, projections.

    model = CLIP(ClipConfig.tiny())
    img = model.apply(v, pixels, method=CLIP.encode_image)   # f32[b, s, s, 3] -> f32[b, proj]
    txt = model.apply(v, tokens, lengths, method=CLIP.encode_text)  # int32[b, l] -> f32[b, proj]

The layout follows OpenAI's CLIP (and `transformers`' `CLIPModel`) exactly, so real
weights import one-to-one (`clip_weights.py`): pre-LN blocks with biased
attention and MLP, `quick_gelu`, a class token and pre/post LayerNorms in the image
tower, a causal text tower pooled at its last token (the end-of-text token), bias-free
projections and a learnable log-temperature `logit_scale`.

Embeddings are returned unnormalized; callers L2-normalize (`normalize`). The
retriever is frozen during CM3Leon training, so nothing here is sharded beyond
plain data parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Sizes of both towers. Field names follow `transformers.CLIPConfig`'s meaning.

    `vocab_size` and `eos_token_id` belong to the text tokenizer the weights were
    trained with (49408 / 49407 for OpenAI's BPE; 4096 / 4095 for the tiny model's
    `WordTokenizer`).
    """

    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    eos_token_id: int = 49407
    projection_dim: int = 512
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    # How both towers attend: "xla" (einsums, any device, sharded or not) or "cpu" (the
    # C++ flash kernel of `model/cpu_kernels.py`, forward and backward; one CPU device).
    # Not a property of the weights: an encoder saved from either loads with "xla".
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise UserInputError(f"ClipConfig.image_size={self.image_size} is not a multiple of "
                                 f"patch_size={self.patch_size}; pick sizes that tile the image.")
        for width, heads, tower in ((self.vision_width, self.vision_heads, "vision"),
                                    (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise UserInputError(f"ClipConfig.{tower}_width={width} is not divisible by "
                                     f"{tower}_heads={heads}.")
        if self.attention_impl not in ("xla", "cpu"):
            raise UserInputError(f"ClipConfig.attention_impl={self.attention_impl!r}; use "
                                 "'xla' or 'cpu'.")
        if self.activation not in _ACTIVATIONS:
            raise UserInputError(f"ClipConfig.activation={self.activation!r}; use one of "
                                 f"{sorted(_ACTIVATIONS)}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def vit_b32(cls) -> "ClipConfig":
        """OpenAI's ViT-B/32, the retriever of the CM3Leon paper (151M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "ClipConfig":
        """A 64px model over hashed words that trains in minutes on a CPU (the demo's)."""
        return cls(image_size=64, patch_size=8, vision_width=128, vision_layers=2,
                   vision_heads=4, vision_mlp=256, vocab_size=4096, context_length=32,
                   text_width=128, text_layers=2, text_heads=4, text_mlp=256,
                   eos_token_id=4095, projection_dim=128)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def normalize(x: jax.Array | np.ndarray, axis: int = -1):
    """L2-normalizes rows; a zero row stays zero instead of becoming NaN."""
    xp = jnp if isinstance(x, jax.Array) else np
    norm = xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))
    return x / xp.maximum(norm, 1e-12)


class Attention(nn.Module):
    width: int
    heads: int
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array, causal: bool) -> jax.Array:
        """x: f32[b, l, w]; key_valid: bool[b, l] (False: no query sees that position);
        `causal`: each position sees only itself and the positions before it."""
        head_dim = self.width // self.heads
        split = lambda t: t.reshape(*t.shape[:2], self.heads, head_dim)
        q = split(nn.Dense(self.width, name="q")(x))
        k = split(nn.Dense(self.width, name="k")(x))
        v = split(nn.Dense(self.width, name="v")(x))
        if self.impl == "cpu":
            out = _flash(q, k, v, key_valid, causal)
        else:
            length = x.shape[1]
            mask = key_valid[:, None, :]
            if causal:
                mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
            logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
            out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(self.width, name="out")(out.reshape(x.shape))


def _flash(q, k, v, key_valid: jax.Array, causal: bool) -> jax.Array:
    """The flash kernel's causal-with-segments visibility as CLIP's: every query in segment
    1, valid keys in 1 and the rest in 0; a query offset of the whole length sees every
    key (the kernel scales by 1/sqrt(head_dim) itself)."""
    from cm3leon_jax.model import cpu_kernels

    b, length = key_valid.shape
    return cpu_kernels.flash_attention(q, k, v, jnp.ones((b, length), jnp.int32),
                                       key_valid.astype(jnp.int32), 0 if causal else length)


class EncoderLayer(nn.Module):
    width: int
    heads: int
    mlp: int
    activation: str
    eps: float
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array, causal: bool) -> jax.Array:
        h = nn.LayerNorm(epsilon=self.eps, name="ln_1")(x)
        x = x + Attention(self.width, self.heads, self.attention_impl, name="attn")(
            h, key_valid, causal)
        h = nn.LayerNorm(epsilon=self.eps, name="ln_2")(x)
        h = _ACTIVATIONS[self.activation](nn.Dense(self.mlp, name="fc1")(h))
        return x + nn.Dense(self.width, name="fc2")(h)


def _stack(cfg: ClipConfig, tower: str):
    width, layers, heads, mlp = (getattr(cfg, f"{tower}_{k}")
                                 for k in ("width", "layers", "heads", "mlp"))
    return [EncoderLayer(width, heads, mlp, cfg.activation, cfg.layer_norm_eps,
                         cfg.attention_impl, name=f"layer_{i}") for i in range(layers)]


class VisionTower(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, pixels: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """pixels: f32[b, s, s, 3] (CLIP-normalized); keep: bool[b, patches] or None.

        `keep` drops patches (query dropout) by hiding them from attention; the
        class token is always kept. Returns the pooled f32[b, vision_width].
        """
        cfg = self.cfg
        p, w = cfg.patch_size, cfg.vision_width
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels have shape {pixels.shape}; this CLIP expects "
                             f"[batch, {cfg.image_size}, {cfg.image_size}, 3]. Resize first "
                             "(encoder.preprocess_images).")
        x = nn.Conv(w, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embed")(pixels)
        b = x.shape[0]
        x = x.reshape(b, -1, w)
        cls = self.param("class_embedding", nn.initializers.normal(w ** -0.5), (w,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), x], axis=1)
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (cfg.num_patches + 1, w))
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="pre_ln")(x + pos)
        if keep is None:
            keep = jnp.ones((b, cfg.num_patches), bool)
        key_valid = jnp.concatenate([jnp.ones((b, 1), bool), keep.astype(bool)], axis=1)
        for layer in _stack(cfg, "vision"):
            x = layer(x, key_valid, causal=False)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="post_ln")(x[:, 0])


class TextTower(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens: int32[b, l] right-padded, each ending in eos; lengths: int32[b].

        Causal attention; pooled at position `lengths - 1` (the eos token), which
        is where OpenAI's CLIP pools too. Returns f32[b, text_width].
        """
        cfg = self.cfg
        b, l = tokens.shape
        if l > cfg.context_length:
            raise ValueError(f"text has {l} tokens; this CLIP's context_length is "
                             f"{cfg.context_length}. Truncate in the tokenizer.")
        x = nn.Embed(cfg.vocab_size, cfg.text_width, name="token_embedding",
                     embedding_init=nn.initializers.normal(0.02))(tokens)
        pos = self.param("position_embedding", nn.initializers.normal(0.01),
                         (cfg.context_length, cfg.text_width))
        x = x + pos[:l]
        key_valid = jnp.arange(l)[None, :] < lengths[:, None]
        for layer in _stack(cfg, "text"):
            x = layer(x, key_valid, causal=True)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_ln")(x)
        return x[jnp.arange(b), jnp.maximum(lengths - 1, 0)]


class CLIP(nn.Module):
    """Both towers, their projections and the temperature."""

    cfg: ClipConfig

    def setup(self):
        self.vision = VisionTower(self.cfg)
        self.text = TextTower(self.cfg)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(self.cfg.logit_scale_init), ())

    def encode_image(self, pixels: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """f32[b, s, s, 3] -> f32[b, projection_dim], unnormalized."""
        return self.visual_projection(self.vision(pixels, keep))

    def encode_text(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """int32[b, l], int32[b] -> f32[b, projection_dim], unnormalized."""
        return self.text_projection(self.text(tokens, lengths))

    def __call__(self, pixels: jax.Array, tokens: jax.Array, lengths: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (normalized image f32[b, d], normalized text f32[b, d], logit scale)."""
        img = normalize(self.encode_image(pixels))
        txt = normalize(self.encode_text(tokens, lengths))
        return img, txt, self.logit_scale


@functools.lru_cache(maxsize=None)
def _compiled_init(cfg: ClipConfig):
    # One compiled call: an eager init dispatches (and compiles) every op of the model
    # one by one, twice as slow even for the tiny test config.
    return jax.jit(CLIP(cfg).init)


def init_params(cfg: ClipConfig, seed: int = 0) -> dict:
    """Random parameters for `cfg` (deterministic in `seed`)."""
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return _compiled_init(cfg)(jax.random.PRNGKey(seed), pixels, tokens,
                               jnp.array([2], jnp.int32))["params"]


@gin.configurable
def clip_config(preset: str = "tiny", **overrides) -> ClipConfig:
    """A named size ('tiny' or 'vit_b32') with optional field overrides (for gin)."""
    presets = {"tiny": ClipConfig.tiny, "vit_b32": ClipConfig.vit_b32}
    if preset not in presets:
        raise ValueError(f"clip_config.preset={preset!r}; use one of {sorted(presets)}.")
    return dataclasses.replace(presets[preset](), **overrides)
