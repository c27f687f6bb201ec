"""Public-format adapters on fixture files written in exactly those formats."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import sft_formats, sft_preprocess
from cm3leon_jax.data.sft_preprocess import Skipped
from cm3leon_jax.errors import UserInputError


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
    from tests.data.test_preprocess import tiny_image_tokenizer

    result = sft_preprocess.sft_preprocess(
        str(tmp_path / "out"), vocab_dir=_vocab(tmp_path / "vocab"), source=_source(fixtures),
        image_tokenizer_fn=tiny_image_tokenizer, families=("edit", "vqa"), splits=("train",),
        seq_len=512)
    assert result["families"]["edit"]["train"]["written"] == 2
    # The source's other families, not planned here: said, not dropped without a word.
    assert set(result["left_out_families"]) == {"boxes_to_image", "caption", "depth_to_image",
                                                "edge_to_image"}
    assert result["families"]["edit"]["train"]["skipped"] == {
        "missing_image": 1, "corrupt_image": 1, "empty_text": 1, "bad_json": 1}
    assert result["families"]["vqa"]["train"]["skipped_sample_ids"]["no_annotation"] == [
        "vqa2:102"]
    assert result["source_report"]["train/edit"] == 6


def _vocab(path):
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

    MultimodalVocabulary.create(str(path), TextTokenizer.train(["a red square"] * 20, 266),
                                image_codes=64, num_sentinels=8, image_length=64)
    return str(path)


def test_images_are_read_upright_with_16_bit_scaled_and_transparency_white(tmp_path):
    """A 16-bit depth map keeps its range (PIL's RGB conversion saturates it), transparent
    pixels are white (as the tokenizer composites them), EXIF orientation is applied."""
    depth = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    assert sft_formats.load_image(str(tmp_path / "depth.png"))[0, :, 0].tolist() == [0, 100, 255]
    Image.fromarray(np.zeros((2, 2, 4), np.uint8), "RGBA").save(tmp_path / "clear.png")
    assert sft_formats.load_image(str(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored 4x2 pixels are shown rotated, 2 wide, 4 high.
    Image.new("RGB", (4, 2), (200, 30, 30)).save(tmp_path / "turned.png", exif=exif.tobytes())
    assert sft_formats.load_image(str(tmp_path / "turned.png")).shape == (4, 2, 3)


def _instances(tmp_path, images, anns, categories=({"id": 1, "name": "dog"},)):
    (tmp_path / "inst.json").write_text(json.dumps(
        {"images": images, "categories": list(categories), "annotations": anns}))
    return str(tmp_path / "inst.json")


def test_coco_boxes_take_the_tokenizer_size_and_the_loaded_pixels(tmp_path):
    """The frame is the image tokenizer's size (given by sft_preprocess, a different one
    bound by hand refused) and the crop the loaded image's own shape: a file whose stated
    width/height differ is counted, one that states none is placed by its pixels."""
    _png(str(tmp_path / "a.png"), size=(64, 48))
    path = _instances(tmp_path, [{"id": 1, "file_name": "a.png"},
                                 {"id": 2, "file_name": "a.png", "width": 48, "height": 64}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 0, 16, 24]},
                       {"id": 2, "image_id": 2, "category_id": 1, "bbox": [8, 0, 16, 24]}])
    unset = sft_formats.FormatSource({"train": [sft_formats.CocoInstances(path, str(tmp_path))]})
    with pytest.raises(UserInputError, match="has no image_size"):
        _read_all(unset)
    got = _read_all(unset.with_image_size(16))["boxes_to_image"]
    assert got[0].prompt.segments[0].endswith("dog at (0,0,6,8)")  # 48-px crop -> 16 px
    assert got[1] == Skipped("coco_boxes:2", "image_size_mismatch")
    fixed = sft_formats.FormatSource({"train": [
        sft_formats.CocoInstances(path, str(tmp_path), image_size=256)]})
    with pytest.raises(UserInputError, match=r"image_size=256 but the image tokenizer "
                                             r"encodes 16x16"):
        fixed.with_image_size(16)


def test_bad_field_types_are_counted_not_crashes(tmp_path):
    _png(str(tmp_path / "a.png"), size=(64, 48))
    path = _instances(
        tmp_path, [{"id": 1, "file_name": "a.png", "width": 64},  # no height: fine
                   {"id": 2, "file_name": "a.png", "width": "64", "height": 48},
                   {"id": 3, "file_name": "a.png"}, {"id": 4, "file_name": "a.png"},
                   {"id": 5, "file_name": "a.png"}],
        [{"image_id": 1, "category_id": 1, "bbox": [8, 0, 16, 24]},
         {"image_id": 2, "category_id": 1, "bbox": [8, 0, 16, 24]},
         {"image_id": 3, "category_id": 1, "bbox": ["8", 0, 16, 24]},
         {"image_id": 4, "category_id": 2, "bbox": [8, 0, 16, 24]},
         {"image_id": 5, "category_id": 1, "bbox": [8, 0, float("nan"), 24]},
         {"image_id": [1], "category_id": 1, "bbox": [8, 0, 16, 24]}, "not an object"],
        categories=[{"id": 1, "name": "dog"}, {"id": 2, "name": "cat \ud800"}])
    (tmp_path / "cap.json").write_text(json.dumps({"images": [
        {"id": 1, "file_name": "a.png"}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "a dog \ud800"}, ["not", "an", "object"],
        {"id": 3, "image_id": 1, "caption": "a dog"}]}))
    source = sft_formats.FormatSource({"train": [
        sft_formats.CocoInstances(path, str(tmp_path), image_size=32),
        sft_formats.CocoCaptions(str(tmp_path / "cap.json"), str(tmp_path))]})
    got = _read_all(source)
    assert _reasons(got["boxes_to_image"]) == {"bad_annotation": 4, "bad_text": 1,
                                               "unknown_image_id": 1}
    assert not isinstance(got["boxes_to_image"][-5], Skipped)  # image 1, by its pixels
    assert _reasons(got["caption"]) == {"bad_text": 1, "bad_annotation": 1}
    assert [x.output for x in got["caption"] if not isinstance(x, Skipped)] == ["a dog"]


def test_condition_folder_finds_any_case_and_counts_other_formats(tmp_path):
    for folder in ("image", "edge"):
        _png(str(tmp_path / f"cond/{folder}/cat.PNG"))
    _png(str(tmp_path / "cond/image/dog.tif"))
    _png(str(tmp_path / "cond/image/owl.png"))
    _png(str(tmp_path / "cond/edge/owl.gif"))
    (tmp_path / "cond/image/.DS_Store").write_bytes(b"")
    for name in ("cat", "dog", "owl"):
        os.makedirs(tmp_path / "cond/caption", exist_ok=True)
        (tmp_path / f"cond/caption/{name}.txt").write_text(f"a {name}")
    got = _read_all(sft_formats.FormatSource({"train": [
        sft_formats.ConditionFolder(str(tmp_path / "cond"))]}))["edge_to_image"]
    assert [x.doc_id for x in got] == ["condition:edge:cat", "condition:edge:dog",
                                       "condition:edge:owl"]
    assert got[0].truth == {"caption": "a cat"}
    assert got[1:] == [Skipped("condition:edge:dog", "unsupported_image_format"),
                       Skipped("condition:edge:owl", "unsupported_image_format")]


def test_jsonl_with_a_bom_reads_and_another_encoding_is_one_error(tmp_path):
    _png(str(tmp_path / "a.png"))
    row = {"original_image": "a.png", "edit_prompt": "make it blue", "edited_image": "a.png"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    records = sft_formats.InstructPix2PixJsonl(str(tmp_path / "bom.jsonl")).records()
    assert [r.skipped for r in records] == [None]
    (tmp_path / "latin.jsonl").write_bytes(json.dumps(row).encode() + b"\n"
                                           + json.dumps(row).encode()[:-2] + b' caf\xe9"}\n')
    with pytest.raises(UserInputError, match=r"latin.jsonl' line 2 is not UTF-8 \(byte 0xe9"):
        sft_formats.InstructPix2PixJsonl(str(tmp_path / "latin.jsonl")).records()


def test_edit_files_of_one_name_in_two_folders_keep_apart(tmp_path):
    row = {"original_image": "a.png", "edit_prompt": "x", "edited_image": "a.png"}
    for sub in ("p1", "p2"):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "edits.jsonl").write_text(json.dumps(row) + "\n")
    records = [r for sub in ("p1", "p2") for r in sft_formats.InstructPix2PixJsonl(
        str(tmp_path / sub / "edits.jsonl")).records()]
    assert len({r.doc_id for r in records}) == 2


def test_a_split_the_plan_does_not_name_is_refused(fixtures, tmp_path):
    from tests.data.test_preprocess import tiny_image_tokenizer

    source = sft_formats.FormatSource({"train": [], "val": [
        sft_formats.ConditionFolder(str(fixtures / "cond"))]})
    with pytest.raises(UserInputError, match=r"split 'val' is not one of sft_preprocess.splits "
                                             r"\('train', 'validation', 'test'\)"):
        sft_preprocess.sft_preprocess(str(tmp_path / "out"), vocab_dir=_vocab(tmp_path / "v"),
                                      source=source, image_tokenizer_fn=tiny_image_tokenizer)
    with pytest.raises(UserInputError, match=r"split_sizes=\{'train': 4\} has no 'validation'"):
        sft_preprocess.plan_shards(sft_preprocess.SyntheticSftSource(split_sizes={"train": 4}),
                                   ["caption"], ("train", "validation", "test"), 10)


def test_the_documented_public_format_command_parses():
    """Every --gin. flag sft_preprocess.gin documents binds what exists (a source of
    public formats with a train and a validation split among them)."""
    import shlex

    import gin

    from cm3leon_jax import main as main_lib

    gin_file = os.path.join(os.path.dirname(__file__), "..", "..", "gin_configs", "runs",
                            "sft_preprocess.gin")
    flags = []
    for line in open(gin_file):
        text = line.lstrip("#").strip().rstrip("\\").strip()
        if line.startswith("#") and text.startswith("--gin."):
            flags += shlex.split(text)
    bindings = [f[len("--gin."):] for f in flags]
    assert "sft_preprocess.source=@FormatSource()" in bindings
    gin.clear_config()
    try:
        main_lib.configure([gin_file], bindings)
        source = gin.query_parameter("sft_preprocess.source").scoped_configurable_fn()
        assert isinstance(source, sft_formats.FormatSource)
        assert source.splits["train"][0].annotations.endswith("captions_train2017.json")
        # With a validation split: the sft run evaluates on it.
        assert source.splits["validation"][0].annotations.endswith("captions_val2017.json")
    finally:
        gin.clear_config()


def test_the_built_in_source_refuses_scenes_too_small_to_draw():
    """At 8 px (an image tokenizer's size, bound to the corpus by mistake) the corpus cannot
    draw its shapes: one error naming the setting, before any Beam worker starts (they
    raised a ValueError traceback from inside the pipeline)."""
    with pytest.raises(UserInputError, match=r"SyntheticSftSource.image_size=8.*32 px"):
        sft_preprocess.SyntheticSftSource(image_size=8)
    assert sft_preprocess.SyntheticSftSource(image_size=32).image_size == 32
