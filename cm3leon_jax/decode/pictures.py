"""Picture grids for people to look at: images in rows, optional captions under them.

Decode level (not evaluation): the generate mode writes its samples with it, and
everything above (evaluation, the demo) may use it too.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon_jax import fs


def grid(images: np.ndarray, captions: Sequence[str] | None, path: str, *,
         columns: int = 8, scale: int = 4, caption_chars: int = 22) -> str:
    """Writes uint8[n, h, w, 3] as a PNG grid, each image scaled up `scale` times.

    Captions (one per image) are wrapped under each image in a fixed font.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"grid takes uint8[n, h, w, 3], got {images.dtype}{list(images.shape)}.")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images.")
    n, h, w, _ = images.shape
    cell_w, img_h = w * scale, h * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_chars)[:4] for c in captions] if captions else None
    text_h = 12 * max((len(wrapped) for wrapped in lines), default=0) + 4 if lines else 0
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * (cell_w + 4), rows * (img_h + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x, y = (i % columns) * (cell_w + 4), (i // columns) * (img_h + text_h + 4)
        canvas.paste(Image.fromarray(image).resize((cell_w, img_h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x + 2, y + img_h + 2 + 12 * j), line, fill="black", font=font)
    fs.makedirs(os.path.dirname(fs.abspath(path)))
    with fs.open(path, "wb") as f:
        ext = os.path.splitext(path)[1].lower()
        canvas.save(f, format=Image.registered_extensions().get(ext, "PNG"))
    return path

