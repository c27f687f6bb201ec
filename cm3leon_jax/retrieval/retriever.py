"""Search by text, image or vector, with the selection rules: the in-process retriever.

    r = Retriever.open("runs/demo/retrieval")        # what build_retrieval wrote
    [res] = r.search_texts(["a red circle"], k=2)
    res.doc_ids, res.scores, res.token_ids           # best first

`RetrievalClient` (client.py) has the same methods over HTTP, so generation code
takes either. A retrieval folder holds `memory_bank/`, `index/` and, in
`retrieval.json`, where its encoder is (its absolute path, and its path from the folder,
so that a run folder moved or copied whole still finds it) and the encoder's
fingerprint: an encoder retrained in place, whose vectors the bank does not hold, is
refused on open. The index must have been built over that bank (its recorded bank
fingerprint and shard sizes are checked on open).

Query vectors are scaled to unit length before the search, as the encoder's and the
bank's are: the selection thresholds (`max_relevance` 0.9) are cosines, so a raw
vector of another length would be judged against the wrong scale. A zero or
non-finite vector has no direction and is refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.retrieval import index as index_lib
from cm3leon_jax.retrieval.encoder import (
    DocumentEncoder,
    cached_encoder,
    check_batch,
    warn_truncated,
)
from cm3leon_jax.retrieval.memory_bank import MemoryBank
from cm3leon_jax.retrieval.select import SelectionConfig, interleave, select

RETRIEVAL_JSON = "retrieval.json"
# The selection rules a retriever serves with that also chose the stored neighbors at build
# time (`k` and the dropout are each use's own).
THRESHOLDS = ("max_relevance", "max_redundancy", "prefer_multimodal")


def encoder_record(encoder_dir: str, encoder: DocumentEncoder, retrieval_dir: str) -> dict:
    """retrieval.json's entries for the encoder of a bank built into `retrieval_dir` (the
    folder it ends up in, not a staging one)."""
    where = fs.abspath(encoder_dir)
    record = {"encoder_dir": where, "encoder_fingerprint": encoder.fingerprint}
    if not fs.is_remote(where) and not fs.is_remote(retrieval_dir):
        record["encoder_from_here"] = os.path.relpath(where, fs.abspath(retrieval_dir))
    return record


def _open_encoder(meta: dict, directory: str) -> DocumentEncoder | None:
    """The encoder retrieval.json names: at its recorded path, else at its path from
    `directory`; one whose fingerprint differs from the recorded one is refused."""
    if not meta.get("encoder_dir"):
        return None
    places = [meta["encoder_dir"]]
    if meta.get("encoder_from_here") and not fs.is_remote(directory):
        places.append(os.path.normpath(os.path.join(fs.abspath(directory),
                                                    meta["encoder_from_here"])))
    found = [p for p in dict.fromkeys(places) if fs.isdir(p)]
    if not found:
        raise MissingInputError(
            f"the encoder of the retrieval folder {directory!r} is at none of {places} "
            f"(its {RETRIEVAL_JSON}): put the encoder the bank was built with back there, or "
            "rebuild the retrieval folder with the encoder you have.")
    want = meta.get("encoder_fingerprint")  # Folders built before 6 Dec lack it.
    for place in found:
        encoder = cached_encoder(place)
        if want is None or encoder.fingerprint == want:
            return encoder
    raise UserInputError(
        f"the encoder at {found[0]!r} is not the one the retrieval folder {directory!r} was "
        "built with (its config or weights differ: retrained in place?), so its query "
        "vectors would not match the bank's. Give the retrieval folder its own encoder "
        "back, or rebuild the folder with this one.")


@dataclasses.dataclass
class SearchResult:
    """One query's retrieved documents, best first."""

    doc_ids: list[str]
    scores: list[float]
    token_ids: list[np.ndarray]  # int32[n_i] each: the document's ids
    rows: list[int]  # bank row ids
    # Text queries only: the text was longer than the encoder's context and was cut to it.
    truncated: bool = False


def unit_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """f32[b, dim] (or f32[dim]) query vectors -> f32[b, dim] rows of unit length.

    Raises UserInputError for a wrong shape, a NaN or infinite value, or an all-zero row
    (it has no direction to search in).
    """
    v = np.asarray(vectors, np.float64)  # float64: squares of large float32 values overflow
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != dim:
        raise UserInputError(f"query vectors have shape {np.shape(vectors)}; this bank holds "
                             f"{dim}-d vectors, so pass f32[batch, {dim}].")
    bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
    if bad.size:
        raise UserInputError(f"query vector {int(bad[0])} holds NaN or infinity; pass finite "
                             "values.")
    norms = np.linalg.norm(v, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise UserInputError(f"query vector {int(zero[0])} is all zeros, so it has no "
                             "direction to search in; pass a nonzero vector.")
    return (v / norms[:, None]).astype(np.float32)


class Retriever:
    """Index + memory bank (+ encoder for text and image queries) + selection rules
    (by default `SelectionConfig(k=DEFAULT_K)`, whatever the process's gin config binds
    for its thresholds)."""

    DEFAULT_K = 2  # Documents retrieved per query at inference (the paper's).

    def __init__(self, index: index_lib.Searcher, bank: MemoryBank, encoder=None,
                 selection: SelectionConfig | None = None):
        if index.size != len(bank) or index.dim != bank.dim:
            raise UserInputError(
                f"index ({index.size} x {index.dim}) and memory bank "
                f"({len(bank)} x {bank.dim}) differ: rebuild the index from this bank."
            )
        built_over = getattr(index, "bank_fingerprint", None)  # None: an older index
        if built_over and built_over != bank.fingerprint:
            raise UserInputError(
                f"the index was built over another memory bank (fingerprint {built_over}) than "
                f"{bank.directory!r} ({bank.fingerprint}): rebuild the index from this bank "
                "(the build_retrieval mode).")
        offsets = getattr(index, "offsets", None)  # a sharded index: one index per bank shard
        if offsets is not None and not np.array_equal(offsets, bank.offsets):
            raise UserInputError(
                f"the sharded index's shards hold {np.diff(offsets).tolist()} vectors, the "
                f"memory bank {bank.directory!r}'s shards {bank.shard_sizes.tolist()}: rebuild "
                "the index from this bank (the build_retrieval mode).")
        if encoder is not None and encoder.dim != bank.dim:
            raise ValueError(f"encoder makes {encoder.dim}-d vectors, the bank holds {bank.dim}-d: "
                             "use the encoder the bank was built with.")
        self.index, self.bank, self.encoder = index, bank, encoder
        self.selection = selection or SelectionConfig(k=self.DEFAULT_K)
        self.directory: str | None = None  # The folder it was opened from (`open`).

    @classmethod
    def open(cls, directory: str, selection: SelectionConfig | None = None,
             with_encoder: bool = True, max_loaded_shards: int | None = None) -> "Retriever":
        meta = index_lib.read_metadata(
            directory, RETRIEVAL_JSON,
            "the build_retrieval mode (gin_configs/runs/build_retrieval.gin)")
        encoder = _open_encoder(meta, directory) if with_encoder else None
        retriever = cls(index_lib.load_index(os.path.join(directory, "index"), max_loaded_shards),
                        MemoryBank(os.path.join(directory, "memory_bank")), encoder, selection)
        built = meta.get("selection") or {}
        differ = {f: (built[f], getattr(retriever.selection, f)) for f in THRESHOLDS
                  if f in built and built[f] != getattr(retriever.selection, f)}
        if differ:  # Allowed (a serving knob), but never silent.
            logging.warning(
                "Retriever %s serves with %s, other rules than the %s its documents' stored "
                "neighbors were chosen by (retrieval.json); bind SelectionConfig as the build "
                "did to serve what training saw.", directory,
                ", ".join(f"{f}={v[1]}" for f, v in differ.items()),
                ", ".join(f"{f}={v[0]}" for f, v in differ.items()))
        retriever.directory = directory
        return retriever

    @property
    def dim(self) -> int:
        return self.bank.dim

    def search_vectors_raw(self, vectors: np.ndarray, k: int | None = None,
                           exclude_rows: np.ndarray | None = None,
                           relevance_to: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """f32[b, d] -> (rows int64[b, k], scores f32[b, k]) after the selection rules.

        The vectors are scaled to unit length first (`unit_queries`): scores are cosines
        with the bank's unit vectors, as the thresholds assume. `relevance_to`: f32[b, d]
        unit vectors the near-duplicate rule measures candidates against instead of the
        search vectors (`select`'s `relevance`).
        """
        cfg = self.selection if k is None else dataclasses.replace(self.selection, k=k)
        if np.ndim(vectors) == 2 and len(vectors) == 0:  # No queries: no results.
            return np.zeros([0, cfg.k], np.int64), np.zeros([0, cfg.k], np.float32)
        vectors = unit_queries(vectors, self.dim)
        exclude = (np.full([len(vectors)], -1, np.int64) if exclude_rows is None
                   else np.asarray(exclude_rows, np.int64))
        rel = None if relevance_to is None else np.asarray(relevance_to, np.float32)
        rows, scores = self._select(vectors, cfg.num_candidates, cfg, exclude, rel)
        depth, limit = cfg.num_candidates, min(cfg.k * cfg.max_overfetch + 1, self.index.size)
        short = np.flatnonzero((rows < 0).any(axis=1))
        while short.size and depth < limit:  # near-duplicates used up the candidates
            depth = min(depth * 4, limit)
            r, s = self._select(vectors[short], depth, cfg, exclude[short],
                                None if rel is None else rel[short])
            rows[short], scores[short] = r, s
            short = short[(r < 0).any(axis=1)]
        return rows, scores

    def search_by_modality_raw(self, modality_vectors: np.ndarray, k: int | None = None,
                               exclude_rows: np.ndarray | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
        """The paper's "one by image, one by text": f32[b, 2, d] query vectors (text, image;
        an all-zero one where the query lacks that modality) -> (rows int64[b, k], scores
        f32[b, k]). A query with both is searched by each (`search_vectors_raw`) and the two
        selections interleaved, its image search's best first (`select.interleave`); a
        query of one modality is searched by it alone."""
        cfg = self.selection if k is None else dataclasses.replace(self.selection, k=k)
        v = np.asarray(modality_vectors, np.float32)
        if v.ndim != 3 or v.shape[1:] != (2, self.dim):
            raise UserInputError(f"modality query vectors have shape {v.shape}; pass f32[batch, "
                                 f"2, {self.dim}] (text, image; zeros for a missing one).")
        present = (v != 0).any(axis=2)
        if not present.any(axis=1).all():
            bad = int(np.flatnonzero(~present.any(axis=1))[0])
            raise UserInputError(f"modality query {bad} has neither a text nor an image vector.")
        exclude = (np.full([len(v)], -1, np.int64) if exclude_rows is None
                   else np.asarray(exclude_rows, np.int64))
        rows = np.full((len(v), cfg.k), -1, np.int64)
        scores = np.full((len(v), cfg.k), -np.inf, np.float32)
        text, image = present[:, 0], present[:, 1]
        for only, m in ((text & ~image, 0), (image & ~text, 1)):
            idx = np.flatnonzero(only)
            if idx.size:
                rows[idx], scores[idx] = self.search_vectors_raw(v[idx, m], cfg.k, exclude[idx])
        idx = np.flatnonzero(text & image)
        if idx.size:
            # Near-duplicates of the query are judged by its document vector, the mean of
            # the two (one modality's vector alone scores a copy of the query lower).
            mean = unit_queries(v[idx, 0] + v[idx, 1], self.dim)
            parts = []
            for m in (1, 0):  # By image, then by text.
                r, sc = self.search_vectors_raw(v[idx, m], cfg.k, exclude[idx], mean)
                parts.append((r, sc, self.bank.vectors(r)))
            rows[idx], scores[idx] = interleave(*parts, cfg.k, cfg.max_redundancy)
        return rows, scores

    def _select(self, vectors, depth, cfg, exclude, relevance_to=None):
        ids, scores = self.index.search(vectors, depth)
        cand = self.bank.vectors(ids)
        relevance = (None if relevance_to is None
                     else np.einsum("bcd,bd->bc", cand, relevance_to))
        return select(ids, scores, cand, self.bank.multimodal(ids), cfg, exclude, relevance)

    def _results(self, rows: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        doc_ids = self.bank.doc_ids(np.maximum(rows, 0))
        out = []
        for r, s, d in zip(rows, scores, doc_ids):
            keep = r >= 0
            out.append(SearchResult([str(x) for x in d[keep]], [float(x) for x in s[keep]],
                                    [self.bank.tokens(int(x)) for x in r[keep]],
                                    [int(x) for x in r[keep]]))
        return out

    def search_vectors(self, vectors: np.ndarray, k: int | None = None,
                       exclude_doc_ids: Sequence[str | None] | None = None) -> list[SearchResult]:
        exclude = None
        if exclude_doc_ids is not None:
            exclude = np.array([self.bank.row_of(d) if d else -1 for d in exclude_doc_ids])
        return self._results(*self.search_vectors_raw(vectors, k, exclude))

    def _need_encoder(self):
        if self.encoder is None:
            raise ValueError("this retriever has no encoder: search by vector, or open it "
                             "with with_encoder=True from a folder that names one.")
        return self.encoder

    def search_texts(self, texts: Sequence[str], k: int | None = None,
                     warn_truncated_texts: bool = True) -> list[SearchResult]:
        """A text longer than the encoder's context is cut to it (CLIP's behavior): its
        result says `truncated`, and the call logs one warning naming such texts (unless
        `warn_truncated_texts` is off: the service reports them in its answer instead)."""
        encoder = self._need_encoder()
        check_batch(texts=texts)
        if not len(texts):
            return []
        vectors, truncated = encoder.encode_texts(texts)
        if warn_truncated_texts:
            warn_truncated(truncated, encoder.cfg.context_length)
        results = self.search_vectors(vectors, k)
        for result, cut in zip(results, truncated):
            result.truncated = bool(cut)
        return results

    def search_images(
        self, images: Sequence[np.ndarray], k: int | None = None
    ) -> list[SearchResult]:
        encoder = self._need_encoder()
        return self.search_vectors(encoder.embed_images(images), k) if len(images) else []
