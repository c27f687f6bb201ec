"""The generate run mode's inputs and outputs, checked without sampling (no compile).

Mistakes in the input end in one `error:` line (status 2) before the model is restored and
before anything is written; an earlier run's outputs are neither lost nor left under
another run's config.gin; the outputs are written through fs.py and their grids capped.
"""

import json
import os
import re
import uuid

import gin
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import fs
from cm3leon_jax import main as main_lib
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import generate_families, generate_run, pictures
from cm3leon_jax.decode.generate import Images
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.train import vocab_record
from tests.model.model_testlib import tiny_config, write_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(ROOT, "gin_configs", "runs", "generate.gin")


# A random image tokenizer of the `vocab` fixture's shape (16 codes per image from 64):
# generate builds the tokenizer before the restore.
RANDOM_VQ = ("load_image_tokenizer.checkpoint=None", "load_image_tokenizer.config=@VQGANConfig()",
             "VQGANConfig.image_size=32", "VQGANConfig.base_channels=8",
             "VQGANConfig.channel_multipliers=(1, 2, 2, 2)", "VQGANConfig.num_res_blocks=1",
             "VQGANConfig.attn_levels=()", "VQGANConfig.latent_channels=8",
             "VQGANConfig.embed_dim=8", "VQGANConfig.codebook_size=64",
             "VQGANConfig.num_groups=4")


def _main(capsys, out, *bindings):
    """(exit status, the `error:` lines) of the generate mode through main.main."""
    argv = [f"--gin_file={GENERATE}", f"--gin.MODEL_DIR='{out}'",
            "--gin.generate.retrieval_dir=None", *[f"--gin.{b}" for b in RANDOM_VQ + bindings]]
    gin.clear_config()
    try:
        code = main_lib.main(argv)
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def listed_not_restored(monkeypatch):
    """The checkpoint folder passes the listing check (`restore.check_checkpoint`), and any
    restore fails the test: what is named must be named before the restore."""
    def no_restore(*args, **kwargs):
        raise AssertionError("restored before refusing")
    monkeypatch.setattr(generate_run.restore, "check_checkpoint", lambda *args: [1])
    monkeypatch.setattr(generate_run.restore, "restore_decoder", no_restore)


def test_earlier_outputs_are_refused_before_config_gin_is_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.gin").write_text("run.mode = @generate\n# run A\n")
    (out / "generated.json").write_text("[]")
    code, errors = _main(capsys, out, f"generate.checkpoint='{tmp_path}/nowhere'",
                         "generate.captions=['a red circle']")
    assert code == 2 and len(errors) == 1 and "earlier run's outputs (generated.json)" in errors[0]
    assert (out / "config.gin").read_text() == "run.mode = @generate\n# run A\n"
    assert sorted(os.listdir(out)) == ["config.gin", "generated.json"]


def test_overwrite_removes_earlier_outputs_only_once_the_model_is_open(tmp_path, capsys,
                                                                        vocab):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000_0.png").write_bytes(b"png")
    (out / "generated.json").write_text("[]")
    code, errors = _main(capsys, out, f"generate.checkpoint='{tmp_path}/typo'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         "generate.captions=['a red circle']", "generate.overwrite=True")
    assert code == 2 and errors == [f"error: no checkpoints in '{tmp_path}/typo': give the "
                                    "MODEL_DIR of a train run (it holds checkpoints/<step>/state)."]
    assert (out / "generated.json").read_text() == "[]"
    assert (out / "images" / "000_0.png").exists()


def test_a_too_long_caption_is_named_before_the_restore(tmp_path, capsys, vocab,
                                                        listed_not_restored):
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())  # max_length 128, 16 image codes.
    long = " ".join(["red circle"] * 120)
    (tmp_path / "captions.txt").write_text(f"a blue star\n\n{long}\n")
    common = (f"generate.vocab_dir='{vocab.directory}'", "generate.captions=['a red circle']")
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.captions_file='{tmp_path}/captions.txt'", *common)
    assert code == 2 and len(errors) == 1, errors
    n = len(vocab.encode(long))
    assert errors[0] == (
        f"error: generate.captions_file '{tmp_path}/captions.txt', line 3: the caption has {n} "
        f"tokens, the model has room for 110 (DecoderConfig.max_length=128 of '{fits}' minus 16 "
        "image codes, the opening <eos> and the <break>): shorten it.")
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.negative_captions=['{long}']", *common)
    assert code == 2 and errors[0].startswith("error: generate.negative_captions[0]: the "
                                              f"caption has {n} tokens"), errors
    assert not (tmp_path / "out" / "images").exists()


def test_a_too_long_family_request_is_named_before_the_restore(tmp_path, capsys, vocab,
                                                               listed_not_restored):
    """A prompts file's request whose prompt leaves the model no room for its answer is
    named by file and line before the restore, as a too-long caption is."""
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())  # max_length 128, 16 image codes.
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "scene.png")
    long = "Is there a " + " and a ".join(["red circle"] * 40) + "?"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"family": "vqa", "image": "scene.png", "question": "Is it red?"}) + "\n"
        + json.dumps({"family": "caption", "image": "scene.png"}) + "\n"
        + json.dumps({"family": "vqa", "image": "scene.png", "question": long}) + "\n")
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         f"generate.prompts_file='{prompts}'")
    n = sft_prompts.prompt_ids(sft_prompts.vqa(np.zeros(16, np.int32), long), vocab).size
    assert n > 111
    assert code == 2 and errors == [
        f"error: {prompts}, line 3: the vqa request's prompt has {n} tokens, the model has "
        f"room for 111 (DecoderConfig.max_length=128 of '{fits}' minus the 16 tokens it "
        "generates and the opening <eos>): shorten its text."], errors
    assert not (tmp_path / "out" / "families").exists()


def test_another_models_vocabulary_is_named_before_the_restore(tmp_path, capsys, vocab,
                                                               listed_not_restored):
    small = tmp_path / "small"
    write_run_config(str(small), tiny_config(vocab_size=256))
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{small}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         "generate.captions=['a red circle']")
    assert code == 2 and errors == [
        f"error: generate.vocab_dir '{vocab.directory}' does not fit the model of "
        f"generate.checkpoint '{small}': the vocabulary has {vocab.layout.vocab_size} ids but "
        "DecoderConfig.vocab_size=256. Give the vocabulary of the data the model was trained on."]


def test_a_vocabulary_other_than_the_recorded_one_is_named_before_the_restore(
        tmp_path, capsys, vocab, listed_not_restored):
    """The trainer records its vocabulary's fingerprint (vocabulary.json); one of the same
    size and layout made from another text model fits every size check, and is refused."""
    trained = tmp_path / "trained"
    write_run_config(str(trained), tiny_config())
    record = {**vocab_record.of(vocab), "fingerprint": "0123456789abcdef",
              "directory": "/data/other/vocab"}
    (trained / vocab_record.FILE).write_text(json.dumps(record))
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{trained}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         "generate.captions=['a red circle']")
    assert code == 2 and errors == [
        f"error: generate.vocab_dir '{vocab.directory}' does not fit the model of "
        f"generate.checkpoint '{trained}': its model was trained on the vocabulary in "
        f"'/data/other/vocab' (fingerprint 0123456789abcdef), not this one (fingerprint "
        f"{vocab.fingerprint}: another text model or layout, even if of the same size). Give "
        "the vocabulary of the data the model was trained on."], errors
    vocab_record.write(str(trained), vocab)  # Its own: on to the (failing) restore.
    with pytest.raises(AssertionError, match="restored before refusing"):
        _main(capsys, tmp_path / "out", f"generate.checkpoint='{trained}'",
              f"generate.vocab_dir='{vocab.directory}'", "generate.captions=['a red circle']")


def test_a_retrieval_folder_of_another_vocabulary_is_named_before_the_restore(
        tmp_path, capsys, vocab, listed_not_restored):
    """The documents of a retrieval folder are token ids of the vocabulary preprocessing
    made them with (retrieval.json records it); the model would read another's as other
    words. A folder without a record inside a data folder is taken to hold its vocab/."""
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())
    vocab_record.write(str(fits), vocab)
    retrieval = tmp_path / "data" / "retrieval"
    retrieval.mkdir(parents=True)
    record = {**vocab_record.of(vocab), "fingerprint": "0123456789abcdef",
              "directory": "/data/other/vocab"}
    (retrieval / "retrieval.json").write_text(json.dumps({"vocabulary": record}))
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         f"generate.retrieval_dir='{retrieval}'",
                         "generate.captions=['a red circle']")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(
        f"error: generate.retrieval_dir '{retrieval}' does not fit generate.vocab_dir "
        f"'{vocab.directory}': its documents were tokenized with the vocabulary in "
        "'/data/other/vocab' (fingerprint 0123456789abcdef)"), errors
    (retrieval / "retrieval.json").write_text("{}")  # No record: its data folder's vocab/.
    other = fs.join(str(tmp_path / "data"), "vocab")
    with open(os.path.join(vocab.directory, "layout.json")) as f:
        layout = f.read()
    os.makedirs(other)
    with open(os.path.join(other, "layout.json"), "w") as f:
        f.write(layout)
    from sentencepiece import sentencepiece_model_pb2
    model = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(vocab.directory, "text.model"), "rb") as f:
        model.ParseFromString(f.read())
    model.pieces[-1].score -= 1.0  # Another text model of the same size and layout.
    with open(os.path.join(other, "text.model"), "wb") as f:
        f.write(model.SerializeToString())
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         f"generate.retrieval_dir='{retrieval}'",
                         "generate.captions=['a red circle']")
    assert code == 2 and f"the vocabulary in '{other}'" in errors[0], errors


def test_data_dir_and_a_folder_bound_apart_are_named(tmp_path, capsys):
    """generate.gin binds the demo's vocab_dir and retrieval_dir: a data_dir beside them
    would otherwise be ignored for them."""
    (tmp_path / "data" / "vocab").mkdir(parents=True)
    (tmp_path / "data" / "vocab" / "layout.json").write_text("{}")
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{tmp_path}/run'",
                         f"generate.data_dir='{tmp_path}/data'",
                         "generate.retrieval_dir=None", "generate.captions=['a red circle']")
    assert code == 2 and errors == [
        f"error: generate.data_dir='{tmp_path}/data' and generate.vocab_dir='runs/demo/data/"
        "vocab' name different folders (gin_configs/runs/generate.gin binds the demo's "
        "vocab_dir): bind generate.vocab_dir=None to take "
        f"{tmp_path}/data/vocab, as gin_configs/runs/generate_user.gin does, or leave "
        "data_dir unbound."], errors


@pytest.mark.parametrize("binding,match", [
    ("generate.seed=-1", "generate.seed=-1: give a whole number >= 0"),
    ("generate.batch_size=0", "generate.batch_size=0: give a whole number >= 1"),
    ("generate.num_samples='2'", "generate.num_samples='2': give a whole number >= 1"),
    ("generate.negative_captions=['x', ' ']", r"negative_captions\[1\] is empty"),
    ("generate.num_samples=2", r"num_samples=2 and generate.rerank_samples=4: re-ranking keeps")])
def test_bad_settings_are_named_before_anything_is_read(tmp_path, capsys, binding, match):
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{tmp_path}/run'",
                         "generate.captions=['a red circle', 'a blue star']",
                         "generate.rerank_samples=4" if "num_samples=2" in binding
                         else "generate.rerank_samples=1", binding)
    assert code == 2 and len(errors) == 1 and re.search(match, errors[0]), errors


def test_a_caption_length_past_the_model_is_named_before_the_restore(tmp_path, capsys, vocab,
                                                                     listed_not_restored):
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())  # max_length 128, 16 image codes.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         f"generate.image_files=['{tmp_path}/a.png']",
                         "generate.max_caption_tokens=5000")
    assert code == 2 and errors == [
        "error: generate.max_caption_tokens=5000: an image's prompt takes 18 tokens (its "
        f"opening <eos> too) of the 128 of '{fits}' (DecoderConfig.max_length); ask for at "
        "most 110."], errors  # generate.gin's image-first prompt: <eos> 16 codes <break>.


def test_image_files_are_read_upright_and_captions_as_training_reads_them(tmp_path,
                                                                          monkeypatch):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show.
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert np.asarray(generate_run.read_images([str(tmp_path / "phone.jpg")])[0]).shape == (
        40, 20, 3)
    assert _texts_read(monkeypatch, tmp_path, captions=["a red circle \n"]) == ["a red circle"]


def test_an_image_tokenizer_that_does_not_fit_the_vocabulary_is_named_before_the_restore(
        tmp_path, capsys, vocab, listed_not_restored):
    """The vocabulary holds 16 codes per image from 64; the tokenizer makes them from 32."""
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())
    code, errors = _main(capsys, tmp_path / "out", f"generate.checkpoint='{fits}'",
                         f"generate.vocab_dir='{vocab.directory}'",
                         "generate.captions=['a red circle']", "VQGANConfig.codebook_size=32")
    assert code == 2 and errors == [
        f"error: generate.image_tokenizer does not fit generate.vocab_dir '{vocab.directory}': "
        "the image tokenizer makes 16 codes per image from 32, the vocabulary expects 16 from "
        "64. Give the image tokenizer the training data was made with."], errors


def test_an_image_tokenizer_other_than_the_one_the_data_was_made_with_is_refused(
        tmp_path, capsys, vocab, listed_not_restored):
    """Of the same shape but other weights (another checkpoint or step): its codes mean
    other images. The data folder's plan.json records the one preprocessing used; generate
    (and eval and sft_preprocess, through the same `shards.check_image_tokenizer`) refuse
    another before the restore. The recorded one passes on to the restore."""
    import shutil

    from cm3leon_jax.vocab.image_tokenizer import load_image_tokenizer
    gin.clear_config()
    try:
        gin.parse_config(list(RANDOM_VQ))
        made_with = load_image_tokenizer().fingerprint  # seed 0
    finally:
        gin.clear_config()
    data = tmp_path / "data"
    shutil.copytree(vocab.directory, data / "vocab")
    (data / "plan.json").write_text(json.dumps(
        {"preprocess.image_tokenizer_fn": {"config_and_weights": made_with}}))
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())
    args = (f"generate.checkpoint='{fits}'", f"generate.vocab_dir='{data / 'vocab'}'",
            "generate.captions=['a red circle']")
    code, errors = _main(capsys, tmp_path / "out", *args, "load_image_tokenizer.seed=1")
    assert code == 2 and len(errors) == 1, errors
    assert re.match(rf"error: generate.image_tokenizer is not the image tokenizer the data in "
                    rf"'{data}' was made with \(its plan.json records {made_with}, this one "
                    r"is [0-9a-f]+: another checkpoint", errors[0]), errors
    with pytest.raises(AssertionError, match="restored before refusing"):
        _main(capsys, tmp_path / "out2", *args)


def test_image_first_captions_of_a_caption_first_model_are_refused(tmp_path, capsys, vocab,
                                                                   listed_not_restored):
    """Data laid out caption first only (preprocess_user.gin's): its model has not seen a
    caption after an image, and generate.gin's image-first prompt captioned from a prompt it
    was not trained on, silently. The infill is what such a model captions with."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(vocab.directory, data / "vocab")
    (data / "plan.json").write_text(json.dumps({"preprocess.image_first_prob": 0.0}))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    fits = tmp_path / "fits"
    write_run_config(str(fits), tiny_config())
    args = (f"generate.checkpoint='{fits}'", f"generate.vocab_dir='{data / 'vocab'}'",
            f"generate.image_files=['{image}']")
    code, errors = _main(capsys, tmp_path / "out", *args, "generate.caption_style='image_first'")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(
        "error: generate.caption_style='image_first', and the data in "), errors
    assert "Bind generate.caption_style='infill'" in errors[0]
    with pytest.raises(AssertionError, match="restored before refusing"):
        _main(capsys, tmp_path / "out2", *args, "generate.caption_style='infill'")


class _StopError(Exception):
    pass


def _texts_read(monkeypatch, tmp_path, **kwargs) -> list[str]:
    """The captions `generate` reads (stopped where it first checks them)."""
    seen = []

    def spy(texts, *args, **kwargs):
        seen.append(list(texts))
        raise _StopError

    monkeypatch.setattr(generate_run, "_check_settings", spy)
    with pytest.raises(_StopError):
        generate_run.generate(str(tmp_path / "out"), checkpoint=str(tmp_path / "nowhere"),
                              vocab_dir=str(tmp_path), image_tokenizer=lambda: None, **kwargs)
    return seen[0]


def test_a_captions_files_byte_order_mark_is_not_part_of_its_first_caption(tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "captions.txt"
    path.write_bytes("a red circle\r\n\r\na blue star\r\n".encode("utf-8-sig"))
    assert _texts_read(monkeypatch, tmp_path, captions_file=str(path)) == [
        "a red circle", "a blue star"]


def test_a_captions_file_without_captions_is_named(tmp_path):
    path = tmp_path / "captions.txt"
    for text in ("", "\n  \n", "\ufeff\n"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserInputError, match=f"captions_file '{path}' has no non-blank "
                                                 "lines"):
            generate_run.generate(str(tmp_path / "out"), checkpoint=str(tmp_path / "nowhere"),
                                  vocab_dir=str(tmp_path), image_tokenizer=lambda: None,
                                  captions_file=str(path))


def test_a_prompts_file_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(UserInputError, match=f"prompts_file '{tmp_path}' is a folder; give a "
                                             "JSONL file"):
        generate_families.read_requests(str(tmp_path))


def test_prompts_file_requests_are_read_whole_before_the_restore(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("these are words, not pixels")
    prompts = tmp_path / "prompts.jsonl"
    good = json.dumps({"family": "caption", "image": "a.png"})
    for line, match in (
            ({"family": "boxes_to_image", "caption": "c", "boxes": "red circle at (2,2,9,9)"},
             r"line 2: boxes must be a list of non-empty strings"),
            ({"family": "boxes_to_image", "caption": "c", "boxes": ["a box", " "]},
             r"line 2: boxes must be a list of non-empty strings"),
            ({"family": "vqa", "image": "bad.png", "question": "q?"},
             rf"line 2: image: image '{tmp_path}/bad.png' is not readable"),
            ({"family": "edit", "image": ".", "instruction": "x"}, r"line 2: image: image ")):
        prompts.write_text(f"{good}\n{json.dumps(line)}\n")
        with pytest.raises(UserInputError, match=match):
            generate_families.read_requests(str(prompts))
        # In the run: before the checkpoint (here missing) is read, and nothing written.
        with pytest.raises(UserInputError, match=match):
            generate_run.generate(str(tmp_path / "out"), checkpoint=str(tmp_path / "nowhere"),
                                  vocab_dir=str(tmp_path), image_tokenizer=lambda: None,
                                  prompts_file=str(prompts))
        assert not (tmp_path / "out").exists()


class _FakeGenerator:
    """What generate_families asks of a Generator: images of 8 px, one text answer."""

    class image_tokenizer:  # noqa: N801 (an attribute, as on Generator)
        image_size = 8

    def how_to_write(self, texts, *, num_samples, **_):
        images = np.full((num_samples, 8, 8, 3), 200, np.uint8)
        return Images(np.zeros((num_samples, 4), np.int32), images, texts * num_samples)

    def describe(self, images, **_):
        return ["a shape"]


def _prompts(tmp_path) -> str:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"family": "how_to_write", "text": "cat"}\n'
                       '{"family": "caption", "image": "a.png"}\n')
    return str(prompts)


def test_families_are_written_through_fs(tmp_path, capsys):
    prompts = _prompts(tmp_path)
    out = f"ram://families_{uuid.uuid4().hex[:8]}"
    entries = generate_families.generate_families(_FakeGenerator(), prompts, out,
                                                  num_samples=2)
    assert entries[0]["outputs"] == ["families/000_how_to_write_0.png",
                                     "families/000_how_to_write_1.png"]
    assert entries[1]["outputs"] == ["a shape"] and "_pixels" not in entries[1]
    # What each request was decoded with: a text answer once, whatever num_samples says.
    assert entries[0]["decoding"]["num_samples"] == 2
    assert entries[1]["decoding"]["num_samples"] == 1
    assert "answer once each (generate.num_samples=2" in capsys.readouterr().out
    with fs.open(f"{out}/families/000_how_to_write_1.png", "rb") as f:
        assert np.asarray(Image.open(f)).shape == (8, 8, 3)
    with fs.open(f"{out}/families.json") as f:
        assert json.load(f)["requests"] == entries
    assert fs.exists(f"{out}/families.png")


def test_families_json_comes_first_and_the_sheet_is_capped(tmp_path, monkeypatch, capsys):
    prompts = _prompts(tmp_path)
    grids = []
    monkeypatch.setattr(pictures, "grid", lambda images, captions, path, **kw: grids.append(
        (len(images), len(captions), fs.exists(f"{os.path.dirname(path)}/families.json"))))
    generate_families.generate_families(_FakeGenerator(), prompts, str(tmp_path / "many"),
                                        num_samples=70)
    assert grids == [(64, 64, True)]  # 70 pictures and 1 input: the first 64, after the json.
    assert "families.png shows the first 64 of 71 pictures" in capsys.readouterr().out


def test_generated_json_comes_first_and_the_grid_is_capped(tmp_path, monkeypatch, capsys):
    grids = []
    monkeypatch.setattr(pictures, "grid", lambda images, captions, path, **kw: grids.append(
        (len(images), list(captions), kw, os.path.exists(tmp_path / "generated.json"))))
    images = np.zeros((70, 4, 4, 3), np.uint8)
    captions = [f"caption {i // 2}" for i in range(70)]
    entries = generate_run.write_images(str(tmp_path), images, captions, num_samples=2)
    assert len(entries) == 35 and len(os.listdir(tmp_path / "images")) == 70
    assert json.loads((tmp_path / "generated.json").read_text()) == entries
    assert grids == [(64, captions[:64], {"columns": 8}, True)]
    assert "generated.png shows the first 64 of 70 images" in capsys.readouterr().out
    generate_run.write_images(str(tmp_path / "few"), images[:3], captions[:3], num_samples=1)
    assert grids[1][:3] == (3, captions[:3], {"columns": 3})


def test_the_last_line_says_what_the_run_made():
    assert generate_run._done(["a"], [], [{}, {}]) == (
        "1 caption(s) -> images, 2 request(s) of the SFT families (families.json)")
    assert generate_run._done([], ["x.png"], []) == "1 image(s) -> captions"
