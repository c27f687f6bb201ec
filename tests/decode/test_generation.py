"""Generation APIs on a tiny random decoder: outputs are always decodable documents."""

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import prompts
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.decode.sampler import left_pad, sample
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval.retriever import SearchResult
from cm3leon_jax.train import vocab_record
from cm3leon_jax.vocab import document
from cm3leon_jax.vocab.layout import BREAK_ID, EOSS_ID
from tests.model.model_testlib import random_params, tiny_config

CONFIG = tiny_config()
PARAMS = random_params(CONFIG, seed=2)
CAPTIONS = ["a small red circle above a yellow square", "a large blue star"]


class FixedDocuments:
    """Stands in for a retrieval service: every query gets the same documents, best first."""

    def __init__(self, docs):
        self.docs = docs

    def search_texts(self, texts, k):
        return [SearchResult([f"d{i}" for i in range(k)], [1.0] * k, self.docs[:k],
                             list(range(k))) for _ in texts]


@pytest.mark.parametrize("guidance", ["cfg", "cdk"])
def test_text_to_image_always_gives_a_decodable_document(vocab, guidance):
    gen = Generator(CONFIG, PARAMS, vocab)
    out = gen.text_to_image(CAPTIONS, num_samples=3, sampling=SamplingConfig(guidance=guidance))
    assert out.codes.shape == (6, 16) and out.images is None
    assert out.captions == [CAPTIONS[0]] * 3 + [CAPTIONS[1]] * 3
    for caption, codes in zip(out.captions, out.codes):
        query = prompts.text_to_image(np.asarray(vocab.encode(caption)))
        doc = document.decode(np.concatenate([query, vocab.layout.codes_to_ids(codes)]), vocab)
        assert doc.texts == [caption] and len(doc.images) == 1
    again = gen.text_to_image(CAPTIONS, num_samples=3, sampling=SamplingConfig(guidance=guidance))
    np.testing.assert_array_equal(out.codes, again.codes)
    other = gen.text_to_image(CAPTIONS, num_samples=3, seed=1,
                              sampling=SamplingConfig(guidance=guidance))
    assert (out.codes != other.codes).any()


@pytest.mark.parametrize("style", ["infill", "image_first"])
def test_image_to_text_constraint_gives_text_then_one_stop_token(vocab, style):
    layout = vocab.layout
    codes = np.random.default_rng(0).integers(0, 64, (3, 16))
    rows = [prompts.image_to_text(layout.codes_to_ids(c), layout, style) for c in codes]
    constraint = proc.TextOnly(layout, 12, prompts.caption_stop_ids(style))
    out = sample(CONFIG, PARAMS, left_pad(rows), jax.random.key(0), max_new_tokens=12,
                 processors=(constraint, proc.Temperature(1.0)), stop=constraint)
    for row, c in enumerate(codes):
        tokens = np.asarray(out.tokens[row, :int(out.lengths[row])])
        text = tokens[layout.is_text(tokens)]
        assert text.size >= 1 and layout.is_text(tokens[0])
        assert text.size == tokens.size or (text.size == tokens.size - 1
                                            and tokens[-1] in prompts.caption_stop_ids(style))
        ids = np.concatenate([layout.codes_to_ids(c), [BREAK_ID], text])
        assert document.decode(ids, vocab).images[0].tolist() == c.tolist()
    assert prompts.caption_stop_ids("infill") == (EOSS_ID,)


def test_image_to_text_returns_strings_per_sample(vocab):
    gen = Generator(CONFIG, PARAMS, vocab)
    codes = np.random.default_rng(1).integers(0, 64, (2, 16))
    texts = gen.image_to_text(codes, num_samples=2, max_tokens=12)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1]  # Greedy by default: the samples of one image agree.
    for t in texts:  # Non-empty captions made of the text vocabulary only.
        ids = np.asarray(vocab.encode(t))
        assert t and ids.size and vocab.layout.is_text(ids).all(), repr(t)


def test_retrieved_documents_go_first_and_are_dropped_to_fit(vocab):
    doc = document.encode(document.Document([document.Text("a red circle"),
                                             document.Image(np.arange(16))]), vocab)
    query = prompts.text_to_image(np.asarray(vocab.encode("a blue star")))
    joined = prompts.with_retrieved(query, [doc, doc], budget=200, what="caption 0")
    assert [d.texts for d in map(lambda d: document.decode(d, vocab),
                                 document.split_documents(joined)[:2])] == [["a red circle"]] * 2
    assert prompts.with_retrieved(query, [doc, doc], budget=query.size + doc.size + 1,
                                  what="caption 0").size == query.size + doc.size + 1
    with pytest.raises(ValueError, match="caption 0: its prompt alone"):
        prompts.with_retrieved(query, [], budget=2, what="caption 0")
    # The retrieved documents reach the prompt and change what is generated: the same
    # seed gives other images with them, and the same images again when they cannot fit
    # the prompt (so they act through the prompt, nowhere else).
    cfg = SamplingConfig(guidance="cfg")
    plain = Generator(CONFIG, PARAMS, vocab).text_to_image(CAPTIONS, sampling=cfg).codes
    gen = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments([doc, doc]))
    out = gen.text_to_image(CAPTIONS, num_retrieved=2, sampling=cfg)
    assert out.codes.shape == (2, 16)
    assert (out.codes != plain).any()
    other = document.encode(document.Document([document.Text("a green star"),
                                               document.Image(np.arange(16)[::-1])]), vocab)
    swapped = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments([other, other]))
    assert (swapped.text_to_image(CAPTIONS, num_retrieved=2, sampling=cfg).codes
            != out.codes).any()
    huge = np.concatenate([doc] * (CONFIG.max_length // doc.size + 1))
    too_big = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments([huge, huge]))
    np.testing.assert_array_equal(
        too_big.text_to_image(CAPTIONS, num_retrieved=2, sampling=cfg).codes, plain)


def test_the_unconditional_stream_keeps_the_documents_the_prompt_kept(vocab, monkeypatch):
    from cm3leon_jax.decode import sampler

    doc = document.encode(document.Document([document.Text("a red circle"),
                                             document.Image(np.arange(16))]), vocab)
    seen, real = [], sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda config, params, prompts, *a, **k: (
        seen.append(np.asarray(prompts)), real(config, params, prompts, *a, **k))[1])
    masked = prompts.text_to_image_unconditional(vocab.layout)
    cfg = SamplingConfig(guidance="cfg")

    def streams(keeps, docs, sampling=cfg):
        seen.clear()
        gen = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments(docs), batch_size=2,
                        guidance_keeps_documents=keeps)
        gen.text_to_image(CAPTIONS, num_retrieved=len(docs), sampling=sampling)
        (batch,) = seen
        rows = [row[row != 0] for row in batch]  # Left padding dropped.
        assert all(row[0] == prompts.BOS_ID for row in rows)  # Every prompt opens as training.
        return [row[1:] for row in rows]

    def documents(row):
        return document.split_documents(row)[:-1]

    cond, uncond = streams(True, [doc, doc])[:2], streams(True, [doc, doc])[2:]
    for c, u in zip(cond, uncond):
        assert len(documents(c)) == len(documents(u)) == 2
        np.testing.assert_array_equal(u[-2:], masked)  # The caption masked, after them.
        np.testing.assert_array_equal(c[:u.size - 2], u[:-2])  # The same documents.
    for u in streams(False, [doc, doc])[2:]:
        np.testing.assert_array_equal(u, masked)
    # Documents the prompt had no room for are left out of both streams.
    room = prompts.room(CONFIG.max_length, vocab.layout.image_length)
    long_doc = np.concatenate([doc] * (room // doc.size))
    for row in streams(True, [doc, long_doc]):
        assert len(documents(row)) == 1
    # Unguided sampling has one stream.
    assert len(streams(True, [doc], SamplingConfig(guidance="none"))) == 2


def test_neighbors_in_query_order_serves_documents_in_the_prompt_order(vocab):
    text, image = document.Text("a red circle"), document.Image(np.arange(16))
    caption_first = document.encode(document.Document([text, image]), vocab)
    image_first = document.encode(document.Document([image, text]), vocab)
    cfg = SamplingConfig(guidance="cfg")

    def drawn(docs, in_order):
        gen = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments(docs),
                        neighbors_in_query_order=in_order)
        return gen.text_to_image(CAPTIONS, num_retrieved=2, sampling=cfg).codes

    # A caption prompt: the image-first documents are served caption first.
    np.testing.assert_array_equal(drawn([image_first] * 2, True),
                                  drawn([caption_first] * 2, False))
    assert (drawn([image_first] * 2, False) != drawn([caption_first] * 2, False)).any()


def test_generator_refuses_what_it_cannot_do(vocab):
    with pytest.raises(ValueError, match="DecoderConfig.vocab_size=128"):
        Generator(CONFIG.replace(vocab_size=128), PARAMS, vocab)
    gen = Generator(CONFIG, PARAMS, vocab)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        gen.text_to_image(["a star", " "])
    with pytest.raises(ValueError, match="need an image tokenizer"):
        gen.image_to_text(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="style='caption_last' is unknown"):
        gen.image_to_text(np.zeros((1, 16), np.int32), style="caption_last")
    with pytest.raises(ValueError, match="guidance='clip'"):
        SamplingConfig(guidance="clip")
    # One string is not a list of captions (it was read as one caption per character).
    with pytest.raises(ValueError, match="as a list .*not one string"):
        gen.text_to_image("a star")
    with pytest.raises(ValueError, match="no captions given"):
        gen.text_to_image([])
    with pytest.raises(ValueError, match="as a list .*not one string"):
        gen.how_to_write("cat")
    codes = np.zeros((3, 16), np.int32)
    with pytest.raises(ValueError, match="list of before texts, one per image \\(3\\)"):
        gen.infill_text(["a"], ["b"], codes)
    with pytest.raises(ValueError, match=r"leave no room .* at most 126 \(max_tokens\)"):
        gen.image_to_text(codes, num_retrieved=0, max_tokens=500)
    with pytest.raises(ValueError, match=r"seed=4294967296: give a seed in \[0, 2\*\*32\)"):
        gen.text_to_image(["a star"], seed=2 ** 32)


@pytest.mark.parametrize("call,message", [
    # Each was a traceback from deep inside (ScaNN's argument types, a list times a float,
    # jax's PRNG or shape checks) or named another setting (SelectionConfig.k).
    (lambda g, c: g.text_to_image(["a star"], num_retrieved=-1), "num_retrieved=-1:"),
    (lambda g, c: g.text_to_image(["a star"], num_retrieved=2.5), "num_retrieved=2.5:"),
    (lambda g, c: g.text_to_image(["a star"], num_samples=2.5), "num_samples=2.5:"),
    (lambda g, c: g.text_to_image(["a star"], num_samples=True), "num_samples=True:"),
    (lambda g, c: g.text_to_image(["a star"], seed=1.5), "seed=1.5:"),
    (lambda g, c: g.image_to_text(c, num_retrieved=0, seed=-1), "seed=-1:"),
    (lambda g, c: g.describe(c, max_tokens=2.5), "max_tokens=2.5:"),
    (lambda g, c: g.edit(c, ["make it blue"], num_samples=0), "num_samples=0:")])
def test_generator_names_a_count_argument_that_is_not_a_whole_number(vocab, call, message):
    gen = Generator(CONFIG, PARAMS, vocab)
    with pytest.raises(UserInputError, match=message + " give a whole number >= "):
        call(gen, np.zeros((1, 16), np.int32))


def test_codes_as_a_jax_array_are_codes_and_a_mismatched_vocabulary_is_refused(vocab):
    gen = Generator(CONFIG, PARAMS, vocab)
    codes = np.arange(48, dtype=np.int32).reshape(3, 16) % 64
    assert gen.image_to_text(jax.numpy.asarray(codes), num_retrieved=0, max_tokens=4) == \
        gen.image_to_text(codes, num_retrieved=0, max_tokens=4)
    layout = vocab.layout
    gridded = CONFIG.replace(image_grid=4, image_code_ids=(layout.image_start, layout.used_size),
                             sentinel_ids=(layout.sentinel_start, layout.text_start))
    Generator(gridded, PARAMS, vocab)
    with pytest.raises(ValueError, match="do not match the vocabulary's 16 codes"):
        Generator(gridded.replace(image_code_ids=(layout.image_start + 1, layout.used_size + 1)),
                  PARAMS, vocab)


def test_a_caption_cut_at_max_tokens_is_reported(vocab, caplog):
    gen = Generator(CONFIG, PARAMS, vocab)
    with caplog.at_level("WARNING"):
        gen.image_to_text(np.zeros((2, 16), np.int32), num_retrieved=0, max_tokens=1,
                          sampling=SamplingConfig(guidance="none", temperature=1.0, top_p=1.0))
    assert "reached max_tokens=1 before their stop token" in caplog.text


def test_negative_captions_run_as_a_third_stream_after_the_same_documents(vocab,
                                                                           monkeypatch):
    from cm3leon_jax.decode import generate
    from cm3leon_jax.decode.sampler import PAD_ID

    calls = []
    real = generate.sampler.sample

    def spy(model, params, prompt_ids, key, *, processors=(), num_streams=1, **kwargs):
        calls.append((np.asarray(prompt_ids), num_streams, processors))
        return real(model, params, prompt_ids, key, processors=processors,
                    num_streams=num_streams, **kwargs)

    monkeypatch.setattr(generate.sampler, "sample", spy)
    docs = [np.concatenate([vocab.encode("a green square"), [BREAK_ID],
                            vocab.layout.codes_to_ids(np.arange(16) % 64)]).astype(np.int32)]
    gen = Generator(CONFIG, PARAMS, vocab, retriever=FixedDocuments(docs), batch_size=4)
    negatives = ["a small red square above a yellow circle", "a large blue circle"]
    sampling = SamplingConfig(guidance_scale=2.0, negative_scale=5.0)
    out = gen.text_to_image(CAPTIONS, num_samples=2, num_retrieved=1, sampling=sampling,
                            negative_captions=negatives)
    (ids, streams, chain), = calls
    assert streams == 3 and ids.shape[0] == 12
    assert proc.TwoScaleGuidance(2.0, 5.0) in chain

    def rows(stream):
        return [r[r != PAD_ID] for r in ids[stream * 4:stream * 4 + 4]]

    for texts, stream in ((CAPTIONS, 0), (negatives, 1)):
        want = [prompts.opened(prompts.with_retrieved(prompts.text_to_image(vocab.encode(t)),
                                                      docs, 10_000, ""))
                for t in texts for _ in range(2)]
        for got, row in zip(rows(stream), want):
            np.testing.assert_array_equal(got, row)
    for got in rows(2):  # The masked caption alone (guidance_keeps_documents=False).
        np.testing.assert_array_equal(got, prompts.opened(
            prompts.text_to_image_unconditional(vocab.layout)))
    plain = gen.text_to_image(CAPTIONS, num_samples=2, num_retrieved=1, sampling=sampling)
    assert out.codes.shape == plain.codes.shape and (out.codes != plain.codes).any()


def test_negative_captions_are_checked(vocab):
    gen = Generator(CONFIG, PARAMS, vocab)
    with pytest.raises(ValueError, match="1 negative captions for 2 captions"):
        gen.text_to_image(CAPTIONS, negative_captions=["a circle"])
    with pytest.raises(ValueError, match="negative caption 0 is empty"):
        gen.text_to_image(CAPTIONS[:1], negative_captions=[""])
    with pytest.raises(ValueError, match="negative captions need guidance='cfg'.*'cdk'"):
        gen.text_to_image(CAPTIONS[:1], negative_captions=["a circle"],
                          sampling=SamplingConfig(guidance="cdk"))


def test_a_generator_with_the_cpu_kernels_finds_top_p_through_its_kernel(vocab, monkeypatch):
    from cm3leon_jax.decode import generate

    seen = []
    real = generate.sampler.sample

    def spy(*args, processors=(), **kwargs):
        seen.append([p.cpu_kernel for p in processors if isinstance(p, proc.TopP)])
        return real(*args, processors=processors, **kwargs)

    monkeypatch.setattr(generate.sampler, "sample", spy)
    for on in (False, True):
        seen.clear()
        gen = Generator(CONFIG, PARAMS, vocab, cpu_kernels=on)
        gen.text_to_image(CAPTIONS[:1], sampling=SamplingConfig(top_p=0.9))
        gen.image_to_text(np.zeros((1, 16), np.int32), sampling=SamplingConfig(
                guidance="none", greedy=False, top_p=0.9))
        assert seen == [[on], [on]]


def test_a_retriever_whose_documents_another_vocabulary_tokenized_is_refused(vocab, tmp_path):
    """Its documents' ids go into the prompts as they are: read with another vocabulary
    they are other words and codes, silently (generate and eval checked; the API did not)."""
    folder = tmp_path / "retrieval"
    folder.mkdir()
    record = {**vocab_record.of(vocab), "fingerprint": "0123456789abcdef",
              "directory": "/data/other/vocab"}
    (folder / "retrieval.json").write_text(json.dumps({"vocabulary": record}))
    with pytest.raises(UserInputError, match=r"^the retriever's folder '.*' does not fit the "
                       r"vocabulary '.*': its documents were tokenized with the vocabulary in "
                       r"'/data/other/vocab'"):
        Generator(CONFIG, PARAMS, vocab, retriever=SimpleNamespace(directory=str(folder)))
    (folder / "retrieval.json").write_text(json.dumps({"vocabulary": vocab_record.of(vocab)}))
    Generator(CONFIG, PARAMS, vocab, retriever=SimpleNamespace(directory=str(folder)))


def test_every_prompt_opens_with_the_token_every_training_sequence_opens_with(vocab,
                                                                               monkeypatch):
    """The trainer's feature converter starts each sequence with the vocabulary's eos_id
    (train/data.py); prompts did not, so their first token sat where training always had
    `<eos>` and every later one a position early (the paper's `<eos> caption <break>`)."""
    from cm3leon_jax.decode import sampler

    assert prompts.BOS_ID == vocab.eos_id == vocab.prompt_start_id
    seen, real = [], sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda model, params, rows, *a, **k: (
        seen.append(np.asarray(rows)), real(model, params, rows, *a, **k))[1])
    gen = Generator(CONFIG, PARAMS, vocab, batch_size=2)
    codes = np.zeros((1, 16), np.int32)
    gen.text_to_image(CAPTIONS[:1], num_retrieved=0, sampling=SamplingConfig(guidance="cfg"))
    gen.image_to_text(codes, num_retrieved=0, max_tokens=4)
    gen.vqa(codes, ["What color is it?"], max_tokens=4)
    gen.edit(codes, ["make it blue"], num_samples=1)
    assert len(seen) == 4
    for batch in seen:
        for row in batch:
            assert row[row != 0][0] == prompts.BOS_ID  # After the left padding.
