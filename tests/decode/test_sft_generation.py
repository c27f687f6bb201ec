"""The Generator's SFT family methods on a tiny random decoder: the training prompt
builder's layout, guidance streams, two-scale editing, infilling."""

import jax
import numpy as np
import pytest

from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import prompts
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.decode.sampler import left_pad, sample
from cm3leon_jax.vocab.layout import BREAK_ID
from tests.model.model_testlib import random_params, tiny_config

CONFIG = tiny_config()
PARAMS = random_params(CONFIG, seed=2)
CODES = np.random.default_rng(0).integers(0, 64, (3, 16))
GREEDY = SamplingConfig(greedy=True, guidance="none")


@pytest.fixture(scope="module")
def gen(vocab):
    # One prompt width (64) for every family: few shapes, few compilations.
    return Generator(CONFIG, PARAMS, vocab, batch_size=4, prompt_multiple=64)


def test_edit_streams_mask_the_instruction_then_the_image(gen, vocab):
    prompts = [sft_prompts.edit(c, "make the red circle blue") for c in CODES[:1]]
    full, image_only, neither = (s[0] for s in gen._streams(prompts, SamplingConfig(), (1.5, 7.5)))
    np.testing.assert_array_equal(full, sft_prompts.prompt_ids(prompts[0], vocab))
    s0, s1 = vocab.layout.sentinel_id(0), vocab.layout.sentinel_id(1)
    head = np.asarray(vocab.encode("Edit first image following the instruction"))
    image = vocab.layout.codes_to_ids(CODES[0])
    np.testing.assert_array_equal(image_only, np.concatenate(
        [head, [BREAK_ID], image, [BREAK_ID, s0, BREAK_ID]]))
    np.testing.assert_array_equal(neither, np.concatenate(
        [head, [BREAK_ID, s0, BREAK_ID, s1, BREAK_ID]]))


def test_a_vqa_prompt_ends_in_its_question_and_masks_only_the_question(vocab):
    """The answer follows the question, not the image (sft_prompts' module doc)."""
    prompt = sft_prompts.vqa(CODES[0], "What color is the circle?")
    image = vocab.layout.codes_to_ids(CODES[0])
    question = np.asarray(vocab.encode("Question: What color is the circle?"))
    np.testing.assert_array_equal(sft_prompts.prompt_ids(prompt, vocab), np.concatenate(
        [image, [BREAK_ID], question, [BREAK_ID]]))
    np.testing.assert_array_equal(sft_prompts.prompt_ids(prompt.masked(text=True), vocab),
                                  np.concatenate([image, [BREAK_ID, vocab.layout.sentinel_id(0),
                                                          BREAK_ID]]))


def test_two_scale_one_one_edits_like_the_full_prompt_alone(gen):
    instructions = ["make the red circle blue", "remove the star", "add a small green square"]
    plain = gen.edit(CODES, instructions, sampling=GREEDY)
    guided = gen.edit(CODES, instructions, sampling=SamplingConfig(greedy=True),
                      image_scale=1.0, text_scale=1.0)
    np.testing.assert_array_equal(plain.codes, guided.codes)
    paper = gen.edit(CODES, instructions, sampling=SamplingConfig(greedy=True))
    assert paper.codes.shape == (3, 16) and paper.captions == instructions
    assert (paper.codes != plain.codes).any()  # The scales do move the choice.


def test_family_outputs_are_what_the_sampler_gives_for_the_builders_prompt(gen, vocab):
    """vqa uses exactly sft_prompts' ids (the training layout), after the opening <eos>."""
    questions = ["How many shapes are there?"] * 3
    answers = gen.vqa(CODES, questions, max_tokens=6)
    rows = [prompts.opened(sft_prompts.prompt_ids(sft_prompts.vqa(c, q), vocab))
            for c, q in zip(CODES, questions)]
    stop = proc.TextOnly(vocab.layout, 6, (1, BREAK_ID))
    out = sample(CONFIG, PARAMS, left_pad(rows + [rows[-1]]), jax.random.key(0),
                 max_new_tokens=6, processors=(stop,), stop=stop, greedy=True)
    for i, answer in enumerate(answers):
        tokens = np.asarray(out.tokens[i, :int(out.lengths[i])])
        text = tokens[vocab.layout.is_text(tokens)]
        assert answer == vocab.text_tokenizer.decode(vocab.layout.ids_to_text(text)).strip()


def test_every_image_family_gives_image_codes_and_is_deterministic(gen):
    runs = [
        lambda s: gen.grounded(CODES, ["a red circle"] * 3, condition="depth", seed=s),
        lambda s: gen.boxes_to_image(["a red circle"], [["red circle at (2,2,10,10)"]], seed=s),
        lambda s: gen.how_to_write(["cat", "42"], sampling=SamplingConfig(guidance="cdk"),
                                   seed=s),
        lambda s: gen.segment(CODES, ["the red circle"] * 3, num_samples=2, seed=s),
    ]
    for run in runs:
        a, b = run(0), run(0)
        assert a.codes.ndim == 2 and a.codes.shape[1] == 16
        assert ((a.codes >= 0) & (a.codes < 64)).all()
        np.testing.assert_array_equal(a.codes, b.codes)
    assert all(isinstance(t, str) for t in gen.describe(CODES, long=True, max_tokens=5))


def test_infilling_keeps_what_is_not_masked(gen):
    out = gen.infill_image(CODES, ["a red circle"] * 3, rows=(1, 3), seed=1)
    np.testing.assert_array_equal(out.codes[:, :4], CODES[:, :4])
    np.testing.assert_array_equal(out.codes[:, 12:], CODES[:, 12:])
    assert (out.codes[:, 4:12] != CODES[:, 4:12]).any()
    texts = gen.infill_text(["a"] * 3, ["above a yellow square"] * 3, CODES, max_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="rows"):
        gen.infill_image(CODES, ["x"] * 3, rows=(3, 3))


def test_bad_inputs_are_one_clear_error(gen):
    with pytest.raises(ValueError, match="2 instructions for 3 inputs"):
        gen.edit(CODES, ["a", "b"])
    with pytest.raises(ValueError, match="question 1 is empty"):
        gen.vqa(CODES, ["q", " ", "q"])
    with pytest.raises(ValueError, match="unknown condition"):
        gen.grounded(CODES, ["a"] * 3, condition="pose")


def test_prompts_file_runs_every_family_and_writes_pngs_json_and_a_sheet(
        tmp_path, vocab, random_image_tokenizer):
    """generate_families on a JSONL of every request kind, with a tiny random VQGAN."""
    import json

    from PIL import Image

    from cm3leon_jax.data import sft_examples
    from cm3leon_jax.decode import generate_families

    # The session's random tokenizer (32 px -> 16 codes of 64); the decoder, vocabulary, batch
    # and prompt width of the `gen` fixture: the session's compilation cache serves both.
    tokenizer = random_image_tokenizer
    gen = Generator(CONFIG, random_params(CONFIG, seed=1), vocab, tokenizer, batch_size=4,
                    prompt_multiple=64)
    scene = sft_examples.corpus_scene(0, "test", 0, 32)
    Image.fromarray(sft_examples.shapes.render(scene)).save(tmp_path / "scene.png")
    Image.fromarray(sft_examples.depth_map(scene)).save(tmp_path / "depth.png")
    requests = [
        {"family": "edit", "image": "scene.png", "instruction": "make it blue"},
        {"family": "grounded", "condition": "depth", "condition_image": "depth.png",
         "caption": "a red circle"},
        {"family": "boxes_to_image", "caption": "a red circle",
         "boxes": ["red circle at (2,2,9,9)"]},
        {"family": "how_to_write", "text": "cat"},
        {"family": "vqa", "image": "scene.png", "question": "How many shapes are there?"},
        {"family": "long_caption", "image": "scene.png"},
        {"family": "segment", "image": "scene.png", "phrase": "the red circle"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    out = tmp_path / "out"
    entries = generate_families.generate_families(
        gen, str(prompts), str(out), num_samples=1,
        image_sampling=SamplingConfig(guidance="cfg"), text_sampling=GREEDY)
    assert [e["family"] for e in entries] == [r["family"] for r in requests]
    for e in entries:
        assert len(e["outputs"]) == 1
        if e["family"] not in ("vqa", "long_caption"):
            assert Image.open(out / e["outputs"][0]).size == (32, 32)
    saved = json.loads((out / "families.json").read_text())
    assert saved["settings"]["image_sampling"]["guidance"] == "cfg"
    decoding = {r["family"]: r["decoding"] for r in saved["requests"]}
    assert decoding["edit"]["guidance"].startswith("two-scale: image 1.5, text 7.5")
    assert "guidance" not in decoding["grounded"] and decoding["vqa"]["num_samples"] == 1
    assert (out / "families.png").exists()

    prompts.write_text('{"family": "edit", "image": "scene.png"}\n')
    with pytest.raises(ValueError, match=r"line 1: edit request needs \['instruction'\]"):
        generate_families.read_requests(str(prompts))
    prompts.write_text('{"family": "paint"}\n')
    with pytest.raises(ValueError, match="family 'paint' is unknown"):
        generate_families.read_requests(str(prompts))
