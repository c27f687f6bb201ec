"""Public-format adapters on fixture files written in exactly those formats."""

import collections
import json
import os

import pytest
from PIL import Image

from cm3leon_jax.data import sft_formats, sft_preprocess
from cm3leon_jax.data.sft_preprocess import Skipped


def _png(path, color=(200, 30, 30), size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")


def _read_all(source):
    out = collections.defaultdict(list)
    for (split, family), records in source._all().items():
        out[family] += list(source.read(split, family, 0, len(records)))
    return out


def _reasons(items):
    return collections.Counter(x.reason for x in items if isinstance(x, Skipped))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    # InstructPix2Pix: 2 good, 1 missing edited image, 1 corrupt, 1 empty prompt, 1 bad JSON.
    _png(str(root / "ip2p/a.png"))
    _png(str(root / "ip2p/a_edit.png"), (30, 30, 200))
    _corrupt(str(root / "ip2p/bad.png"))
    rows = [{"original_image": "a.png", "edit_prompt": "make it blue",
             "edited_image": "a_edit.png"},
            {"input_image": "a.png", "instruction": "turn it blue", "output_image": "a_edit.png"},
            {"original_image": "a.png", "edit_prompt": "x", "edited_image": "gone.png"},
            {"original_image": "bad.png", "edit_prompt": "x", "edited_image": "a.png"},
            {"original_image": "a.png", "edit_prompt": "  ", "edited_image": "a.png"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (root / "ip2p/edits.jsonl").write_text("\n".join(lines) + "\n")
    # COCO: images 1 (640x480), 2 (missing file); captions for 1, 2 and unknown 9.
    _png(str(root / "coco/000000000001.jpg"), size=(64, 48))
    coco_images = [{"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "000000000002.jpg", "width": 64, "height": 48}]
    captions = {"info": {}, "licenses": [], "images": coco_images, "annotations": [
        {"id": 10, "image_id": 1, "caption": "A red square."},
        {"id": 11, "image_id": 1, "caption": ""},
        {"id": 12, "image_id": 2, "caption": "A missing picture."},
        {"id": 13, "image_id": 9, "caption": "No such image."}]}
    (root / "coco/captions_val2017.json").write_text(json.dumps(captions))
    instances = {"images": coco_images + [{"id": 3, "file_name": "000000000001.jpg",
                                           "width": 64, "height": 48}],
                 "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
                 "annotations": [
                     {"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 0, 16, 24]},
                     {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4]},
                     {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 4, 4]},
                     {"id": 4, "image_id": 2, "category_id": 1, "bbox": [10, 10, 10, 10]}]}
    (root / "coco/instances_val2017.json").write_text(json.dumps(instances))
    # VQAv2: q 100 ok, q 101 image missing, q 102 no annotation.
    _png(str(root / "vqa/COCO_val2014_000000000001.jpg"))
    (root / "vqa/q.json").write_text(json.dumps({"questions": [
        {"image_id": 1, "question": "What color is it?", "question_id": 100},
        {"image_id": 5, "question": "Is it there?", "question_id": 101},
        {"image_id": 1, "question": "Why?", "question_id": 102}]}))
    (root / "vqa/a.json").write_text(json.dumps({"annotations": [
        {"question_id": 100, "image_id": 1, "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_id": 1}]},
        {"question_id": 101, "image_id": 5, "multiple_choice_answer": "yes", "answers": []}]}))
    # Condition folder: x (edge + depth), y (no caption), z (corrupt depth map).
    for name in ("x", "y", "z"):
        _png(str(root / f"cond/image/{name}.png"))
        _png(str(root / f"cond/edge/{name}.png"), (255, 255, 255))
    _png(str(root / "cond/depth/x.png"), (128, 128, 128))
    _png(str(root / "cond/depth/y.png"), (128, 128, 128))
    _corrupt(str(root / "cond/depth/z.png"))
    (root / "cond/caption").mkdir()
    (root / "cond/caption/x.txt").write_text("a red square")
    (root / "cond/caption/z.txt").write_text("a red square")
    return root


def _source(root):
    return sft_formats.FormatSource({"train": [
        sft_formats.InstructPix2PixJsonl(str(root / "ip2p/edits.jsonl")),
        sft_formats.CocoCaptions(str(root / "coco/captions_val2017.json"), str(root / "coco")),
        sft_formats.CocoInstances(str(root / "coco/instances_val2017.json"),
                                  str(root / "coco"), image_size=32),
        sft_formats.Vqa2(str(root / "vqa/q.json"), str(root / "vqa/a.json"), str(root / "vqa")),
        sft_formats.ConditionFolder(str(root / "cond"))]})


def test_every_record_is_an_example_or_a_counted_skip(fixtures):
    got = _read_all(_source(fixtures))
    assert _reasons(got["edit"]) == {"missing_image": 1, "corrupt_image": 1, "empty_text": 1,
                                     "bad_json": 1}
    edits = [x for x in got["edit"] if not isinstance(x, Skipped)]
    assert [e.prompt.segments[2] for e in edits] == ["make it blue", "turn it blue"]
    assert edits[0].output[0, 0].tolist() == [30, 30, 200]
    assert _reasons(got["caption"]) == {"empty_text": 1, "missing_image": 1,
                                        "unknown_image_id": 1}
    assert [x.output for x in got["caption"] if not isinstance(x, Skipped)] == ["A red square."]
    assert _reasons(got["vqa"]) == {"missing_image": 1, "no_annotation": 1}
    assert [x.output for x in got["vqa"] if not isinstance(x, Skipped)] == ["red"]
    assert _reasons(got["edge_to_image"]) == {"missing_caption": 1}
    assert _reasons(got["depth_to_image"]) == {"missing_caption": 1, "corrupt_image": 1}
    boxes = got["boxes_to_image"]
    assert _reasons(boxes) == {"unknown_image_id": 1, "missing_image": 1, "no_boxes": 1}


def test_coco_boxes_follow_the_center_crop_and_resize(fixtures):
    # 64x48 -> crop x in [8, 56) -> scale 32/48: dog (8,0,16,24) -> (0,0,11,16); the cat
    # at x 0..4 lies left of the crop and is dropped.
    assert sft_formats.crop_box([8, 0, 16, 24], 64, 48, 32) == (0, 0, 11, 16)
    assert sft_formats.crop_box([0, 0, 4, 4], 64, 48, 32) is None
    got = [x for x in _read_all(_source(fixtures))["boxes_to_image"]
           if not isinstance(x, Skipped)]
    assert len(got) == 1
    assert got[0].prompt.segments[0] == ("Generate high quality image of dog with "
                                         "segmentations dog at (0,0,11,16)")


def test_unreadable_files_are_one_clear_error(tmp_path):
    (tmp_path / "captions_x.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        sft_formats.CocoCaptions(str(tmp_path / "captions_x.json"), str(tmp_path)).records()
    (tmp_path / "q.json").write_text(json.dumps({"nope": []}))
    with pytest.raises(ValueError, match="not a VQAv2 questions file"):
        sft_formats.Vqa2(str(tmp_path / "q.json"), str(tmp_path / "q.json"),
                         str(tmp_path)).records()
    with pytest.raises(FileNotFoundError, match="no image/ folder"):
        sft_formats.ConditionFolder(str(tmp_path)).records()


def test_preprocessing_a_format_source_counts_skips_in_the_manifest(fixtures, tmp_path):
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
    from tests.data.test_preprocess import tiny_image_tokenizer

    MultimodalVocabulary.create(str(tmp_path / "vocab"),
                                TextTokenizer.train(["a red square"] * 20, 266),
                                image_codes=64, num_sentinels=8, image_length=64)
    result = sft_preprocess.sft_preprocess(
        str(tmp_path / "out"), vocab_dir=str(tmp_path / "vocab"), source=_source(fixtures),
        image_tokenizer_fn=tiny_image_tokenizer, families=("edit", "vqa"), splits=("train",),
        seq_len=512)
    assert result["families"]["edit"]["train"]["written"] == 2
    assert result["families"]["edit"]["train"]["skipped"] == {
        "missing_image": 1, "corrupt_image": 1, "empty_text": 1, "bad_json": 1}
    assert result["families"]["vqa"]["train"]["skipped_sample_ids"]["no_annotation"] == [
        "vqa2:102"]
    assert result["source_report"]["train/edit"] == 6
