"""Shared pieces of the retrieval tests (constants and helpers; fixtures are in conftest.py).

A uniquely named module, not `conftest`, so test files can import it by name
without clashing with tests/conftest.py."""

import dataclasses

import numpy as np

from cm3leon_jax.data.synthetic import synthetic_documents
from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.select import SelectionConfig, select

NUM_DOCS = 240
# A random encoder puts most documents above the paper's 0.9 (its vectors are
# crowded), so the shared folder uses looser thresholds; the rules are the same.
SELECTION = SelectionConfig(k=3, max_relevance=0.98, max_redundancy=0.98, overfetch=6)


def small_config() -> clip.ClipConfig:
    return clip.ClipConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                           vision_heads=2, vision_mlp=64, vocab_size=4096, context_length=32,
                           text_width=32, text_layers=1, text_heads=2, text_mlp=64,
                           eos_token_id=4095, projection_dim=16)


def save_random_encoder(directory: str) -> str:
    """Saves the small config's encoder with random weights (seed 0) to `directory`."""
    cfg = small_config()
    DocumentEncoder(cfg, clip.init_params(cfg, 0),
                    clip_tokenizer.WordTokenizer(cfg.vocab_size)).save(directory)
    return directory


def documents_with_tokens(**kwargs):
    """The synthetic corpus with stand-in token ids (the tokenized corpus is another job's)."""
    for d in synthetic_documents(**kwargs):
        d.tokens = np.arange(int(d.doc_id[-3:]) % 7 + 2, dtype=np.int32) + 100
        yield d




def _exact(bank, vectors, k, selection, exclude_doc_ids):
    """Exact maximum inner product search (every bank row scored, the best
    `num_candidates` kept), then the selection rules, as the retriever's first pass does.
    -> (chosen rows int64[b, k] (-1 pad), every score f32[b, n], score order int[b, n])."""
    cfg = dataclasses.replace(selection, k=k)
    scores = np.asarray(vectors, np.float32) @ bank.vectors(np.arange(len(bank))).T
    order = np.argsort(-scores, axis=1, kind="stable")
    top = order[:, :cfg.num_candidates]
    exclude = np.array([bank.row_of(d) if d else -1
                        for d in (exclude_doc_ids or [None] * len(order))])
    rows, _ = select(top, np.take_along_axis(scores, top, 1), bank.vectors(top),
                     bank.multimodal(top), cfg, exclude)
    return rows, scores, order


def exact_search(bank, vectors, k, selection=SELECTION, exclude_doc_ids=None):
    """Brute force over the whole bank instead of the index, then the paper's selection
    rules: the answer the index must give. -> [[doc_id, ...], ...]"""
    rows = _exact(bank, vectors, k, selection, exclude_doc_ids)[0]
    return [[str(d) for d, r in zip(bank.doc_ids(np.maximum(row, 0)), row) if r >= 0]
            for row in rows]


def clear_of_ties(bank, vectors, k, selection=SELECTION, margin=1e-5) -> np.ndarray:
    """bool[b]: queries whose exact answer is full (k documents: the retriever searches
    no deeper) and whose best `num_candidates` + 1 scores stay `margin` away from the
    relevance cut and from each other, so that float rounding between two computations
    of one query vector (another batch size, another process) cannot change the answer.
    Search-versus-exact comparisons use such queries."""
    rows, scores, order = _exact(bank, vectors, k, selection, None)
    depth = dataclasses.replace(selection, k=k).num_candidates + 1
    seen = np.take_along_axis(scores, order[:, :depth], 1)
    off_cut = (np.abs(seen - selection.max_relevance) > margin).all(1)
    apart = (-np.diff(seen, axis=1) > margin).all(1)
    return (rows >= 0).all(1) & off_cut & apart
