"""Turning whatever images a user passes into the tokenizer's uint8[b, s, s, 3].

What is converted (each rule is unambiguous) and what is refused:

Containers
  numpy / jax arrays, PIL images, or a list/tuple of them (list items may differ
  in size; each is converted on its own and then stacked).
Layout
  [h, w]            one grayscale image.
  [h, w, c]         one image, c in {1, 3, 4}.
  [b, h, w, c]      a batch, c in {1, 3, 4}.
  [b, c, h, w]      a channels-first batch (c in {1, 3, 4} and w not), transposed.
  A 3-D array whose last axis is not 1, 3 or 4 is refused: it could be one
  channels-first image or a batch of grayscale images. Pass [b, h, w, 1] or
  [h, w, c].
Channels
  1 (gray) is repeated to RGB. 4 (RGBA) is composited onto white, as Chameleon's
  released tokenizer does (transparent pixels become white). 2 is refused.
Values
  uint8 as is. Other integer types are cast when every value is in 0..255
  (16-bit data must be scaled first). Floats (numpy's, and ml_dtypes' such as a jax
  array's bfloat16) must lie in [0, 1] and are scaled
  by 255 and rounded; floats in [-1, 1] or [0, 255] are refused because the two
  readings of a value like 0.5 differ. bool, NaN and non-numeric arrays are refused.
Size
  Square images of another size are resized (Lanczos). Non-square images are
  resized so the short side fits and center-cropped (Chameleon's preprocessing)
  when `crop_non_square` is true, else refused.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from PIL import Image, ImageOps

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError
from cm3leon_jax.images import UnsupportedImageError, pil_rgb

_CHANNELS = (1, 3, 4)


def _from_pil(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img)  # high bit depth: let the value rules decide
    has_alpha = "A" in img.mode or "a" in img.mode or "transparency" in img.info
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))


def _is_float(dtype: np.dtype) -> bool:
    """numpy's float types, and ml_dtypes' (bfloat16, float8_*), which numpy files as void."""
    if np.issubdtype(dtype, np.floating):
        return True
    try:
        return dtype.kind == "V" and ml_dtypes.finfo(dtype) is not None
    except (ValueError, TypeError):  # A structured or opaque dtype: not a float.
        return False


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        raise ValueError(f"{what} is boolean; convert it to uint8 explicitly (e.g. mask * 255)")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{what} has integer values in [{lo}, {hi}]; integer images must be in 0..255 "
                "(scale 16-bit images to 8 bits first)")
        return x.astype(np.uint8)
    if _is_float(x.dtype):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{what} contains NaN or infinite values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{what} is float with values in [{lo:.3g}, {hi:.3g}]; float images must be in "
                "[0, 1]. Convert [-1, 1] data with (x + 1) / 2 and [0, 255] data with "
                "x.astype(np.uint8)")
        return np.round(x * 255.0).astype(np.uint8)
    raise ValueError(f"{what} has dtype {x.dtype}; pass uint8, integer or float images")


def _to_rgb(x: np.ndarray, what: str) -> np.ndarray:
    """uint8[..., h, w, c] -> uint8[..., h, w, 3]."""
    c = x.shape[-1]
    if c == 3:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=-1)
    if c == 4:
        alpha = x[..., 3:].astype(np.float32) / 255.0
        rgb = x[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.round(rgb).astype(np.uint8)
    raise ValueError(f"{what} has {c} channels; pass 1 (gray), 3 (RGB) or 4 (RGBA)")


def _resize(img: np.ndarray, size: int, crop_non_square: bool, what: str) -> np.ndarray:
    """uint8[h, w, 3] -> uint8[size, size, 3]."""
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"{what} is empty ({h}x{w})")
    if (h, w) == (size, size):
        return img
    if h != w and not crop_non_square:
        raise ValueError(
            f"{what} is {h}x{w}, not square; crop it to a square or allow the center crop "
            "(crop_non_square=True)")
    pil = Image.fromarray(img)
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((nw, nh), Image.LANCZOS)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return np.asarray(pil.crop((x0, y0, x0 + size, y0 + size)))


def _layout(x: np.ndarray, what: str) -> np.ndarray:
    """Any accepted layout -> [b, h, w, c]."""
    if x.ndim == 2:
        return x[None, :, :, None]
    if x.ndim == 3:
        if x.shape[-1] in _CHANNELS:
            return x[None]
        raise ValueError(
            f"{what}: a 3-D array must be one image [h, w, c] with c in "
            "{1, 3, 4}; for a batch of grayscale images pass [b, h, w, 1]")
    if x.ndim == 4:
        if x.shape[-1] in _CHANNELS:
            return x
        if x.shape[1] in _CHANNELS:
            return x.transpose(0, 2, 3, 1)
        raise ValueError(f"{what}: expected [b, h, w, c] with c in {{1, 3, 4}}")
    raise ValueError(f"{what} has {x.ndim} dimensions; expected 2 ([h, w]), 3 ([h, w, c]) "
                     "or 4 ([b, h, w, c])")


def rgb_uint8_unresized(image: Any) -> np.ndarray:
    """One image (array or PIL) -> uint8[h, w, 3] at its own size, by the value
    and channel rules above."""
    x = _from_pil(image) if isinstance(image, Image.Image) else np.asarray(image)
    what = f"image of shape {x.shape} and dtype {x.dtype}"
    x = _layout(x, what)
    if x.shape[0] != 1:
        raise ValueError(f"{what}: expected one image, got a batch of {x.shape[0]}")
    return _to_rgb(_to_uint8(x, what), what)[0]


def read_rgb(path: str) -> np.ndarray:
    """The image file at `path` (any file system fs.py speaks) -> uint8[h, w, 3] at the
    file's own size, upright (its EXIF orientation applied, as viewers show it) and in RGB
    by `pil_rgb` (transparency over white, 16-bit grayscale such as depth maps scaled to 8
    bits; PIL's own conversion would saturate them and turn transparent pixels black).
    FileNotFoundError if there is no such file, UnsupportedImageError for float or 32-bit
    values (`pil_rgb`), ValueError if PIL cannot read it; each names the path."""
    if not fs.isfile(path):
        raise MissingInputError(f"image {path!r} does not exist.")
    try:
        with fs.open(path, "rb") as f, Image.open(f) as image:
            return np.asarray(pil_rgb(ImageOps.exif_transpose(image)))
    except UnsupportedImageError as e:
        raise UnsupportedImageError(f"image {path!r}: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path!r} is not readable ({type(e).__name__}: {e}); give a "
                         "PNG, JPEG or another format PIL reads.") from None


def to_rgb_uint8(images: Any, image_size: int, crop_non_square: bool = True) -> np.ndarray:
    """Converts images as described in the module docstring.

    Args:
      images: an array, a PIL image, or a sequence of them.
      image_size: side of the square output.
      crop_non_square: center-crop non-square images instead of refusing them.
    Returns:
      uint8[b, image_size, image_size, 3].
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (empty list)")
        parts = [to_rgb_uint8(im, image_size, crop_non_square) for im in images]
        return np.concatenate(parts, axis=0)
    if isinstance(images, Image.Image):
        x = _from_pil(images)
    else:
        try:
            x = np.asarray(images)
        except Exception as e:
            raise ValueError(
                f"cannot read images of type {type(images).__name__} as an array"
            ) from e
    what = f"image array of shape {x.shape} and dtype {x.dtype}"
    x = _to_rgb(_to_uint8(_layout(x, what), what), what)
    if x.shape[0] == 0:
        raise ValueError("no images given (batch of size 0)")
    if x.shape[1:3] == (image_size, image_size):
        return np.ascontiguousarray(x)
    return np.stack([_resize(im, image_size, crop_non_square, what) for im in x])


def to_codes(codes: Any, grid_size: int, codebook_size: int) -> np.ndarray:
    """Validates codes for decoding -> int32[b, grid_size, grid_size].

    Accepts int[b, grid_size**2], int[b, grid_size, grid_size] or one image's
    int[grid_size**2] (given a batch axis of 1).
    """
    x = np.asarray(codes)
    what = f"codes of shape {x.shape} and dtype {x.dtype}"
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what}: codes must be integers")
    if x.ndim > 1 and x.shape[0] == 0:
        raise ValueError(f"{what}: no codes given (batch of size 0); pass at least one "
                         "image's codes")
    n = grid_size * grid_size
    if x.ndim == 1 and x.shape[0] == n:
        x = x[None]
    if x.ndim == 2 and x.shape[1] == n:
        x = x.reshape(-1, grid_size, grid_size)
    if x.ndim != 3 or x.shape[1:] != (grid_size, grid_size):
        raise ValueError(f"{what}: expected [batch, {n}] or [batch, {grid_size}, {grid_size}] "
                         "codes per image")
    if x.size and (x.min() < 0 or x.max() >= codebook_size):
        raise ValueError(f"{what}: values in [{x.min()}, {x.max()}] but the codebook has "
                         f"{codebook_size} entries (0..{codebook_size - 1}); shift vocabulary "
                         "ids back to codes first")
    return x.astype(np.int32)

