"""Image sources for tokenizer training: deterministic, random access, any folder.

The synthetic corpus's source is data: tests/data/test_synthetic.py."""

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.vocab import image_sources


def test_folder_images(tmp_path):
    # Solid colors, so a crop tells which file it came from.
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((40, 60, 3), (200, 0, 0), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((50, 50), 100, np.uint8)).save(tmp_path / "sub/b.png")  # gray
    Image.fromarray(np.full((20, 30, 4), (0, 0, 200, 255), np.uint8)).save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = image_sources.folder_images(str(tmp_path), image_size=16, seed=1)
    crops = [src(i) for i in range(6)]
    assert all(x.shape == (16, 16, 3) and x.dtype == np.uint8 for x in crops)
    np.testing.assert_array_equal(crops[4], src(4))  # random access, same answer
    colors = [tuple(x[0, 0]) for x in crops]
    # Each epoch (3 examples) visits every file exactly once.
    assert set(colors[:3]) == set(colors[3:]) == {(200, 0, 0), (100, 100, 100), (0, 0, 200)}

    (tmp_path / "d.png").write_bytes(b"broken")
    broken = image_sources.folder_images(str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match="d.png"):
        [broken(i) for i in range(4)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_sources.folder_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_sources.folder_images(str(tmp_path / "empty"))


def test_array_images_crops():
    big = np.zeros((100, 200), np.uint8)  # grayscale, non-square
    src = image_sources.array_images([big, np.full((64, 64, 3), 200, np.uint8)], image_size=32,
                                     min_scale=0.25)
    assert src(0).shape == (32, 32, 3) and (src(0) == 0).all()
    assert (src(1) == 200).all()
    np.testing.assert_array_equal(src(5), src(5))
