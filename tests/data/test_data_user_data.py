"""The user image-text builder: conversions, and an exact report of every rejected record."""

import json
import os
import pickle
import struct
import uuid
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cm3leon_jax import fs
from cm3leon_jax.data import user_data
from cm3leon_jax.errors import UserInputError

SIZE = 16


def save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode).save(path, **kwargs) if mode else Image.fromarray(array).save(
        path, **kwargs
    )


def rgb(seed: int, h: int = 24, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def bomb_png(path, side=30_000):
    """A PNG whose header claims side x side pixels (900M: over twice PIL's bomb limit) with
    a few bytes of data: PIL refuses it when opening, before decoding anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path):
    """good x2, grayscale, RGBA, palette, an upper-case pair (Upper.PNG + upper.TXT),
    corrupt, truncated, too small, a decompression bomb, empty caption, non-UTF-8 caption,
    no caption, caption without image; plus a non-image file that must be ignored."""
    root = tmp_path / "pairs"
    (root / "nested").mkdir(parents=True)
    save(root / "good1.png", rgb(1))
    save(root / "nested" / "good2.jpg", rgb(2))
    save(root / "gray.png", np.full((20, 20), 77, np.uint8))
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half transparent: must come out white
    save(root / "rgba.png", rgba)
    Image.fromarray(np.full((20, 20, 3), (0, 0, 200), np.uint8)).quantize(4).save(
        root / "palette.png"
    )
    (root / "corrupt.png").write_bytes(b"this is not a png at all" * 10)
    save(root / "truncated.png", rgb(3))
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    save(root / "empty.png", rgb(4))
    save(root / "latin1.png", rgb(5))
    save(root / "nocaption.png", rgb(6))
    save(root / "Upper.PNG", rgb(7))
    (root / "upper.TXT").write_text("matched whatever the case", encoding="utf-8")
    save(root / "small.png", rgb(8, h=SIZE - 1, w=64))  # 15 px high: never upscaled
    bomb_png(root / "bomb.png")
    captions = {
        "good1": "a red thing",
        "nested/good2": "another thing",
        "gray": "gray square",
        "rgba": "half red",
        "palette": "blue",
        "corrupt": "c",
        "truncated": "t",
        "empty": "  \n",
        "orphan": "no image for me",
        "small": "tiny",
        "bomb": "boom",
    }
    for stem, text in captions.items():
        (root / f"{stem}.txt").write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "notes.md").write_text("ignored")
    return root


def prepared(source, data_dir):
    return user_data.user_data_builder(source, SIZE, str(data_dir))


def examples_of(builder):
    """{id: example} over both splits."""
    return {e["id"].decode(): e for split in user_data.SPLITS
            for e in tfds.as_numpy(builder.as_dataset(split=split))}


def num_examples(builder):
    return sum(builder.info.splits[split].num_examples for split in user_data.SPLITS)


def test_folder_report_counts_every_reason_exactly(folder, tmp_path):
    builder = prepared(folder, tmp_path / "tfds")
    report = user_data.read_report(builder)
    assert report["rejected"] == {"bad_record": 0, "duplicate_record": 0, "missing_image": 1,
                                  "corrupt_image": 1, "image_outside_folder": 0,
                                  "unsupported_image_mode": 0,
                                  "truncated_image": 1, "image_too_small": 1,
                                  "decompression_bomb": 1, "missing_caption": 1,
                                  "empty_caption": 1, "non_utf8_caption": 1}
    assert (report["ok"], report["total"]) == (6, 14)
    assert report["rejected_ids"]["missing_image"] == ["orphan.txt"]
    assert report["rejected_ids"]["truncated_image"] == ["truncated.png"]
    assert report["rejected_ids"]["image_too_small"] == ["small.png"]
    assert report["rejected_ids"]["decompression_bomb"] == ["bomb.png"]
    assert report["rejected_ids"]["non_utf8_caption"] == ["latin1.png"]
    assert report["splits"]["train"] + report["splits"]["validation"] == 6
    assert report["splits"]["validation"] >= 1
    for split in user_data.SPLITS:
        assert builder.info.splits[split].num_examples == report["splits"][split]


def test_a_source_on_another_file_system_reads_the_same(folder, tmp_path):
    """The folder copied to TensorFlow's in-memory `ram://` (what gs:// goes through): the
    same records, the same report, and a JSONL there with relative and absolute paths."""
    remote = f"ram://user_data_{uuid.uuid4().hex[:8]}/pairs"
    fs.copy_tree(str(folder), remote)
    local = user_data.read_report(prepared(folder, tmp_path / "local"))
    report = user_data.read_report(prepared(remote, tmp_path / "remote"))
    assert {k: report[k] for k in ("ok", "total", "splits", "rejected", "rejected_ids")} == \
        {k: local[k] for k in ("ok", "total", "splits", "rejected", "rejected_ids")}
    assert report["source"] == remote
    jsonl = fs.join(os.path.dirname(remote), "pairs.jsonl")
    fs.write_text(jsonl, "\n".join(json.dumps(line) for line in (
        {"image": "pairs/good1.png", "text": "relative"},
        {"image": fs.join(remote, "gray.png"), "text": "absolute"},
        {"image": "pairs/nowhere.png", "text": "missing"})) + "\n")
    builder = prepared(jsonl, tmp_path / "remote_jsonl")
    assert user_data.read_report(builder)["rejected"]["missing_image"] == 1
    assert sorted(e["text"].decode() for e in examples_of(builder).values()) == \
        ["absolute", "relative"]


def test_folder_images_are_converted_to_rgb_squares(folder, tmp_path):
    builder = prepared(folder, tmp_path / "tfds")
    examples = examples_of(builder)
    assert sorted(examples) == ["Upper.PNG", "good1.png", "gray.png", "nested/good2.jpg",
                                "palette.png", "rgba.png"]
    assert examples["Upper.PNG"]["text"].decode() == "matched whatever the case"
    assert examples["nested/good2.jpg"]["text"].decode() == "another thing"
    for e in examples.values():
        assert e["image"].shape == (SIZE, SIZE, 3) and e["image"].dtype == np.uint8
    gray = examples["gray.png"]["image"].astype(int)
    assert np.abs(gray - 77).max() <= 1
    assert (np.abs(examples["palette.png"]["image"].astype(int) - [0, 0, 200]) <= 2).all()
    rgba = examples["rgba.png"]["image"].astype(int)
    np.testing.assert_allclose(rgba[:, :5], 255, atol=2)  # transparent half: white
    assert (np.abs(rgba[:, -5:] - [255, 0, 0]) <= 2).all()  # opaque half: red


def test_jsonl_source_with_relative_absolute_missing_and_bad_lines(folder, tmp_path):
    lines = [
        json.dumps({"image": "pairs/good1.png", "text": "relative"}),
        json.dumps({"image": str(folder / "gray.png"), "text": "absolute"}),
        json.dumps({"image": "pairs/nowhere.png", "text": "missing"}),
        json.dumps({"image": "pairs/corrupt.png", "text": "corrupt"}),
        json.dumps({"image": "pairs/rgba.png", "text": ""}),
        json.dumps({"image": "pairs/rgba.png", "text": "bad \udcff"}),
        json.dumps({"text": "no image key"}),
        "{not json",
        "",
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    builder = prepared(source, tmp_path / "tfds")
    report = user_data.read_report(builder)
    assert report["rejected"] == {"bad_record": 2, "duplicate_record": 0, "missing_image": 1,
                                  "corrupt_image": 1, "image_outside_folder": 0,
                                  "unsupported_image_mode": 0,
                                  "truncated_image": 0, "image_too_small": 0,
                                  "decompression_bomb": 0, "missing_caption": 0,
                                  "empty_caption": 1, "non_utf8_caption": 1}
    assert (report["ok"], report["total"]) == (2, 8)
    assert report["rejected_ids"]["bad_record"] == ["line7", "line8"]
    assert report["splits"] == {"train": 1, "validation": 1}  # The smallest source that trains.
    texts = sorted(e["text"].decode() for e in examples_of(builder).values())
    assert texts == ["absolute", "relative"]


def test_prepared_data_is_reused_until_the_source_changes(folder, tmp_path):
    """A changed source is refused (not read stale), rebuilt with overwrite=True once; the
    rebuilt copy is then reused as current, overwrite or not."""
    assert user_data.read_report(prepared(folder, tmp_path / "tfds"))["ok"] == 6
    assert user_data.read_report(prepared(folder, tmp_path / "tfds"))["ok"] == 6  # Reused.
    save(folder / "late.png", rgb(9))
    (folder / "late.txt").write_text("added later")
    with pytest.raises(UserInputError, match="changed since it was prepared.*overwrite=True"):
        prepared(folder, tmp_path / "tfds")
    rebuilt = user_data.user_data_builder(folder, SIZE, str(tmp_path / "tfds"), overwrite=True)
    assert user_data.read_report(rebuilt)["ok"] == 7 and num_examples(rebuilt) == 7
    stamp = os.path.getmtime(os.path.join(str(rebuilt.data_path), user_data.REPORT_NAME))
    again = user_data.user_data_builder(folder, SIZE, str(tmp_path / "tfds"), overwrite=True)
    assert os.path.getmtime(os.path.join(str(again.data_path), user_data.REPORT_NAME)) == stamp
    # The dataset API reads the same prepared copy (no rebuild), split by split.
    texts = [x["text"].numpy() for split in ("train", "validation") for x in
             user_data.load_user_data(folder, SIZE, str(tmp_path / "tfds"), split=split)]
    assert len(texts) == 7 and b"added later" in texts
    assert os.path.getmtime(os.path.join(str(again.data_path), user_data.REPORT_NAME)) == stamp
    (folder / "late.txt").write_text("a caption edited")  # Same name: its size and time differ.
    with pytest.raises(UserInputError, match="changed since it was prepared"):
        prepared(folder, tmp_path / "tfds")


def test_a_jsonl_source_is_stale_when_an_image_it_names_appears_or_changes(tmp_path):
    source = tmp_path / "pairs.jsonl"
    save(tmp_path / "one.png", rgb(1))
    save(tmp_path / "two.png", rgb(2))
    source.write_text("\n".join(json.dumps(line) for line in (
        {"image": "one.png", "text": "there"},
        {"image": "two.png", "text": "here"},
        {"image": "later.png", "text": "not yet"})) + "\n")
    assert user_data.read_report(prepared(source, tmp_path / "tfds"))["ok"] == 2
    save(tmp_path / "later.png", rgb(9))  # The missing image added; the file unchanged.
    with pytest.raises(UserInputError, match="changed since it was prepared"):
        prepared(source, tmp_path / "tfds")
    rebuilt = user_data.user_data_builder(str(source), SIZE, str(tmp_path / "tfds"),
                                          overwrite=True)
    assert user_data.read_report(rebuilt)["ok"] == 3
    save(tmp_path / "later.png", rgb(3))  # Edited in place.
    os.utime(tmp_path / "later.png", (1, 1))
    with pytest.raises(UserInputError, match="changed since it was prepared"):
        prepared(source, tmp_path / "tfds")


def test_reported_ids_are_capped(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for name in ("ok", "also_ok"):
        save(root / f"{name}.png", rgb(0))
        (root / f"{name}.txt").write_text("fine")
    for i in range(user_data.MAX_REPORTED_IDS + 5):
        (root / f"orphan{i:02d}.txt").write_text("no image")
    report = user_data.read_report(prepared(root, tmp_path / "tfds"))
    assert report["rejected"]["missing_image"] == user_data.MAX_REPORTED_IDS + 5
    assert len(report["rejected_ids"]["missing_image"]) == user_data.MAX_REPORTED_IDS


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "one.png"
    save(path, rgb(0))
    return str(path)


def test_the_validation_split_is_held_out_by_id_deterministically(picture):
    def _records(ids):
        return [user_data.Record(i, picture, "caption") for i in ids]
    ids = [f"photos/img_{i:04d}.jpg" for i in range(2000)]
    split = user_data.split_records(_records(ids), 0.1, SIZE)
    held = {r.id for r in split["validation"]}
    assert 150 <= len(held) <= 250  # ~10% (CRC32 of the id, not a random draw)
    assert held.isdisjoint(r.id for r in split["train"])
    assert len(held) + len(split["train"]) == len(ids)
    # Same ids, any order, any build: the same split; new records never move old ones.
    again = user_data.split_records(_records(ids[::-1] + ["new_a.jpg", "new_b.png"]), 0.1, SIZE)
    assert held == {r.id for r in again["validation"]} - {"new_a.jpg", "new_b.png"}
    assert {r.id for r in user_data.split_records(_records(ids), 0.3, SIZE)["validation"]} > held


def test_a_validation_split_of_unusable_images_still_holds_one_out(picture, tmp_path):
    """The one id under the fraction has a corrupt image: the next usable record is held out
    instead of leaving the trainer's evaluation without data."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    ids = sorted((f"img{i}.png" for i in range(10)), key=user_data.held_out_share)
    records = [user_data.Record(ids[0], str(bad), "caption")]
    records += [user_data.Record(i, picture, "caption") for i in ids[1:]]
    shares = [user_data.held_out_share(i) for i in ids[:2]]
    split = user_data.split_records(records, sum(shares) / 2, SIZE)
    assert [r.id for r in split["validation"]] == ids[:2]


def test_jsonl_ids_follow_the_record_not_its_line(tmp_path):
    """Moving, adding or repeating lines keeps every record's id (and so its split); a
    byte-order mark does not cost the first record."""
    pair = {"image": "a.png", "text": "a red square"}
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + "\n".join(
        json.dumps(d) for d in (pair, {"image": "b.png", "text": "b"})).encode())
    moved = tmp_path / "moved.jsonl"
    moved.write_text("\n".join(json.dumps(d) for d in (
        {"image": "c.png", "text": "new"}, {"image": "b.png", "text": "b"}, pair, pair,
        {"image": "a.png", "text": "another caption"})))
    ids = [r.id for r in user_data.jsonl_records(str(first))]
    again = {r.id: r.problem for r in user_data.jsonl_records(str(moved))}
    assert len(ids) == 2 and all(r is None or r == "duplicate_record" for r in again.values())
    assert set(ids) <= set(again) and "line4" in again and again["line4"] == "duplicate_record"
    assert len({i for i in again if i.startswith("a.png#")}) == 2  # Another caption, its own id.


def test_a_file_name_that_is_not_utf8_is_kept_printable(tmp_path):
    root = tmp_path / "names"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9")
    save(root / f"{name}.png", rgb(1))
    (root / f"{name}.txt").write_text("a cafe")
    (record,) = user_data.folder_records(str(root))
    assert record.id == "caf\\xe9.png" and record.problem is None
    record.id.encode("utf-8")  # What a TFDS string feature needs.
    assert os.path.exists(record.image)


def test_builder_configs_are_per_source_and_size_and_pickle(folder, tmp_path):
    a = user_data.make_user_config(folder, 16)
    assert a.name != user_data.make_user_config(folder, 32).name
    assert a.name != user_data.make_user_config(folder, 16, validation_fraction=0.2).name
    builder = user_data.UserImageText(source=folder, image_size=SIZE, data_dir=str(tmp_path))
    clone = pickle.loads(pickle.dumps(builder))
    assert clone.builder_config.source == str(folder) and clone.builder_config.image_size == SIZE


def test_clear_errors_for_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        user_data.make_user_config(tmp_path / "nope.jsonl")
    with pytest.raises(UserInputError, match="validation_fraction must be in"):
        user_data.make_user_config(tmp_path, validation_fraction=1.0)
    with pytest.raises(ValueError, match="needs source="):
        user_data.UserImageText(data_dir=str(tmp_path))
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.txt").write_text("caption without image")
    with pytest.raises(ValueError, match="no usable image-text pairs"):
        prepared(tmp_path / "only_bad", tmp_path / "tfds")


def test_a_source_of_another_kind_is_refused_before_a_folder_is_made(tmp_path):
    """A .csv was read only inside TFDS's preparation, which left its folder behind."""
    (tmp_path / "pairs.csv").write_text("image,text\na.png,a caption\n")
    with pytest.raises(UserInputError, match=r"pairs.csv' is neither a folder nor a \.jsonl "
                       r"file; give one of those \(one \{\"image\": path"):
        user_data.user_data_builder(str(tmp_path / "pairs.csv"), 32, str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()
