"""Image sources for training the tokenizer: random access, deterministic.

An image source is any callable `source(index: int) -> uint8[h, w, 3]` whose
result depends only on its construction arguments and `index`. The trainer reads
examples `step * batch .. (step + 1) * batch - 1`, so a run resumed from a
checkpoint continues with exactly the data it would have seen, and nothing is
buffered or shuffled statefully. Sizes may differ from the tokenizer's: the
trainer converts with the same rules as `ImageTokenizer.encode`.

- `cm3leon_jax.data.synthetic.synthetic_images` (data, handed in by the caller): the
  synthetic shapes corpus; index i of split s is example i of split s of the corpus.
- `folder_images`: a user's folder of pictures (any PIL-readable file, recursive),
  as random square crops, so a few large photos give many training images.
- `array_images`: the same random crops of images already in memory.
"""

from __future__ import annotations

import os
import zlib
from typing import Callable, Sequence

import gin
import numpy as np
from PIL import Image

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError
from cm3leon_jax.vocab import image_inputs

ImageSource = Callable[[int], np.ndarray]

_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    # A crop or an epoch order depends on (seed, what, index) only: random access.
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), index])


def random_square_crop(image: np.ndarray, rng: np.random.Generator, image_size: int,
                       min_scale: float = 0.5, flip: bool = True) -> np.ndarray:
    """A random square crop whose side is a `min_scale`..1 share of the short side,
    resized to image_size (scale augmentation), optionally mirrored."""
    h, w = image.shape[:2]
    short = min(h, w)
    side = int(round(short * rng.uniform(min_scale, 1.0))) if short > image_size else short
    side = max(1, min(side, short))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = image[y:y + side, x:x + side]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if side != image_size:
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (image_size, image_size), Image.BICUBIC))
    return np.ascontiguousarray(crop)


@gin.configurable
def array_images(images: Sequence[np.ndarray], image_size: int = 64, seed: int = 0,
                 min_scale: float = 0.5, flip: bool = True) -> ImageSource:
    """Random square crops of in-memory images (any layout `ImageTokenizer` accepts).

    Index i uses image i % len(images) and a crop drawn from (seed, i).
    """
    if not len(images):
        raise ValueError("array_images needs at least one image")
    rgb = [image_inputs.rgb_uint8_unresized(im) for im in images]

    def source(index: int) -> np.ndarray:
        return random_square_crop(rgb[index % len(rgb)], _rng(seed, "crop", index), image_size,
                                  min_scale, flip)

    return source


def list_image_files(folder: str) -> list[str]:
    """Every picture under `folder`, recursively, in a stable (sorted) order."""
    if not fs.isdir(folder):
        raise MissingInputError(f"image folder {folder!r} does not exist; give a folder of "
                                "images (searched recursively)")
    files = sorted(os.path.join(d, f) for d, _, names in fs.walk(folder) for f in names
                   if f.lower().endswith(_EXTENSIONS))
    if not files:
        raise MissingInputError(f"no images ({', '.join(_EXTENSIONS)}) under {folder!r}")
    return files


@gin.configurable
def folder_images(folder: str = gin.REQUIRED, image_size: int = 64, seed: int = 0,
                  min_scale: float = 0.5, flip: bool = True) -> ImageSource:
    """Random square crops of the pictures under `folder`.

    Each epoch visits every file once, in an order drawn from (seed, epoch). Files are
    read as `image_inputs.read_rgb` reads them (upright by their EXIF orientation, 16-bit
    grayscale scaled to 8 bits, transparency over white); one that PIL cannot read raises
    an error naming the file.
    """
    files = list_image_files(folder)

    def source(index: int) -> np.ndarray:
        epoch, pos = divmod(index, len(files))
        path = files[_rng(seed, "epoch", epoch).permutation(len(files))[pos]]
        return random_square_crop(image_inputs.read_rgb(path), _rng(seed, "crop", index),
                                  image_size, min_scale, flip)

    return source

