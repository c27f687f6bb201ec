"""Neighbors of every training document, precomputed in batch and stored beside the bank.

    precompute_neighbors(retriever, out_dir)      # one .npz per memory-bank shard
    rows, scores = load_neighbors(out_dir)        # int64[num_docs, k], -1 = none; f32 scores
    tokens, doc_ids = materialize(bank, rows[i])   # what goes into the training record

Each document of the bank is the query for its own row: its query-dropout vector
(`query_vectors.npy`, encoded with 20% of its tokens and patches hidden) when the
bank has one, else its document vector; with `SelectionConfig.by_modality`, its text
and image vectors apart (`modality_queries.npy`), one search each. It is excluded
from its own results, and the selection rules of `select.py` apply. Files are written
atomically per shard, so a rerun skips finished shards.

The build_retrieval mode calls `precompute_neighbors` for a bank built on its own.
The preprocess mode searches shard by shard instead (data/retrieval_pass.py, the
same rules) and calls `materialize` for each shard's `neighbor_ids`.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.retrieval.memory_bank import MemoryBank
from cm3leon_jax.retrieval.retriever import Retriever


def neighbors_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"neighbors-{shard:05d}.npz")


def precompute_neighbors(retriever: Retriever, out_dir: str, batch_size: int = 1024,
                          progress: bool = True) -> int:
    """Writes `neighbors-NNNNN.npz` (rows int64[n, k], scores f32[n, k]) per shard.

    Returns how many documents were searched (0 when everything was done before).
    """
    bank = retriever.bank
    key = "query_vectors" if bank.has_query_vectors else "vectors"
    search = retriever.search_vectors_raw
    if retriever.selection.by_modality:  # The paper's one by image, one by text.
        if not bank.has_modality_queries:
            raise UserInputError(
                f"the memory bank {bank.directory!r} holds no query vectors by modality: "
                "build it with SelectionConfig.by_modality = True, or search without it.")
        key, search = "modality_queries", retriever.search_by_modality_raw
    fs.makedirs(out_dir)
    done = 0
    for s, (start, vectors) in enumerate(bank.iter_shards(key)):
        path = neighbors_path(out_dir, s)
        if fs.exists(path):
            continue
        rows, scores = [], []
        n = vectors.shape[0]
        for a in tqdm(range(0, n, batch_size), desc=f"neighbors shard {s}", disable=not progress):
            b = min(a + batch_size, n)
            own = np.arange(start + a, start + b, dtype=np.int64)
            r, sc = search(np.asarray(vectors[a:b]), exclude_rows=own)
            rows.append(r)
            scores.append(sc)
        with fs.atomic_write(path) as tmp:
            fs.np_savez(tmp, rows=np.concatenate(rows), scores=np.concatenate(scores))
        done += n
    return done


def load_neighbors(out_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """All shards' (rows int64[N, k], scores f32[N, k]) in bank row order."""
    files = sorted(fs.glob(os.path.join(out_dir, "neighbors-*.npz")))
    if not files:
        raise MissingInputError(f"no neighbors-*.npz in {out_dir!r}; run "
                                "precompute_neighbors (the build_retrieval mode does).")
    loaded = [fs.np_load(f) for f in files]
    return (np.concatenate([x["rows"] for x in loaded]),
            np.concatenate([x["scores"] for x in loaded]))


def materialize(bank: MemoryBank, rows: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """One document's neighbor rows (int64[k], -1 = none) -> their token ids and doc ids."""
    rows = np.asarray(rows)
    if rows.ndim != 1:
        raise ValueError(f"materialize takes one document's neighbor rows (int64[k]), not "
                         f"shape {rows.shape}: pass rows[i].")
    rows = [int(r) for r in rows if r >= 0]
    return [bank.tokens(r) for r in rows], [str(d) for d in bank.doc_ids(np.array(rows, np.int64))]
