"""Public-format inputs that are easy to get slightly wrong: captions with a byte-order
mark, orphan and same-name files in a condition folder, source files edited between two
runs into one folder, and a source without a validation split."""

import json
import os
import types

import pytest
from PIL import Image

from cm3leon_jax.data import sft_formats, sft_preprocess
from cm3leon_jax.data.sft_preprocess import Skipped
from cm3leon_jax.errors import UserInputError


def _png(path, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _caption(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _edge_records(root):
    source = sft_formats.FormatSource({"train": [sft_formats.ConditionFolder(str(root))]})
    return list(source.read("train", "edge_to_image", 0, source.num_examples(
        "train", "edge_to_image")))


def test_a_condition_caption_with_a_byte_order_mark_reads_without_it(tmp_path):
    for folder in ("image", "edge"):
        _png(str(tmp_path / folder / "cat.png"))
    _caption(str(tmp_path / "caption/cat.txt"), b"\xef\xbb\xbfa red cat")
    (example,) = _edge_records(tmp_path)
    assert example.truth == {"caption": "a red cat"}


def test_condition_files_without_an_image_or_of_one_name_are_counted(tmp_path):
    """A map or caption with no image is `missing_image`; a second file of one NAME (in
    image/ or the condition's folder) is `duplicate_name`, the first by IMAGE_EXTENSIONS
    order being read."""
    for name in ("a", "x"):
        _png(str(tmp_path / f"image/{name}.png"))
        _png(str(tmp_path / f"edge/{name}.png"), (255, 255, 255))
        _caption(str(tmp_path / f"caption/{name}.txt"), f"a {name}".encode())
    _png(str(tmp_path / "image/a.jpg"), (0, 0, 200))
    _png(str(tmp_path / "edge/x.jpg"))
    _png(str(tmp_path / "edge/orphan.png"))
    _caption(str(tmp_path / "caption/lonely.txt"), b"no picture")
    got = _edge_records(tmp_path)
    examples = [x for x in got if not isinstance(x, Skipped)]
    assert [x.doc_id for x in examples] == ["condition:edge:a", "condition:edge:x"]
    assert examples[0].output[0, 0].tolist() == [200, 30, 30]  # a.png, not a.jpg
    assert [x for x in got if isinstance(x, Skipped)] == [
        Skipped("condition:edge:lonely", "missing_image"),
        Skipped("condition:edge:orphan", "missing_image"),
        Skipped("condition:edge:image/a.jpg", "duplicate_name"),
        Skipped("condition:edge:edge/x.jpg", "duplicate_name")]


def _plan(model_dir, adapters):
    """`sft_preprocess`'s plan check, with a source made anew (as each run makes one)."""
    source = sft_formats.FormatSource({"train": adapters})
    specs = sft_preprocess.plan_shards(source, ["edge_to_image", "edit"], ["train"], 10)
    sft_preprocess.check_plan(str(model_dir), source, specs, seq_len=512,
                              families=["edge_to_image", "edit"])


def test_a_rerun_after_the_source_files_changed_is_refused(tmp_path, caplog):
    """The content of the files the adapters read (sizes, modification times, listings)
    is in plan.json: finished shards of the earlier files are not kept as done. A plan.json
    from before it was recorded is compared as before."""
    root = tmp_path / "cond"
    _png(str(root / "image/cat.png"))
    _png(str(root / "edge/cat.png"))
    _caption(str(root / "caption/cat.txt"), b"a cat")
    _png(str(tmp_path / "ip2p/a.png"))
    row = json.dumps({"original_image": "a.png", "edit_prompt": "x", "edited_image": "a.png"})
    (tmp_path / "ip2p/edits.jsonl").write_text(row + "\n")
    adapters = [sft_formats.ConditionFolder(str(root)),
                sft_formats.InstructPix2PixJsonl(str(tmp_path / "ip2p/edits.jsonl"))]
    out = tmp_path / "out"
    _plan(out, adapters)
    _plan(out, adapters)  # Unchanged: a resume.
    refused = r"files sft_preprocess.source reads changed .*Give sft_preprocess a new MODEL_DIR"
    _caption(str(root / "caption/cat.txt"), b"a black cat")
    with pytest.raises(UserInputError, match=refused):
        _plan(out, adapters)
    _caption(str(root / "caption/cat.txt"), b"a cat")
    os.utime(root / "caption/cat.txt", ns=(0, 0))  # Same bytes, touched: refused too.
    with pytest.raises(UserInputError, match=refused):
        _plan(out, adapters)
    other = tmp_path / "out2"
    _plan(other, adapters)
    (tmp_path / "ip2p/edits.jsonl").write_text(row.replace('"x"', '"y"') + "\n")
    with pytest.raises(UserInputError, match=refused):
        _plan(other, adapters)
    plan = json.loads((other / "plan.json").read_text())
    del plan["source_content"]
    (other / "plan.json").write_text(json.dumps(plan))
    caplog.set_level("WARNING")
    _plan(other, adapters)  # Recorded before the content was: accepted, as before.
    assert "predates recording source_content" in caplog.text


def _no_image_tokenizer():
    """What sft_preprocess asks of the image tokenizer before it encodes anything."""
    return types.SimpleNamespace(codes_per_image=64, image_size=8, fingerprint="none")


def test_a_source_without_a_validation_split_is_logged(tmp_path, caplog):
    """sft_preprocess warns that a source has no validation split (the sft run evaluates
    on it and refuses SFT data without it)."""
    from tests.data.test_sft_formats import _vocab

    root = tmp_path / "cond"
    _png(str(root / "image/cat.png"))
    _png(str(root / "edge/cat.png"))
    source = sft_formats.FormatSource({"train": [sft_formats.ConditionFolder(str(root))]})
    caplog.set_level("WARNING")
    # Nothing in the families asked for: no shard to write (and no image to encode), the
    # warning all the same.
    sft_preprocess.sft_preprocess(str(tmp_path / "out"), vocab_dir=_vocab(tmp_path / "v"),
                                  source=source, image_tokenizer_fn=_no_image_tokenizer,
                                  families=("caption",))
    assert "no 'train' or 'validation' or 'test' examples" in caplog.text
    assert "FormatSource.splits={'train': [...], 'validation': [...]}" in caplog.text
    caplog.clear()
    specs = sft_preprocess.plan_shards(source, ["edge_to_image"], ["train", "validation"], 10)
    assert sft_preprocess.warn_missing_splits(specs, ["train", "validation"]) == ["validation"]
    assert "no 'validation' examples. An sft run evaluates on the 'validation'" in caplog.text


def _read_all(adapter, family):
    source = sft_formats.FormatSource({"train": [adapter]})
    return list(source.read("train", family, 0, source.num_examples("train", family)))


def test_coco_and_vqa_records_that_would_pair_the_wrong_image_are_refused_or_counted(tmp_path):
    """An image id listed twice (the last entry won: captions and boxes went onto another
    picture), a repeated annotation or question id (written twice, the second question
    given the first's answer), a question whose annotation names another image, a crowd
    region or an empty box taken as an object."""
    _png(str(tmp_path / "img" / "a.png"), (200, 30, 30))
    _png(str(tmp_path / "img" / "b.png"), (30, 30, 200))
    twice = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
             "annotations": [{"id": 10, "image_id": 1, "caption": "A red square."}]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(UserInputError, match=r"lists image id 1 twice \('a.png' and 'b.png'\)"):
        _read_all(sft_formats.CocoCaptions(str(tmp_path / "twice.json"), str(tmp_path / "img")),
                  "caption")
    captions = {"images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [{"id": 10, "image_id": 1, "caption": "A red square."},
                                {"id": 10, "image_id": 1, "caption": "Again."}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    read = _read_all(sft_formats.CocoCaptions(str(tmp_path / "captions.json"),
                                              str(tmp_path / "img")), "caption")
    assert [getattr(r, "reason", None) for r in read] == [None, "duplicate_record"]

    questions = {"questions": [{"question_id": 100, "image_id": 1, "question": "Color?"},
                               {"question_id": 100, "image_id": 1, "question": "dup?"},
                               {"question_id": 101, "image_id": 1, "question": "Shape?"},
                               {"question_id": 102, "image_id": True, "question": "Bool?"}]}
    answers = {"annotations": [{"question_id": 100, "image_id": 1,
                                "multiple_choice_answer": "red"},
                               {"question_id": 101, "image_id": 2,
                                "multiple_choice_answer": "square"},
                               {"question_id": 102, "image_id": True,
                                "multiple_choice_answer": "yes"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    read = _read_all(sft_formats.Vqa2(str(tmp_path / "q.json"), str(tmp_path / "a.json"),
                                      str(tmp_path / "img"), image_pattern="{image_id:0}.png"),
                     "vqa")
    assert [getattr(r, "reason", None) for r in read][1:] == [
        "duplicate_record", "bad_annotation", "bad_annotation"]

    instances = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                 "categories": [{"id": 5, "name": "dog"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 5,
                                  "bbox": [0, 0, 4, 4], "iscrowd": 1}]}
    boxes = tmp_path / "instances.json"
    boxes.write_text(json.dumps(instances))
    adapter = sft_formats.CocoInstances(str(boxes), str(tmp_path / "img"), image_size=8)
    assert [r.reason for r in _read_all(adapter, "boxes_to_image")] == ["no_boxes"]
    instances["annotations"][0].update(iscrowd=0, bbox=[2, 2, -3, 4])
    boxes.write_text(json.dumps(instances))
    assert [r.reason for r in _read_all(adapter, "boxes_to_image")] == ["bad_annotation"]
