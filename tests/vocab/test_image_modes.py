"""Image files without one 8-bit reading (floats, integers beyond 16 bits) are refused with an
error naming them on every path that reads image files, instead of turning black or white."""

import io

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image

from cm3leon_jax import images
from cm3leon_jax.decode import generate_run
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import server
from cm3leon_jax.vocab import image_inputs


def _float_image():
    return Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")


def _wide_image():
    return Image.fromarray(np.full((8, 8), 100_000, np.int32), "I")


def _sixteen_bit():
    return Image.fromarray(np.full((8, 8), 257 * 80, np.int32), "I")


@pytest.mark.parametrize("make, what", [(_float_image, "mode F"),
                                        (_wide_image, r"mode I\) with values in \[100000")])
def test_pil_rgb_and_read_rgb_refuse_them(tmp_path, make, what):
    with pytest.raises(images.UnsupportedImageError, match=what):
        images.pil_rgb(make())
    path = tmp_path / "image.tif"
    make().save(path)
    with pytest.raises(UserInputError, match=f"image '{path}': .*{what}"):
        image_inputs.read_rgb(str(path))
    with pytest.raises(UserInputError, match=f"generate.image_files: '{path}': .*{what}"):
        generate_run.read_images([str(path)])


def test_16_bit_values_are_still_scaled_to_8_bits():
    assert (np.asarray(images.pil_rgb(_sixteen_bit())) == 80).all()
    assert (server.to_rgb(_sixteen_bit()) == 80).all()


@pytest.mark.parametrize("make", [_float_image, _wide_image])
def test_the_retrieval_service_answers_them_with_a_400(monkeypatch, make):
    """It reads image files by the same rule (`images.pil_rgb`). A PNG holds neither kind,
    so the decoder is handed one as another format would give it."""
    with pytest.raises(ValueError, match="not supported"):
        server.to_rgb(make())
    monkeypatch.setattr(server.PILImage, "open", lambda _: make())
    body = io.BytesIO()
    Image.new("RGB", (8, 8)).save(body, format="PNG")
    with pytest.raises(HTTPException) as raised:
        server.decode_png(body.getvalue(), server.ServiceLimits())
    assert raised.value.status_code == 400 and "not supported" in raised.value.detail
