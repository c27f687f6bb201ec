"""The service reads transparency as training and generation do: over white, not black."""

import io

import numpy as np
from PIL import Image as PILImage

from cm3leon_jax.images import pil_rgb
from cm3leon_jax.retrieval.server import ServiceLimits, decode_png


def _png(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_transparent_pixels_decode_as_pil_rgb_reads_them():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red; the right half fully transparent, one column half so.
    rgba[:, :4, 3] = 255
    rgba[:, 4, 3] = 128
    half = PILImage.fromarray(rgba, "RGBA")
    palette = half.convert("P", palette=PILImage.Palette.ADAPTIVE)
    palette.info["transparency"] = palette.getpixel((7, 0))
    la = PILImage.fromarray(rgba[..., [0, 3]], "LA")
    for image in (half, palette, la):
        body = _png(image)
        with PILImage.open(io.BytesIO(body)) as reread:
            want = np.asarray(pil_rgb(reread))
        got = decode_png(body, ServiceLimits())
        np.testing.assert_array_equal(got, want, err_msg=image.mode)
    assert (decode_png(_png(half), ServiceLimits())[:, 5:] == 255).all()  # White, not black.


def test_an_rgba_array_is_read_over_white_locally_as_the_service_reads_its_png():
    from cm3leon_jax.retrieval.encoder import check_image
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 180
    rgba[:, :3, 3] = 255
    rgba[:, 3, 3] = 100
    np.testing.assert_array_equal(check_image(rgba),
                                  decode_png(_png(PILImage.fromarray(rgba, "RGBA")),
                                             ServiceLimits()))
