"""The generate run's re-ranking option: one image per caption, the CLIP arg-max."""

import json
import os

import gin
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.decode import generate_run, rerank
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from tests.evaluation.conftest import CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny_gin():
    """The run reads DecoderConfig from gin: bind tiny.gin (the checkpoint's shapes)."""
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin_configs/models/tiny.gin")], [])
    yield
    gin.clear_config()


def test_generate_run_keeps_the_best_of_n(eval_files, image_tokenizer, tmp_path, tiny_gin):
    captions = ["a small red circle above a yellow square", "a large blue star"]
    sampling = SamplingConfig(guidance="cfg")
    summary = generate_run.generate(
        str(tmp_path), checkpoint=eval_files["checkpoint"], vocab_dir=eval_files["vocab"],
        image_tokenizer=lambda: image_tokenizer, captions=captions, num_retrieved=0,
        image_sampling=sampling, rerank_samples=3, rerank_encoder_dir=eval_files["clip"],
        seed=5)
    entries = json.loads((tmp_path / "generated.json").read_text())
    assert [len(e["images"]) for e in entries] == [1, 1] == [len(e["images"])
                                                           for e in summary["images"]]
    gen = Generator(CONFIG, eval_files["params"], MultimodalVocabulary(eval_files["vocab"]),
                    image_tokenizer)
    want = rerank.best_of(gen, captions, num_samples=3, samplings=(sampling,), num_retrieved=0,
                          ranker=rerank.ClipRanker(DocumentEncoder.load(eval_files["clip"])),
                          seed=5)
    for entry, image in zip(entries, want.images.images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / entry["images"][0])),
                                      image)


def test_generate_run_takes_negative_captions(eval_files, image_tokenizer, tmp_path, tiny_gin):
    captions = ["a small red circle above a yellow square", "a large blue star"]
    common = dict(checkpoint=eval_files["checkpoint"], vocab_dir=eval_files["vocab"],
                  image_tokenizer=lambda: image_tokenizer, captions=captions, num_retrieved=0,
                  rerank_samples=2, rerank_encoder_dir=eval_files["clip"], seed=3)
    generate_run.generate(str(tmp_path), negative_captions="a green hexagon", **common)
    entries = json.loads((tmp_path / "generated.json").read_text())
    gen = Generator(CONFIG, eval_files["params"], MultimodalVocabulary(eval_files["vocab"]),
                    image_tokenizer)
    want = rerank.best_of(gen, captions, num_samples=2, num_retrieved=0, seed=3,
                          ranker=rerank.ClipRanker(DocumentEncoder.load(eval_files["clip"])),
                          negative_captions=["a green hexagon"] * 2)
    for entry, image in zip(entries, want.images.images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / entry["images"][0])),
                                      image)
    for bad, match in (({"negative_captions": ["a", "b", "c"]}, "has 3 texts for 2 captions"),
                       ({"negative_captions": ["a"], "captions": ()}, "without captions"),
                       ({"negative_captions": ["a"], "image_sampling": SamplingConfig(
                           guidance="none")}, "need image_sampling.guidance='cfg'")):
        with pytest.raises(generate_run.UserInputError, match=match):
            generate_run.generate(str(tmp_path / "bad"), **{**common, **bad})


def test_a_single_string_is_one_caption_not_one_per_character():
    assert generate_run.text_list("a red circle") == ["a red circle"]
    assert generate_run.text_list(("a", "b")) == ["a", "b"] and generate_run.text_list(()) == []
    assert generate_run.negatives_for(["x", "y"], "a red circle") == ["a red circle"] * 2


def test_a_generate_run_keeps_apart_from_its_inputs_and_an_earlier_runs_outputs(
        eval_files, image_tokenizer, tmp_path, tiny_gin):
    common = dict(checkpoint=eval_files["checkpoint"], vocab_dir=eval_files["vocab"],
                  image_tokenizer=lambda: image_tokenizer, num_retrieved=0, num_samples=2,
                  image_sampling=SamplingConfig(guidance="none"))
    out = tmp_path / "out"
    generate_run.generate(str(out), captions=["a large blue star", "a red circle"], **common)
    assert len(os.listdir(out / "images")) == 4
    with pytest.raises(generate_run.UserInputError, match="earlier run's outputs.*overwrite"):
        generate_run.generate(str(out), captions=["a red circle"], **common)
    generate_run.generate(str(out), captions=["a red circle"], overwrite=True, **common)
    assert sorted(os.listdir(out / "images")) == ["000_0.png", "000_1.png"]
    assert len(json.loads((out / "generated.json").read_text())) == 1
    # main.run asks before it writes config.gin: not into the trained run it reads.
    with gin.unlock_config():
        gin.bind_parameter("generate.checkpoint", eval_files["checkpoint"])
    for model_dir in (eval_files["checkpoint"], os.path.join(eval_files["checkpoint"], "gen")):
        with pytest.raises(generate_run.UserInputError, match="lies inside generate.checkpoint"):
            generate_run.generate.preflight(model_dir)
    generate_run.generate.preflight(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("bad, match", [
    ({"num_samples": 0}, "num_samples=0"),
    ({"captions": ["a red circle", "  "]}, "caption 1 is empty"),
    ({"caption_style": "poem"}, "caption_style='poem'"),
])
def test_bad_generate_settings_are_named_before_the_model_is_read(bad, match, tmp_path):
    kwargs = dict(checkpoint=str(tmp_path / "no_such_run"), vocab_dir=str(tmp_path),
                  image_tokenizer=lambda: None, captions=["a red circle"])
    with pytest.raises(generate_run.UserInputError, match=match):
        generate_run.generate(str(tmp_path / "out"), **{**kwargs, **bad})
    with pytest.raises(generate_run.UserInputError, match=r"SamplingConfig top_p=0 \(in \(0, 1\]"):
        SamplingConfig(top_p=0)


def test_a_16_bit_image_file_is_read_as_8_bit_rgb(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    (image,) = generate_run.read_images([str(path)])
    assert image.mode == "RGB" and np.asarray(image).min() == 255


def test_best_of_in_chunks_draws_what_one_call_draws(eval_files, image_tokenizer):
    """Each chunk continues the random streams (`first_row`): chunks change nothing."""
    gen = Generator(CONFIG, eval_files["params"], MultimodalVocabulary(eval_files["vocab"]),
                    image_tokenizer)
    captions = ["a large blue star", "a red circle", "a small green square"]
    common = dict(num_samples=2, num_retrieved=0, seed=4,
                  samplings=(SamplingConfig(guidance="none"),),
                  ranker=rerank.ClipRanker(DocumentEncoder.load(eval_files["clip"])))
    whole = rerank.best_of(gen, captions, **common)
    parts = rerank.best_of(gen, captions, chunk=2, **common)
    np.testing.assert_array_equal(whole.images.codes, parts.images.codes)
    np.testing.assert_array_equal(whole.scores, parts.scores)


def test_a_generate_run_twice_writes_the_same_files_and_another_seed_other_images(
        eval_files, image_tokenizer, tmp_path, tiny_gin):
    """The generate run end to end, deterministic given its seed: every file of two runs
    the same byte for byte (the images, their JSON, the sheet), seed 1 other images."""
    common = dict(checkpoint=eval_files["checkpoint"], vocab_dir=eval_files["vocab"],
                  image_tokenizer=lambda: image_tokenizer, num_retrieved=0, num_samples=2,
                  captions=["a small red circle above a yellow square", "a large blue star"])
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_run.generate(str(tmp_path / name), seed=seed, **common)

    def files(name):
        root = tmp_path / name
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = files("a"), files("b"), files("c")
    assert len(a) > 4 and a == b, sorted(k for k in a if a[k] != b.get(k))
    pngs = [k for k in a if k.endswith(".png") and "sheet" not in k]
    assert pngs and any(a[k] != c[k] for k in pngs)
