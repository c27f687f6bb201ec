"""User-data ingestion: JSONL records split by image, paths normalised and kept inside the
file's folder, captions stripped, and images without one 8-bit reading counted as skips."""

import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cm3leon_jax.data import user_data

SIZE = 16


def _png(path, seed=0, side=20):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)
                    ).save(path)


def _jsonl(path, entries):
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")
    return path


def _examples(builder):
    """{id: (split, text)} over both splits."""
    return {e["id"].decode(): (split, e["text"].decode()) for split in user_data.SPLITS
            for e in tfds.as_numpy(builder.as_dataset(split=split))}


def test_the_captions_of_one_image_share_its_split(tmp_path):
    """COCO-style: 20 images with 5 captions each; at any fraction no image is in both."""
    for i in range(20):
        _png(tmp_path / f"img{i:02d}.png", seed=i)
    source = _jsonl(tmp_path / "captions.jsonl", [
        {"image": f"img{i:02d}.png", "text": f"caption {c} of image {i}"}
        for i in range(20) for c in range(5)])
    records = list(user_data.jsonl_records(str(source)))
    assert len({r.id for r in records}) == 100 and all(r.problem is None for r in records)
    for fraction in (0.05, 0.3, 0.5):
        split = user_data.split_records(records, fraction, SIZE)
        train, held = ({os.path.normpath(r.image) for r in split[s]} for s in user_data.SPLITS)
        assert held and train and not held & train, fraction
        assert len(split["train"]) + len(split["validation"]) == 100


def test_a_path_written_two_ways_is_one_image_and_paths_stay_inside_the_folder(tmp_path):
    """`a.png` and `./a.png` with one caption are a duplicate; `../` out of the JSONL's folder
    is skipped and counted (an absolute path elsewhere is read as given)."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        _png(root / f"{name}.png", seed=len(name))
    _png(tmp_path / "outside.png", seed=9)
    source = _jsonl(root / "pairs.jsonl", [
        {"image": "a.png", "text": "a red square"},
        {"image": "./a.png", "text": "a red square"},
        {"image": "sub/../b.png", "text": "b"},
        {"image": "sub/c.png", "text": "c"},
        {"image": "../outside.png", "text": "escapes the folder"},
        {"image": str(tmp_path / "outside.png"), "text": "absolute, elsewhere"},
        {"image": str(root / "b.png"), "text": "b by its absolute path"}])
    problems = [(r.id, r.problem) for r in user_data.jsonl_records(str(source))]
    assert [p for _, p in problems].count("duplicate_record") == 1
    builder = user_data.user_data_builder(source, SIZE, str(tmp_path / "tfds"))
    report = user_data.read_report(builder)
    assert report["rejected"]["duplicate_record"] == 1
    assert report["rejected"]["image_outside_folder"] == 1
    assert report["rejected_ids"]["image_outside_folder"] == ["line5"]
    assert (report["ok"], report["total"]) == (5, 7)
    names = {i.split("#")[0] for i in _examples(builder)}
    assert names == {"a.png", "b.png", "sub/c.png", str(tmp_path / "outside.png")}


def test_captions_are_read_without_surrounding_whitespace(tmp_path):
    """A .txt ending in a newline (as editors and `echo` write it), CRLF line ends and
    spaces around a JSONL caption: the dataset holds the caption a prompt would be."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, caption in (("cat", "a cat\n"), ("dog", "  a dog\r\n"),
                          ("two", "line one\r\nline two\r\n")):
        _png(folder / f"{name}.png", seed=len(name))
        (folder / f"{name}.txt").write_bytes(caption.encode())
    texts = {i: t for i, (_, t) in _examples(
        user_data.user_data_builder(folder, SIZE, str(tmp_path / "tfds"))).items()}
    assert texts == {"cat.png": "a cat", "dog.png": "a dog", "two.png": "line one\nline two"}
    source = _jsonl(folder / "pairs.jsonl", [{"image": "cat.png", "text": " a cat \n"},
                                             {"image": "cat.png", "text": "a cat"},
                                             {"image": "dog.png", "text": "a dog\t"}])
    builder = user_data.user_data_builder(source, SIZE, str(tmp_path / "tfds"))
    assert sorted(t for _, t in _examples(builder).values()) == ["a cat", "a dog"]
    assert user_data.read_report(builder)["rejected"]["duplicate_record"] == 1


def test_images_without_one_8_bit_reading_are_counted_as_unsupported(tmp_path):
    """A float TIFF (PIL mode F, values 0.5) came out black and 32-bit integers beyond
    65535 saturated white; they are skipped as unsupported_image_mode. 16-bit grayscale
    is still scaled to 8 bits."""
    root = tmp_path / "modes"
    root.mkdir()
    Image.fromarray(np.full((20, 20), 0.5, np.float32), "F").save(root / "float.tif")
    Image.fromarray(np.full((20, 20), 100_000, np.int32), "I").save(root / "wide.tif")
    Image.fromarray(np.full((20, 20), 257 * 80, np.uint16)).save(root / "depth.png")
    _png(root / "rgb.png")
    for name in ("float", "wide", "depth", "rgb"):
        (root / f"{name}.txt").write_text(f"a {name} image")
    builder = user_data.user_data_builder(root, SIZE, str(tmp_path / "tfds"))
    report = user_data.read_report(builder)
    assert report["rejected"]["unsupported_image_mode"] == 2
    assert sorted(report["rejected_ids"]["unsupported_image_mode"]) == ["float.tif", "wide.tif"]
    depth = {e["id"].decode(): e["image"] for split in user_data.SPLITS
             for e in tfds.as_numpy(builder.as_dataset(split=split))}["depth.png"]
    assert np.abs(depth.astype(int) - 80).max() <= 1
