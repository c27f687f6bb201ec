"""The FID Inception network in Flax: images -> 2048-d pool features, as pytorch-fid computes them.

    net = FIDInception()
    variables = inception_weights.load("pt_inception-2015-12-05-6726825d.pth")
    feats = features(net, variables, images)       # uint8[n, h, w, 3] -> f32[n, 2048]

This is TensorFlow's 2015 Inception graph (the one FID was defined with) as pytorch-fid
rebuilt it, not torchvision's Inception-v3: the A, C and first E blocks average-pool
without counting the zero padding, the last E block max-pools its pool branch, and the
network stops at the global average pool (2048 features; no classifier). Inputs follow
pytorch-fid: values in [0, 1], bilinearly resized to 299x299 (half-pixel centers, no
anti-aliasing, as torch's `interpolate(align_corners=False)`), then mapped to [-1, 1].

clean-fid's resize is selectable (`resize="clean"`): each channel resized on the host with
PIL's anti-aliased bicubic filter on float values, so that downsampling does not alias
(Parmar et al. 2022); scores of the two modes are not comparable with each other.

Submodule names are the torch state dict's (`Mixed_5b/branch1x1/conv`), so the weights
importer (inception_weights.py) is a name-for-name copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image as PILImage

from cm3leon_jax.errors import UserInputError

SIZE = 299
RESIZE_MODES = ("pytorch_fid", "clean")


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = ((self.padding[0],) * 2, (self.padding[1],) * 2)
        x = nn.Conv(self.features, self.kernel, (self.stride,) * 2, pad, use_bias=False,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _conv(name: str, features: int, kernel=1, stride: int = 1, padding=0) -> BasicConv:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv(features, kernel, stride, padding, name=name)


def _chain(x, convs: Sequence[BasicConv]):
    for conv in convs:
        x = conv(x)
    return x


def _avg_pool_no_pad(x):
    """3x3 stride-1 average over the window's real pixels only (TF's SAME avg pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int, padding: int = 0):
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            _conv("branch1x1", 64)(x),
            _chain(x, [_conv("branch5x5_1", 48), _conv("branch5x5_2", 64, 5, padding=2)]),
            _chain(x, [_conv("branch3x3dbl_1", 64), _conv("branch3x3dbl_2", 96, 3, padding=1),
                       _conv("branch3x3dbl_3", 96, 3, padding=1)]),
            _conv("branch_pool", self.pool_features)(_avg_pool_no_pad(x)),
        ], axis=-1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            _conv("branch3x3", 384, 3, stride=2)(x),
            _chain(x, [_conv("branch3x3dbl_1", 64), _conv("branch3x3dbl_2", 96, 3, padding=1),
                       _conv("branch3x3dbl_3", 96, 3, stride=2)]),
            _max_pool(x, 2),
        ], axis=-1)


class BlockC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row = {"kernel": (1, 7), "padding": (0, 3)}
        col = {"kernel": (7, 1), "padding": (3, 0)}
        return jnp.concatenate([
            _conv("branch1x1", 192)(x),
            _chain(x, [_conv("branch7x7_1", c), _conv("branch7x7_2", c, **row),
                       _conv("branch7x7_3", 192, **col)]),
            _chain(x, [_conv("branch7x7dbl_1", c), _conv("branch7x7dbl_2", c, **col),
                       _conv("branch7x7dbl_3", c, **row), _conv("branch7x7dbl_4", c, **col),
                       _conv("branch7x7dbl_5", 192, **row)]),
            _conv("branch_pool", 192)(_avg_pool_no_pad(x)),
        ], axis=-1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            _chain(x, [_conv("branch3x3_1", 192), _conv("branch3x3_2", 320, 3, stride=2)]),
            _chain(x, [_conv("branch7x7x3_1", 192),
                       _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3)),
                       _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0)),
                       _conv("branch7x7x3_4", 192, 3, stride=2)]),
            _max_pool(x, 2),
        ], axis=-1)


class BlockE(nn.Module):
    """`max_pool`: the last block's pool branch max-pools (a quirk of the FID graph)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        row = {"kernel": (1, 3), "padding": (0, 1)}
        col = {"kernel": (3, 1), "padding": (1, 0)}
        b3 = _conv("branch3x3_1", 384)(x)
        dbl = _chain(x, [_conv("branch3x3dbl_1", 448), _conv("branch3x3dbl_2", 384, 3,
                                                              padding=1)])
        pooled = _max_pool(x, 1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return jnp.concatenate([
            _conv("branch1x1", 320)(x),
            _conv("branch3x3_2a", 384, **row)(b3), _conv("branch3x3_2b", 384, **col)(b3),
            _conv("branch3x3dbl_3a", 384, **row)(dbl), _conv("branch3x3dbl_3b", 384, **col)(dbl),
            _conv("branch_pool", 192)(pooled),
        ], axis=-1)


class FIDInception(nn.Module):
    """f32[n, h, w, 3] in [-1, 1] (h, w >= 75; 299 for FID) -> f32[n, 2048] pool features."""

    @nn.compact
    def __call__(self, x):
        x = _conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool(_conv("Conv2d_2b_3x3", 64, 3, padding=1)(x), 2)
        x = _conv("Conv2d_3b_1x1", 80)(x)
        x = _max_pool(_conv("Conv2d_4a_3x3", 192, 3)(x), 2)
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = BlockA(pool, name=name)(x)
        x = BlockB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = BlockC(c7, name=name)(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE(name="Mixed_7b")(x)
        x = BlockE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def resize_bilinear(x: jnp.ndarray, size: int = SIZE) -> jnp.ndarray:
    """f32[n, h, w, c] -> f32[n, size, size, c], as torch's bilinear interpolate with
    align_corners=False and no anti-aliasing (what pytorch-fid does inside the network)."""
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, size, size, c), "bilinear", antialias=False)


def resize_clean(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """uint8[n, h, w, 3] -> f32[n, size, size, 3] in [0, 255]: clean-fid's resize (PIL
    bicubic, anti-aliased, per channel on float values, clipped)."""
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        for ch in range(3):
            plane = PILImage.fromarray(np.asarray(image[..., ch], np.float32), mode="F")
            out[i, ..., ch] = np.asarray(plane.resize((size, size), PILImage.BICUBIC))
    return np.clip(out, 0, 255)


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """uint8[n, h, w, 3] (a list of equal-size images is stacked); anything else: one error."""
    if isinstance(images, (list, tuple)):
        sizes = sorted({np.shape(im) for im in images})
        if len(sizes) > 1:
            raise UserInputError(f"{what}: a list of images of {len(sizes)} sizes {sizes[:3]}"
                                 f"{'...' if len(sizes) > 3 else ''}; resize them to one size "
                                 "first.")
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or min(arr.shape[1:3]) < 2:
        raise UserInputError(f"{what}: expected uint8[n, h, w, 3] RGB images, got "
                             f"{arr.dtype}{list(arr.shape)}; convert with np.asarray(PIL image).")
    return arr


def preprocess(images: np.ndarray, resize: str = "pytorch_fid") -> jnp.ndarray:
    """uint8[n, h, w, 3] -> f32[n, 299, 299, 3] in [-1, 1], resized as `resize` says."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}; use one of {RESIZE_MODES}.")
    images = check_images(images)
    if resize == "clean":
        x = jnp.asarray(resize_clean(images)) / 255.0
    else:
        x = resize_bilinear(jnp.asarray(images, jnp.float32) / 255.0)
    return 2.0 * x - 1.0


def random_variables(seed: int = 0) -> dict:
    """Randomly initialized variables ({"params", "batch_stats"}); only for tests: FID
    with random Inception weights is not a meaningful number."""
    return FIDInception().init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))
