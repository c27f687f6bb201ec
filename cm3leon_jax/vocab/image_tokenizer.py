"""The user-facing image tokenizer: images <-> discrete codes.

    tok = ImageTokenizer.from_checkpoint("runs/vq_tiny")          # trained here
    tok = ImageTokenizer.from_chameleon("tokenizer/vqgan.ckpt")   # released weights
    codes = tok.encode(images)   # uint8[b, h, w, 3] (or see image_inputs.py) -> int32[b, n]
    images = tok.decode(codes)   # int[b, n] -> uint8[b, image_size, image_size, 3]

`n = (image_size / downsample_factor) ** 2` codes per image in raster order
(row by row), each in 0..codebook_size-1; the vocabulary shifts them into the
image id range. Both directions are jit-compiled once for a fixed batch
(`batch_size`): larger inputs are processed in chunks, smaller ones padded, so
no call recompiles. `encode_images` / `decode_codes` are the pure, traceable
versions for use inside other jitted code (e.g. a sampler decoding on device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

# At import, not in `from_checkpoint`: it brings in train/checkpoints.py, whose gin
# configurables cannot register once a run's config is locked (the preprocess runs, which
# import this module and nothing of the trainer's, then failed to load a checkpoint).
from cm3leon_jax.train import params_checkpoint
from cm3leon_jax.vocab import image_inputs, vqgan_checkpoint
from cm3leon_jax.vocab.vqgan import VQGAN, VQGANConfig, init_key


def images_to_model(images: jax.Array) -> jax.Array:
    """uint8[..., 3] -> f32 in [-1, 1], the range the VQGAN reads."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def model_to_images(x: jax.Array) -> jax.Array:
    """f32 in about [-1, 1] -> uint8, rounded and clipped."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def encode_images(cfg: VQGANConfig, params: Any, images: jax.Array) -> jax.Array:
    """uint8[b, s, s, 3] -> int32[b, n] (raster order). Traceable."""
    enc = VQGAN(cfg).apply({"params": params}, images_to_model(images), method=VQGAN.encode)
    return enc.quant.codes.reshape(images.shape[0], -1)


def decode_codes(cfg: VQGANConfig, params: Any, codes: jax.Array) -> jax.Array:
    """int[b, n] -> uint8[b, s, s, 3]. Traceable."""
    g = cfg.grid_size
    x = VQGAN(cfg).apply({"params": params}, codes.reshape(codes.shape[0], g, g),
                         method=VQGAN.decode_codes)
    return model_to_images(x)


@functools.lru_cache(maxsize=None)
def _compiled(cfg: VQGANConfig) -> tuple[Callable, Callable, Callable]:
    """jit'd (init, encode, decode) for a config, shared by every tokenizer of that
    shape so that a second tokenizer (another checkpoint, same config) compiles nothing."""
    return (jax.jit(VQGAN(cfg).init), jax.jit(functools.partial(encode_images, cfg)),
            jax.jit(functools.partial(decode_codes, cfg)))


def _in_chunks(fn: Callable[[np.ndarray], jax.Array], x: np.ndarray, batch: int) -> np.ndarray:
    """Applies a fixed-batch function to any number of rows, padding the last chunk."""
    outs = []
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        outs.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(outs)


class ImageTokenizer:
    """A VQGAN with its weights, ready to encode and decode.

    Args:
      config: the network's shape.
      params: its parameters (nested dict, numpy or jax arrays).
      batch_size: images per compiled call; the unit of work and of memory.
      crop_non_square: center-crop non-square inputs instead of refusing them.
    """

    def __init__(self, config: VQGANConfig, params: Any, batch_size: int = 8,
                 crop_non_square: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.config = config
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.batch_size = batch_size
        self.crop_non_square = crop_non_square
        _, self._encode, self._decode = _compiled(config)

    # -- shape of the token space -------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def codes_per_image(self) -> int:
        return self.config.codes_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """Its config and weights' digest (`params_checkpoint.fingerprint`): the same wherever
        the weights were loaded from, another for a retrained checkpoint of the same shape
        (whose codes differ). Computed once."""
        return params_checkpoint.fingerprint(dataclasses.asdict(self.config), self.params)

    # -- the two directions ---------------------------------------------------------
    def preprocess(self, images: Any) -> np.ndarray:
        """Any accepted input (see image_inputs.py) -> uint8[b, s, s, 3]."""
        return image_inputs.to_rgb_uint8(images, self.image_size, self.crop_non_square)

    def encode(self, images: Any) -> np.ndarray:
        """Images -> int32[b, codes_per_image]."""
        x = self.preprocess(images)
        return _in_chunks(lambda c: self._encode(self.params, c), x, self.batch_size)

    def decode(self, codes: Any) -> np.ndarray:
        """int[b, codes_per_image] (or [b, g, g]) -> uint8[b, image_size, image_size, 3]."""
        c = image_inputs.to_codes(codes, self.config.grid_size, self.codebook_size)
        c = c.reshape(c.shape[0], -1)
        return _in_chunks(lambda x: self._decode(self.params, x), c, self.batch_size)

    def reconstruct(self, images: Any) -> np.ndarray:
        """decode(encode(images)): what the tokenizer keeps of an image."""
        return self.decode(self.encode(images))

    # -- construction ---------------------------------------------------------------
    @classmethod
    def random_init(cls, config: VQGANConfig, seed: int = 0, **kwargs: Any) -> "ImageTokenizer":
        """Untrained weights: for shapes, speed and tests."""
        x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
        params = _compiled(config)[0](init_key(seed), x)["params"]
        return cls(config, params, **kwargs)

    @classmethod
    def from_checkpoint(cls, model_dir: str, step: int | None = None, **kwargs: Any
                        ) -> "ImageTokenizer":
        """A tokenizer trained by `train_image_tokenizer` (MODEL_DIR or its checkpoints/)."""
        params, cfg, _ = vqgan_checkpoint.restore_params(model_dir, step)
        return cls(cfg, params, **kwargs)

    @classmethod
    def from_chameleon(cls, path: str, image_size: int | None = None, allow_pickle: bool = False,
                       **kwargs: Any) -> "ImageTokenizer":
        """The released VQGAN (`vqgan.ckpt`, or a .safetensors of the same layout)."""
        from cm3leon_jax.vocab import chameleon_vqgan_weights
        params, cfg = chameleon_vqgan_weights.load_chameleon_vqgan(
            path, image_size=image_size, allow_pickle=allow_pickle)
        return cls(cfg, params, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"ImageTokenizer({c.image_size}px -> {c.grid_size}x{c.grid_size} codes of "
                f"{c.codebook_size}, batch_size={self.batch_size})")


@gin.configurable
def load_image_tokenizer(checkpoint: str | None = None, chameleon_checkpoint: str | None = None,
                         config: VQGANConfig | None = None, seed: int = 0, batch_size: int = 8,
                         crop_non_square: bool = True) -> ImageTokenizer:
    """The tokenizer a gin file names; exactly one source.

    Args:
      checkpoint: MODEL_DIR of a `train_image_tokenizer` run.
      chameleon_checkpoint: the released `vqgan.ckpt` (or .safetensors).
      config: with neither checkpoint, random weights of this shape (tests, speed).
    """
    kwargs = dict(batch_size=batch_size, crop_non_square=crop_non_square)
    given = [n for n, v in (("checkpoint", checkpoint), ("chameleon_checkpoint",
                                                          chameleon_checkpoint)) if v]
    if len(given) > 1:
        raise ValueError(f"load_image_tokenizer: give one of {given}, not both")
    if checkpoint:
        return ImageTokenizer.from_checkpoint(checkpoint, **kwargs)
    if chameleon_checkpoint:
        return ImageTokenizer.from_chameleon(chameleon_checkpoint, **kwargs)
    if config is None:
        raise ValueError("load_image_tokenizer needs checkpoint=, chameleon_checkpoint= or config=")
    return ImageTokenizer.random_init(config, seed=seed, **kwargs)
