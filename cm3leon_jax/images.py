"""How the pixels of an image file become RGB: one rule for training inputs (user data, SFT
formats), generation inputs and the retrieval service, so that a file reads the same in
each. Base level (it imports no package of the flow): `vocab/` and `retrieval/`, which sit
side by side, both use it.

    rgb = pil_rgb(Image.open(path))   # transparency over white, 16-bit scaled to 8

Refused (UnsupportedImageError): floats (PIL mode F: 0.5 could mean half of 1 or of 255)
and integers beyond 16 bits (mode I), which PIL's own conversion would make black or white.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cm3leon_jax.errors import UserInputError

UINT16_MAX = 65535


class UnsupportedImageError(UserInputError):
    """An image file whose pixel values have no one 8-bit reading: floats (PIL mode F; 0.5
    could mean half of 1 or of 255) or integers beyond 16 bits (mode I). The user-data
    builder counts it as `unsupported_image_mode`; generation and the retrieval service
    refuse it."""


def pil_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB: transparency over white, 16-bit grayscale (PIL's modes I;16* and I with
    values in 0..65535) scaled to 8 bits, every other mode by PIL's conversion (which would
    saturate 16-bit values). Float images (mode F) and mode I values outside 0..65535 raise
    UnsupportedImageError: PIL's conversion would make them black or white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "F":
        raise UnsupportedImageError(
            f"a {image.width}x{image.height} image of floats (PIL mode F, e.g. a float TIFF) "
            "is not supported: its values have no one 8-bit reading; save it with 8- or "
            "16-bit integer values (e.g. as PNG).")
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > UINT16_MAX:  # Only mode I can hold such values.
            raise UnsupportedImageError(
                f"a {image.width}x{image.height} image of 32-bit integers (PIL mode I) with "
                f"values in [{lo}, {hi}] is not supported: only 16-bit values "
                f"(0..{UINT16_MAX}) are scaled to 8 bits; save it with 8- or 16-bit values "
                "(e.g. as PNG).")
        eight_bit = (values.astype(np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    return image.convert("RGB")
