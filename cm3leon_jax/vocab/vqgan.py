"""The VQGAN image tokenizer network: convolutional encoder, quantizer, decoder.

The architecture is the taming-transformers VQGAN that Make-A-Scene, CM3Leon and
Chameleon use; parameter names follow the released checkpoints (`conv_in`,
`down_{level}_block_{i}`, `mid_attn_1`, `quant_conv`, ...) so that importing
them (`chameleon_vqgan_weights.py`) is a renaming, not a search::

    images f32[b, H, W, 3] in [-1, 1]
      Encoder: conv_in -> per level: num_res_blocks x ResnetBlock (+ attention on
               `attn_levels`), stride-2 conv between levels -> mid: Resnet,
               Attention, Resnet -> GroupNorm, swish, conv_out
      quant_conv (1x1)  -> latents f32[b, H/f, W/f, embed_dim]
      VectorQuantizer   -> codes int32[b, H/f, W/f]
      post_quant_conv (1x1) -> Decoder (the mirror image, num_res_blocks + 1 blocks
               per level, nearest-neighbor x2 + conv to go up, `Upsample`) -> f32[b, H, W, 3]

with down-sampling factor f = 2 ** (len(channel_multipliers) - 1). Levels are
numbered from the full resolution (level 0) down, in the encoder and the decoder
alike, so `attn_levels=(3,)` with four levels puts attention at the lowest one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab.quantizer import QuantizerOutput, VectorQuantizer


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Shape of a VQGAN. Gin files in gin_configs/image_tokenizer/ bind these.

    Attributes:
      image_size: side of the square images the tokenizer reads and writes.
      base_channels: channels of level 0 (taming's `ch`).
      channel_multipliers: channels of level i = base_channels * multiplier[i];
        its length fixes the down-sampling factor 2 ** (len - 1).
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      attn_levels: levels (0 = full resolution) with self-attention after every
        residual block. The block in the middle (lowest resolution) always has one
        unless `mid_attention` is False.
      mid_attention: attention block between the two middle residual blocks.
      latent_channels: channels out of the encoder / into the decoder (`z_channels`).
      embed_dim: codebook entry size; the 1x1 quant convs map latent_channels to it.
      codebook_size: number of codes.
      l2_normalize: cosine-distance lookup on unit vectors (ViT-VQGAN) instead of
        plain Euclidean (taming, Chameleon's released weights).
      num_groups: GroupNorm groups; every level's channels must divide by it.
      norm: "group" (taming, Chameleon: GroupNorm, whose statistics span the whole
        feature map, so a change anywhere in the image moves every code's features) or
        "layer" (LayerNorm over each position's channels: a code depends only on
        what its receptive field sees). With mid_attention=False and no attn_levels
        a code is then local, and an edit's unchanged regions keep their codes.
      in_channels: image channels: 3 only (every input path feeds RGB).
      dtype: compute dtype of the convolutions ("float32" or "bfloat16"); params
        and the quantizer stay float32.
      matmul_precision: precision of every conv / matmul: "highest" computes float32
        exactly (GPUs would otherwise use TF32 and TPUs bf16 passes: measured on an
        H200, decoder outputs then differ from the released model's by ~2e-3
        relative and codes can flip); "default" trades that for speed.
    """

    image_size: int = 256
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (3,)
    mid_attention: bool = True
    latent_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 8192
    l2_normalize: bool = False
    num_groups: int = 32
    norm: str = "group"
    in_channels: int = 3
    dtype: str = "float32"
    matmul_precision: str = "highest"

    def __post_init__(self):
        # gin and JSON hand lists over; the config must stay hashable for jit.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "attn_levels", tuple(self.attn_levels))
        levels = len(self.channel_multipliers)
        if self.in_channels != 3:
            # Every path (image_inputs, the trainer, the tokenizer) feeds RGB images.
            raise UserInputError(f"VQGANConfig.in_channels={self.in_channels}: the tokenizer "
                                 "reads RGB images; set it to 3 (gray and RGBA images are "
                                 "converted to RGB on the way in).")
        if levels < 1:
            raise UserInputError("VQGANConfig.channel_multipliers must name at least one level")
        if self.image_size % self.downsample_factor:
            raise UserInputError(
                f"VQGANConfig.image_size={self.image_size} is not divisible by the down-sampling "
                f"factor {self.downsample_factor} (= 2 ** (len(channel_multipliers) - 1))")
        bad = [lv for lv in self.attn_levels if not 0 <= lv < levels]
        if bad:
            raise UserInputError(f"VQGANConfig.attn_levels {bad} outside 0..{levels - 1}")
        for c in {self.base_channels * m for m in self.channel_multipliers}:
            if c % self.num_groups:
                raise UserInputError(
                    f"{c} channels do not divide into num_groups={self.num_groups} "
                    "GroupNorm groups; "
                    "change base_channels, channel_multipliers or num_groups"
                )
        if self.norm not in ("group", "layer"):
            raise UserInputError(f"VQGANConfig.norm must be 'group' or 'layer', got {self.norm!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserInputError(
                f"VQGANConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}"
            )
        if self.matmul_precision not in ("default", "high", "highest"):
            raise UserInputError("VQGANConfig.matmul_precision must be 'default', 'high' or "
                                 f"'highest', got {self.matmul_precision!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Codes per side: image_size / downsample_factor."""
        return self.image_size // self.downsample_factor

    @property
    def codes_per_image(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields {sorted(unknown)}")
        # Every field is passed explicitly so that gin bindings of the current
        # process cannot leak into a config read back from disk.
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{**defaults, **d})


def init_key(seed: int) -> jax.Array:
    """PRNG key for initialization and training randomness of the tokenizer.

    The "rbg" generator, not the default threefry: XLA on CPU takes ~20 s to
    compile threefry for the ~60 initializers of even a tiny VQGAN, ~4 s for rbg.
    Streams are deterministic per seed (but differ between backends, which
    initialization does not care about).
    """
    return jax.random.key(seed, impl="rbg")


def _norm(cfg: VQGANConfig, name: str) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=jnp.dtype(cfg.dtype),
                            name=name)
    # use_fast_variance=False: E[(x-m)^2] like torch, not E[x^2]-m^2, which loses
    # digits after many layers and would break parity with the released model.
    return nn.GroupNorm(num_groups=cfg.num_groups, epsilon=1e-6, use_fast_variance=False,
                        dtype=jnp.dtype(cfg.dtype), name=name)


def _conv(cfg: VQGANConfig, features: int, kernel: int, name: str, stride: int = 1,
          padding: Any = None) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=jnp.dtype(cfg.dtype), precision=cfg.matmul_precision, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 shortcut when the width changes."""

    cfg: VQGANConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.cfg, self.out_channels, 3, "conv1")(nn.swish(_norm(self.cfg, "norm1")(x)))
        h = _conv(self.cfg, self.out_channels, 3, "conv2")(nn.swish(_norm(self.cfg, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.cfg, self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _norm(self.cfg, "norm")(x)
        prec = self.cfg.matmul_precision
        dense = lambda name: nn.Dense(c, dtype=jnp.dtype(self.cfg.dtype), precision=prec,  # noqa: E731
                                      name=name)
        q, k, v = (dense(n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        w = jnp.einsum("bic,bjc->bij", q, k, precision=prec) * (c ** -0.5)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", w, v, precision=prec).reshape(b, hgt, wid, c)
        return x + dense("proj_out")(out)


# _PHASE_TAPS[a][t][d]: after nearest-neighbor doubling, output row 2i + a of a 3x3 conv reads
# rows 2i + a - 1 .. 2i + a + 1 of the doubled map, which are input rows i - 1, i, i (a = 0)
# or i, i, i + 1 (a = 1): two input rows, tap t of a 2-tap window starting at padded row
# i + a, each the sum of the kernel rows d that land on it. Columns alike.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
               ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


class Upsample(nn.Module):
    """Nearest-neighbor x2, then a 3x3 conv with padding 1 (taming's `Upsample` with
    `with_conv`), computed at the input's resolution.

    Output pixel (2i + a, 2j + b) depends on a 2x2 window of the input (`_PHASE_TAPS`), so
    the 3x3 kernel folds into four 2x2 kernels, one per phase (a, b). One product of the
    input's 2x2 windows (padded by one: (h + 1) x (w + 1) of them) with the four kernels side
    by side gives every phase; each phase keeps its h x w of the windows and the phases
    interleave. 16 (h + 1)(w + 1) kernel taps per channel pair against the doubled map's
    9 x 4hw: about half the multiply-adds, and no doubled map. The
    same sums up to float rounding; the parameters are the 3x3 conv's (`kernel` [3, 3, C,
    C], `bias` [C]), so checkpoints and the released weights load unchanged.

    A product, not a 2x2 convolution: XLA:CPU computed that convolution's kernel gradient
    about 4x slower than the plain conv over the doubled map (measured on the demo's tiny
    tokenizer; the product form's forward and backward took 0.46x the conv's time there).
    """

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        dtype = jnp.dtype(self.cfg.dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        taps = jnp.asarray(_PHASE_TAPS, jnp.float32)
        # [t, u, c_in, a, b, c_out]: window tap (t, u) -> phase (a, b).
        folded = jnp.einsum("atd,bue,deio->tuiabo", taps, taps, kernel,
                            precision=jax.lax.Precision.HIGHEST).reshape(4 * c, 4 * c)
        padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = jnp.concatenate([padded[:, t:t + hgt + 1, u:u + wid + 1]
                                   for t in range(2) for u in range(2)], axis=-1)
        y = jnp.dot(windows, folded.astype(dtype), precision=self.cfg.matmul_precision)
        y = y.reshape(b, hgt + 1, wid + 1, 2, 2, c)
        phases = [jnp.stack([y[:, a:a + hgt, p:p + wid, a, p] for p in range(2)], axis=3)
                  for a in range(2)]
        out = jnp.stack(phases, axis=2).reshape(b, 2 * hgt, 2 * wid, c)
        return out + bias.astype(dtype)


class Encoder(nn.Module):
    """images f32[b, H, W, C] -> latents f32[b, H/f, W/f, latent_channels]."""

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _conv(cfg, cfg.base_channels, 3, "conv_in")(x.astype(jnp.dtype(cfg.dtype)))
        levels = len(cfg.channel_multipliers)
        for i, mult in enumerate(cfg.channel_multipliers):
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg, cfg.base_channels * mult, name=f"down_{i}_block_{j}")(h)
                if i in cfg.attn_levels:
                    h = AttnBlock(cfg, name=f"down_{i}_attn_{j}")(h)
            if i != levels - 1:
                # Pad right/bottom only, then a valid stride-2 conv: the released
                # model's asymmetric down-sampling (not "SAME", which pads both sides).
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = _conv(cfg, h.shape[-1], 3, f"down_{i}_downsample", stride=2,
                          padding="VALID")(h)
        h = ResnetBlock(cfg, h.shape[-1], name="mid_block_1")(h)
        if cfg.mid_attention:
            h = AttnBlock(cfg, name="mid_attn_1")(h)
        h = ResnetBlock(cfg, h.shape[-1], name="mid_block_2")(h)
        h = nn.swish(_norm(cfg, "norm_out")(h))
        return _conv(cfg, cfg.latent_channels, 3, "conv_out")(h).astype(jnp.float32)


class Decoder(nn.Module):
    """latents f32[b, H/f, W/f, latent_channels] -> images f32[b, H, W, C] (about [-1, 1])."""

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        mults = cfg.channel_multipliers
        h = _conv(cfg, cfg.base_channels * mults[-1], 3, "conv_in")(z.astype(jnp.dtype(cfg.dtype)))
        h = ResnetBlock(cfg, h.shape[-1], name="mid_block_1")(h)
        if cfg.mid_attention:
            h = AttnBlock(cfg, name="mid_attn_1")(h)
        h = ResnetBlock(cfg, h.shape[-1], name="mid_block_2")(h)
        for i in reversed(range(len(mults))):
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg, cfg.base_channels * mults[i], name=f"up_{i}_block_{j}")(h)
                if i in cfg.attn_levels:
                    h = AttnBlock(cfg, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(cfg, name=f"up_{i}_upsample")(h)
        h = nn.swish(_norm(cfg, "norm_out")(h))
        return _conv(cfg, cfg.in_channels, 3, "conv_out")(h).astype(jnp.float32)


class EncodeOutput(NamedTuple):
    """What `VQGAN.encode` returns.

    Attributes:
      hidden: f32[b, h, w, latent_channels]; the encoder output before quant_conv.
      quant: QuantizerOutput with latents / quantized f32[b, h, w, embed_dim] and
        codes int32[b, h, w].
    """

    hidden: jax.Array
    quant: QuantizerOutput


class VQGAN(nn.Module):
    """The tokenizer network. Images are f32 in [-1, 1], channels last."""

    cfg: VQGANConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1), precision=cfg.matmul_precision)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.l2_normalize)
        self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), precision=cfg.matmul_precision)
        self.decoder = Decoder(cfg)

    def encode(self, images: jax.Array) -> EncodeOutput:
        """images f32[b, H, W, C] in [-1, 1] -> EncodeOutput (codes int32[b, H/f, W/f])."""
        hidden = self.encoder(images)
        return EncodeOutput(hidden, self.quantize(self.quant_conv(hidden)))

    def decode_latents(self, quantized: jax.Array) -> jax.Array:
        """Codebook vectors f32[b, h, w, embed_dim] -> images f32[b, H, W, C]."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """codes int[b, h, w] -> images f32[b, H, W, C] (about [-1, 1])."""
        return self.decode_latents(self.quantize.lookup(codes))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, EncodeOutput]:
        """Reconstruction f32[b, H, W, C] and everything the losses need."""
        enc = self.encode(images)
        return self.decode_latents(enc.quant.quantized), enc
