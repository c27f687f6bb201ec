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


def test_folder_images_reads_files_as_read_rgb_does(tmp_path):
    # 16-bit grayscale (a depth map) is scaled to 8 bits, whatever its values: 51400 is
    # 200 and 200 is 1 (not 200 read as 8-bit); an EXIF orientation is applied.
    from cm3leon_jax.vocab import image_inputs

    for name, value in (("bright", 51400), ("dark", 200)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((20, 20), value, np.uint16)).save(tmp_path / name / "d.png")
    assert tuple(image_sources.folder_images(str(tmp_path / "bright"), 20)(0)[0, 0]) == (200,) * 3
    assert tuple(image_sources.folder_images(str(tmp_path / "dark"), 20)(0)[0, 0]) == (1,) * 3

    (tmp_path / "turned").mkdir()
    path = tmp_path / "turned" / "t.png"
    stored = np.random.default_rng(0).integers(0, 256, (20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise, 40 high and 20 wide.
    Image.fromarray(stored).save(path, exif=exif)
    upright = image_inputs.read_rgb(str(path))
    assert upright.shape == (40, 20, 3)
    src = image_sources.folder_images(str(tmp_path / "turned"), 20, flip=False)
    for i in range(3):
        crop = src(i)
        assert any(np.array_equal(crop, upright[y:y + 20]) for y in range(21)), i
