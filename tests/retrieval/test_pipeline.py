"""Encoder document vectors, the build mode, precomputed neighbors and the local retriever."""

import dataclasses
import json
import os

import numpy as np
import pytest
from retrieval_testlib import NUM_DOCS, SELECTION, clear_of_ties, exact_search

from cm3leon_jax.data.synthetic import synthetic_documents
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import neighbors
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.memory_bank import MemoryBank
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.retrieval.select import SelectionConfig


@pytest.fixture(scope="module")
def docs():
    return list(synthetic_documents(num=12))


def test_document_vector_is_mean_of_normalized_embeddings(encoder_dir, docs):
    enc = DocumentEncoder.load(encoder_dir, renormalize=False)
    texts, images = [d.text for d in docs], [d.image for d in docs]
    t, i = enc.embed_texts(texts), enc.embed_images(images)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    v, mm = enc.embed_documents(texts[:2] + [None, texts[3]], images[:2] + [images[2], None])
    np.testing.assert_allclose(v[:2], (t[:2] + i[:2]) / 2, atol=1e-5)
    np.testing.assert_allclose(v[2], i[2], atol=1e-5)
    np.testing.assert_allclose(v[3], t[3], atol=1e-5)
    assert mm.tolist() == [True, True, False, False]
    unit, _ = DocumentEncoder.load(encoder_dir).embed_documents(texts[:2], images[:2])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)


def test_query_dropout_is_seeded_and_changes_the_query(encoder_dir, docs):
    enc = DocumentEncoder.load(encoder_dir)
    texts, images = [d.text for d in docs], [d.image for d in docs]
    clean, _ = enc.embed_documents(texts, images)
    a, _ = enc.embed_documents(texts, images, 0.2, np.random.default_rng(1))
    b, _ = enc.embed_documents(texts, images, 0.2, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - clean).max() > 1e-3
    with pytest.raises(ValueError, match="rng"):
        enc.embed_texts(texts, 0.2)


def test_encoder_input_errors(encoder_dir):
    enc = DocumentEncoder.load(encoder_dir)
    with pytest.raises(ValueError, match="text 1"):
        enc.embed_texts(["ok", "  "])
    with pytest.raises(ValueError, match="neither text nor image"):
        enc.embed_documents([None], [None])
    with pytest.raises(ValueError, match="uint8"):
        enc.embed_images([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(UserInputError, match="text 1 holds a lone surrogate"):
        enc.embed_texts(["ok", "a \ud800 b"])


def test_long_texts_are_cut_to_the_context_and_reported(encoder_dir, caplog):
    """CLIP cuts a text to its context (32 tokens here): `encode_texts` says which texts
    were cut and `embed_texts` logs one warning per call naming them."""
    enc = DocumentEncoder.load(encoder_dir)
    long = " ".join(["red circle"] * 40)
    vectors, truncated = enc.encode_texts(["a red circle", long, long + " and more"])
    assert truncated.tolist() == [False, True, True]
    # Cut, not dropped: what is past the context does not change the vector.
    np.testing.assert_array_equal(vectors[1], vectors[2])
    caplog.clear()
    enc.embed_texts(["a red circle", long, long])
    warnings = [r for r in caplog.records if "context" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 texts (text 1, 2)" in warnings[0].getMessage()
    assert "32-token context" in warnings[0].getMessage()


def test_encoder_saves_and_loads_on_a_remote_file_system(encoder_dir, docs):
    """An encoder folder on gs:// (here TensorFlow's ram://) is written and read through
    fs.py; it embeds exactly as the local folder does."""
    import uuid

    from retrieval_testlib import save_random_encoder
    remote = save_random_encoder(f"ram://encoder_{uuid.uuid4().hex[:8]}")
    texts = [d.text for d in docs if d.text][:3]
    np.testing.assert_array_equal(DocumentEncoder.load(remote).embed_texts(texts),
                                  DocumentEncoder.load(encoder_dir).embed_texts(texts))


def test_build_writes_bank_index_and_valid_neighbors(retrieval_dir):
    meta = json.load(open(os.path.join(retrieval_dir, "retrieval.json")))
    assert meta["num_docs"] == NUM_DOCS and meta["shards"] == 3
    assert meta["index"]["kind"] == "sharded"
    bank = MemoryBank(os.path.join(retrieval_dir, "memory_bank"))
    assert bank.has_query_vectors and 0.6 < bank.multimodal(np.arange(len(bank))).mean() < 0.95
    rows, scores = neighbors.load_neighbors(os.path.join(retrieval_dir, "memory_bank"))
    assert rows.shape == (NUM_DOCS, 3)
    assert (rows != np.arange(NUM_DOCS)[:, None]).all(), "a document is its own neighbor"
    assert (scores[rows >= 0] <= SELECTION.max_relevance).all()
    assert (rows >= 0).sum(1).mean() >= 1.5
    mm = bank.multimodal(np.maximum(rows, 0)) & (rows >= 0)
    uni = ~bank.multimodal(np.maximum(rows, 0)) & (rows >= 0)
    for m, u in zip(mm, uni):  # multimodal picks come first
        if m.any() and u.any():
            assert np.flatnonzero(m).max() < np.flatnonzero(u).min()
    tokens, doc_ids = neighbors.materialize(bank, rows[5])
    assert doc_ids == [str(x) for x in bank.doc_ids(rows[5][rows[5] >= 0])]
    np.testing.assert_array_equal(tokens[0], bank.tokens(int(rows[5][0])))


def test_precompute_skips_finished_shards(retrieval_dir):
    r = Retriever.open(retrieval_dir, SELECTION, with_encoder=False)
    assert r.directory == retrieval_dir  # What the Generator checks its documents' vocabulary by.
    assert neighbors.precompute_neighbors(r, os.path.join(retrieval_dir, "memory_bank"),
                                            progress=False) == 0


def test_retriever_searches_by_text_image_and_vector(retrieval_dir, docs):
    r = Retriever.open(retrieval_dir, SELECTION)
    [res] = r.search_texts([docs[0].text], k=2)
    assert 1 <= len(res.doc_ids) <= 2
    assert all(s <= SELECTION.max_relevance for s in res.scores)
    for row, toks in zip(res.rows, res.token_ids):
        np.testing.assert_array_equal(toks, r.bank.tokens(row))
    [img] = r.search_images([docs[1].image], k=3)
    assert 1 <= len(img.doc_ids) <= 3
    vec = r.bank.vectors(np.array([7]))
    [own] = r.search_vectors(vec, k=3, exclude_doc_ids=["train_0000007"])
    assert "train_0000007" not in own.doc_ids
    with pytest.raises(ValueError, match="16-d vectors"):
        r.search_vectors(np.zeros((1, 5)))


def test_query_vectors_are_scaled_to_unit_length(retrieval_dir):
    """The thresholds are cosines: a query 5 times as long finds what the unit one finds,
    with the same scores; a vector without direction (zeros) or not finite is refused."""
    r = Retriever.open(retrieval_dir, SELECTION, with_encoder=False)
    vec = r.bank.vectors(np.array([7, 20]))
    want = r.search_vectors(vec, k=3)
    assert all(res.doc_ids for res in want)
    got = r.search_vectors(vec * 5, k=3)
    assert [g.doc_ids for g in got] == [w.doc_ids for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-6)
    rows, scores = r.search_vectors_raw(vec[0] * 0.01, k=3)
    assert rows[0].tolist() == [r.bank.row_of(d) for d in want[0].doc_ids]
    with pytest.raises(UserInputError, match="query vector 1 is all zeros"):
        r.search_vectors(np.stack([vec[0], np.zeros(16)]))
    with pytest.raises(UserInputError, match="query vector 0 holds NaN"):
        r.search_vectors_raw(np.full((1, 16), np.nan))


def test_library_text_search_reports_truncated_texts(retrieval_dir, caplog):
    r = Retriever.open(retrieval_dir, SELECTION)
    long = " ".join(["blue square"] * 40)
    caplog.clear()
    results = r.search_texts(["a red circle", long], k=2)
    assert [res.truncated for res in results] == [False, True]
    assert sum("1 of 2 texts (text 1)" in m for m in caplog.messages) == 1
    caplog.clear()
    r.search_texts([long], k=2, warn_truncated_texts=False)
    assert not any("context" in m for m in caplog.messages)


def test_text_and_image_search_match_exact_search(retrieval_dir):
    """The index (ScaNN) + selection answer what brute force over the whole bank + the same
    rules answers, for texts and images of unseen documents (clear of float ties)."""
    r = Retriever.open(retrieval_dir, SELECTION)
    unseen = list(synthetic_documents(split="test", num=12))
    for kind, items, embed, search in (
            ("text", [d.text for d in unseen if d.text], r.encoder.embed_texts, r.search_texts),
            ("image", [d.image for d in unseen if d.image is not None], r.encoder.embed_images,
             r.search_images)):
        vectors = embed(items)
        clear = np.flatnonzero(clear_of_ties(r.bank, vectors, SELECTION.k))
        assert clear.size >= 3, f"fewer than 3 {kind} queries clear of ties; take more"
        got = [res.doc_ids for res in search([items[i] for i in clear])]
        assert got == exact_search(r.bank, vectors[clear], SELECTION.k), kind
        assert any(len(ids) == SELECTION.k for ids in got), kind


def test_deeper_search_gets_past_near_duplicates(tmp_path):
    from cm3leon_jax.retrieval import index as index_lib
    from cm3leon_jax.retrieval.memory_bank import MemoryBankWriter
    rng = np.random.default_rng(0)
    query = np.eye(8, dtype=np.float32)[0]
    dups = query + 0.01 * rng.normal(size=(60, 8))  # relevance ~0.999: all skipped
    others = np.eye(8)[1:4] * 0.6 + query * 0.5  # relevance ~0.64, mutually distinct
    vectors = np.concatenate([dups, others]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    writer = MemoryBankWriter(str(tmp_path / "bank"))
    for i, v in enumerate(vectors):
        writer.add(f"d{i}", v, True, np.array([i]))
    writer.close()
    bank = MemoryBank(str(tmp_path / "bank"))
    r = Retriever(index_lib.Index.build(vectors), bank, selection=SelectionConfig(k=3, overfetch=2))
    [res] = r.search_vectors(query[None])
    assert sorted(res.doc_ids) == ["d60", "d61", "d62"]
    shallow = Retriever(r.index, bank, selection=SelectionConfig(k=3, overfetch=2, max_overfetch=2))
    assert shallow.search_vectors(query[None])[0].doc_ids == []


def test_serving_with_other_thresholds_than_the_build_says_so(retrieval_dir, caplog):
    Retriever.open(retrieval_dir, dataclasses.replace(SELECTION, k=2), with_encoder=False)
    assert "other rules" not in caplog.text  # k is each use's own
    Retriever.open(retrieval_dir, dataclasses.replace(SELECTION, max_relevance=0.9),
                   with_encoder=False)
    assert "serves with max_relevance=0.9, other rules than the max_relevance=0.98" in caplog.text


def test_search_by_modality_takes_one_by_image_and_one_by_text(retrieval_dir, encoder_dir, docs):
    """The paper's "one by image, one by text": a query with both is searched by each and
    the picks interleaved, the image search's best first; a query of one modality is
    searched by it alone."""
    r = Retriever.open(retrieval_dir, SELECTION)
    encoder = DocumentEncoder.load(encoder_dir)
    pairs = [d for d in docs if d.text is not None and d.image is not None][:6]
    both = encoder.embed_modalities([d.text for d in pairs], [d.image for d in pairs])
    text_only = both.copy()
    text_only[:, 1] = 0
    rows, scores = r.search_by_modality_raw(np.concatenate([both, text_only]), k=2)
    mean = both[:, 0] + both[:, 1]  # Near-duplicates are judged by the document vector.
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    by_image, _ = r.search_vectors_raw(both[:, 1], k=2, relevance_to=mean)
    by_text, _ = r.search_vectors_raw(both[:, 0], k=2, relevance_to=mean)
    for i in range(len(pairs)):
        assert rows[i, 0] == by_image[i, 0]
        second = by_text[i, 0] if by_text[i, 0] != by_image[i, 0] else by_text[i, 1]
        assert rows[i, 1] in (second, by_image[i, 1])  # by image's next if redundant
    np.testing.assert_array_equal(rows[len(pairs):], r.search_vectors_raw(both[:, 0], k=2)[0])
    assert (rows >= 0).all() and np.isfinite(scores).all()
    # Text-first and image-first picks differ somewhere, or the test shows nothing.
    assert (by_image[:, 0] != by_text[:, 0]).any()
    with pytest.raises(UserInputError, match="modality query 0 has neither"):
        r.search_by_modality_raw(np.zeros((1, 2, r.dim)))
    with pytest.raises(UserInputError, match=r"f32\[batch, 2, 16\]"):
        r.search_by_modality_raw(both[:, 0])


def test_a_bank_built_by_modality_stores_both_queries(tmp_path, encoder_dir):
    """build_retrieval with SelectionConfig.by_modality keeps each document's query-dropout
    text and image vectors apart, and its stored neighbors are the by-modality search's."""
    import functools

    from retrieval_testlib import documents_with_tokens

    from cm3leon_jax.retrieval import build
    selection = dataclasses.replace(SELECTION, by_modality=True)
    source = functools.partial(documents_with_tokens, num=60, text_only_fraction=0.1,
                               image_only_fraction=0.1)
    build.build_retrieval(str(tmp_path / "m"), encoder_dir, source, docs_per_shard=40,
                          selection=selection, seed=0)
    r = Retriever.open(str(tmp_path / "m" / "retrieval"), selection)
    assert r.bank.has_modality_queries
    modal = r.bank._gather(np.arange(len(r.bank)), "modality_queries", 0.0)  # noqa: SLF001
    # Their mean is the document's query vector (query dropout, seeded).
    np.testing.assert_allclose(DocumentEncoder.load(encoder_dir).document_vectors(modal)[0],
                               r.bank.query_vectors(np.arange(len(r.bank))), atol=1e-6)
    stored, _ = neighbors.load_neighbors(str(tmp_path / "m" / "retrieval" / "memory_bank"))
    want, _ = r.search_by_modality_raw(modal, exclude_rows=np.arange(len(r.bank)))
    np.testing.assert_array_equal(stored, want)
    plain = Retriever.open(str(tmp_path / "m" / "retrieval"), SELECTION)
    assert not (plain.search_vectors_raw(r.bank.query_vectors(np.arange(len(r.bank))),
                                         exclude_rows=np.arange(len(r.bank)))[0] == want).all()



def test_a_bank_without_them_refuses_a_search_by_modality(retrieval_dir, tmp_path):
    selection = dataclasses.replace(SELECTION, by_modality=True)
    r = Retriever.open(retrieval_dir, selection, with_encoder=False)
    with pytest.raises(UserInputError, match="no query vectors by modality"):
        neighbors.precompute_neighbors(r, str(tmp_path / "n"))
    assert not (tmp_path / "n").exists()


def test_a_search_by_modality_still_skips_the_query_document(tmp_path, encoder_dir):
    """Rule 2 (near-duplicates of the query) is judged against the query's document vector:
    one modality's vector alone scores the query's own document below the bound, and a copy
    of it elsewhere in the bank would come back as a neighbor."""
    import functools

    from retrieval_testlib import documents_with_tokens

    from cm3leon_jax.retrieval import build
    selection = dataclasses.replace(SELECTION, by_modality=True, query_dropout=0.0)
    source = functools.partial(documents_with_tokens, num=60, text_only_fraction=0.0,
                               image_only_fraction=0.0)
    build.build_retrieval(str(tmp_path / "m"), encoder_dir, source, docs_per_shard=60,
                          selection=selection, seed=0, precompute=False)
    r = Retriever.open(str(tmp_path / "m" / "retrieval"), selection)
    rows = np.arange(len(r.bank))
    modal = r.bank._gather(rows, "modality_queries", 0.0)  # noqa: SLF001  (clean: no dropout)
    # Each document's own image vector alone finds it, below the bound: rule 2 would pass it.
    alone = np.einsum("nd,nd->n", modal[:, 1], r.bank.vectors(rows))
    assert (alone < selection.max_relevance).any()
    got, _ = r.search_by_modality_raw(modal)  # Nothing excluded: rule 2 must skip it.
    assert not (got == rows[:, None]).any()
