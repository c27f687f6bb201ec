"""Maximum inner product search with ScaNN: build, serialize, load, batched search.

    index = Index.build(vectors, IndexConfig())        # f32[n, d]
    index.save("runs/demo/index")
    ids, scores = load_index("runs/demo/index").search(queries, k=10)

Small banks use exact brute force; from `brute_force_below` vectors on, a
partitioning tree + anisotropic hashing (AH) + exact re-ordering, ScaNN's
recommended configuration for dot products (`algorithm` overrides the choice).

`ShardedIndex` keeps one ScaNN index per memory-bank shard and merges their
top-k by score, so a bank larger than memory is searched shard by shard with at
most `max_loaded` indexes resident. Each shard returns its exact top-k after
re-ordering; build every shard with the whole bank's `num_leaves` (as
`build.build_index` does) and a search visits as many vectors as one index over
everything, with the same recall (measured in benchmarks/RESULTS_retrieval.md).

A tree needs at least one vector per leaf and AH at least `AH_MIN_VECTORS` to train on:
a shard smaller than that (the last shard of a sharded build) is searched by brute
force instead, exact and cheap at that size (`IndexConfig.resolve`).

An index built over a memory bank records the bank's `fingerprint` (`bank_fingerprint`;
`build.build_index` sets it), so the retriever refuses an index opened over another bank.

Both classes share one interface (`search`, `size`, `dim`, `save`), which the HTTP
client (`client.py`) also offers, so callers never care which they hold.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import threading
import time
from typing import Iterable, Protocol

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError

INDEX_JSON = "index.json"
SHARDED_JSON = "sharded_index.json"
# ScaNN's AH trains 16 centers per block of dimensions: fewer vectors cannot train it.
AH_MIN_VECTORS = 16


class Searcher(Protocol):
    size: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """f32[b, d] -> (ids int64[b, k], scores f32[b, k]); missing = -1 / -inf."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How to build a ScaNN index. None means "chosen from the bank's size".

    Attributes:
      algorithm: 'auto', 'brute_force' or 'tree_ah' (tree + AH + exact reorder).
      brute_force_below: with 'auto', banks smaller than this are searched exactly.
      num_leaves: tree partitions (default about 2 * sqrt(n)).
      leaves_to_search: partitions visited per query (default 5% of num_leaves).
      reorder: AH candidates re-scored exactly before the top-k is taken.
      dims_per_block: AH sub-space size; 2 is ScaNN's recommendation.
      anisotropic_threshold: AH's anisotropic loss threshold (0.2 for unit vectors).
      training_sample_size: vectors used to train the tree and the quantizer.
      training_threads: 0 = all cores.
    """

    algorithm: str = "auto"
    brute_force_below: int = 100_000
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    reorder: int = 100
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    training_sample_size: int = 250_000
    training_threads: int = 0

    def __post_init__(self):
        if self.algorithm not in ("auto", "brute_force", "tree_ah"):
            raise UserInputError(f"IndexConfig.algorithm={self.algorithm!r}; use 'auto', "
                                 "'brute_force' or 'tree_ah'.")

    def resolve(self, n: int) -> dict:
        """The concrete settings for a bank of n vectors.

        A tree over fewer vectors than its leaves (or than AH_MIN_VECTORS) cannot be
        trained: such a bank (a sharded build's small last shard, given the whole bank's
        `num_leaves`) gets brute force, which is exact and cheap at that size.
        """
        algorithm = self.algorithm
        if algorithm == "auto":
            algorithm = "brute_force" if n < self.brute_force_below else "tree_ah"
        if algorithm == "brute_force":
            return {"algorithm": "brute_force"}
        leaves = self.num_leaves or max(2, min(n // 50, int(round(2 * math.sqrt(n)))))
        if n < max(leaves, AH_MIN_VECTORS):
            return {"algorithm": "brute_force"}
        search = self.leaves_to_search or max(1, int(math.ceil(0.05 * leaves)))
        return {"algorithm": "tree_ah", "num_leaves": int(leaves),
                "leaves_to_search": int(min(search, leaves)), "reorder": int(self.reorder),
                "dims_per_block": self.dims_per_block,
                "anisotropic_threshold": self.anisotropic_threshold,
                "training_sample_size": int(min(n, self.training_sample_size))}


def read_metadata(directory: str, name: str, how_to_build: str) -> dict:
    """`directory/name` as JSON; a missing file says how to build one."""
    path = os.path.join(directory, name)
    if not fs.exists(path):
        raise MissingInputError(f"no {name} in {directory!r}; build one with {how_to_build}.")
    with fs.open(path) as f:
        return json.load(f)


def _scann():
    # Imported lazily: scann pulls in TensorFlow (seconds), which only index work needs.
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries, np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries have shape {np.shape(queries)}; this index holds "
                         f"{dim}-d vectors, so pass f32[batch, {dim}].")
    if not np.isfinite(q).all():
        raise ValueError("queries hold NaN or inf.")
    return np.ascontiguousarray(q)


def _pad(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    scores = np.asarray(scores, np.float32)
    if ids.shape[1] < k:
        b, m = ids.shape
        ids = np.concatenate([ids, np.full((b, k - m), -1, np.int64)], 1)
        scores = np.concatenate([scores, np.full((b, k - m), -np.inf, np.float32)], 1)
    return ids, scores


class Index:
    """One ScaNN searcher over f32[n, d] vectors (row ids 0..n-1)."""

    def __init__(self, searcher, settings: dict, size: int, dim: int):
        self._searcher, self.settings, self.size, self.dim = searcher, settings, size, dim

    @property
    def bank_fingerprint(self) -> str | None:
        """The memory bank's fingerprint this index was built over (None: not recorded)."""
        return self.settings.get("bank_fingerprint")

    @classmethod
    def build(cls, vectors: np.ndarray, config: IndexConfig | None = None,
              num_neighbors: int = 10) -> "Index":
        """Trains and fills an index; `num_neighbors` is only the default k."""
        config = config or IndexConfig()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(
                f"Index.build needs f32[n >= 1, d] vectors, got shape {vectors.shape}."
            )
        n, d = vectors.shape
        s = config.resolve(n)
        builder = _scann().builder(vectors, num_neighbors, "dot_product")
        builder.set_n_training_threads(config.training_threads)
        if s["algorithm"] == "brute_force":
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(num_leaves=s["num_leaves"],
                                   num_leaves_to_search=s["leaves_to_search"],
                                   training_sample_size=s["training_sample_size"])
            builder = builder.score_ah(s["dims_per_block"],
                                       anisotropic_quantization_threshold=s["anisotropic_threshold"])
            builder = builder.reorder(s["reorder"])
        start = time.perf_counter()
        searcher = builder.build()
        s["build_seconds"] = round(time.perf_counter() - start, 3)
        return cls(searcher, s, n, d)

    def save(self, directory: str) -> str:
        fs.makedirs(directory)
        with fs.staged_dir(directory) as local:  # ScaNN writes local folders only
            self._searcher.serialize(local, relative_path=True)
        with fs.open(os.path.join(directory, INDEX_JSON), "w") as f:
            json.dump({"size": self.size, "dim": self.dim, "settings": self.settings}, f, indent=2)
        return directory

    @classmethod
    def load(cls, directory: str) -> "Index":
        meta = read_metadata(directory, INDEX_JSON,
                             "Index.build(...).save(directory) or the build_retrieval mode")
        with fs.local_copy(directory) as local:
            searcher = _scann().load_searcher(local)
        return cls(searcher, meta["settings"], meta["size"], meta["dim"])

    def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
               reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """f32[b, d] -> (ids int64[b, k], scores f32[b, k]), best first."""
        q = _check_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k={k}; ask for at least one neighbor.")
        kk = min(k, self.size)
        tree = self.settings["algorithm"] == "tree_ah"
        leaves = leaves_to_search if tree else None
        pre = max(reorder or self.settings.get("reorder", kk), kk) if tree else None
        if q.shape[0] == 1:
            ids, scores = self._searcher.search(q[0], kk, pre or -1, leaves or -1)
            ids, scores = ids[None], scores[None]
        elif q.shape[0] >= 64:
            ids, scores = self._searcher.search_batched_parallel(q, kk, pre, leaves, batch_size=64)
        else:
            ids, scores = self._searcher.search_batched(q, kk, pre, leaves)
        return _pad(ids, scores, k)


class ShardedIndex:
    """One `Index` per memory-bank shard, searched in turn and merged by score."""

    def __init__(self, directory: str, max_loaded: int | None = None):
        meta = read_metadata(directory, SHARDED_JSON, "ShardedIndex.build(bank, directory)")
        self.directory = directory
        self.shards: list[str] = meta["shards"]
        self.offsets = np.asarray(meta["offsets"], np.int64)
        self.size, self.dim = int(self.offsets[-1]), int(meta["dim"])
        self.bank_fingerprint: str | None = meta.get("bank_fingerprint")
        self.max_loaded = max_loaded or len(self.shards)
        self._loaded: collections.OrderedDict[int, Index] = collections.OrderedDict()
        self._lock = threading.Lock()  # the LRU cache is shared by server threads
        for s in range(min(self.max_loaded, len(self.shards))):
            self._index(s)  # load now, not inside the first (timed) search

    @classmethod
    def build(cls, shards: Iterable[np.ndarray], directory: str,
              config: IndexConfig | None = None,
              bank_fingerprint: str | None = None) -> "ShardedIndex":
        """Builds and saves one index per f32[n_s, d] shard (e.g. memory-bank shards),
        one at a time so only one shard is ever in memory; records `bank_fingerprint`
        (the bank's `MemoryBank.fingerprint`) when given."""
        names, offsets, dim = [], [0], None
        for i, vectors in enumerate(shards):
            index = Index.build(np.asarray(vectors, np.float32), config)
            name = f"index-{i:05d}"
            index.save(os.path.join(directory, name))
            names.append(name)
            offsets.append(offsets[-1] + index.size)
            dim = index.dim
            del index
        if not names:
            raise ValueError("ShardedIndex.build got no shards.")
        meta = {"shards": names, "offsets": offsets, "dim": dim}
        if bank_fingerprint:
            meta["bank_fingerprint"] = bank_fingerprint
        with fs.open(os.path.join(directory, SHARDED_JSON), "w") as f:
            json.dump(meta, f, indent=2)
        return cls(directory)

    def _index(self, s: int) -> Index:
        with self._lock:
            return self._index_locked(s)

    def _index_locked(self, s: int) -> Index:
        if s in self._loaded:
            self._loaded.move_to_end(s)
            return self._loaded[s]
        while len(self._loaded) >= self.max_loaded:
            self._loaded.popitem(last=False)  # drop the least recently used
        index = self._loaded[s] = Index.load(os.path.join(self.directory, self.shards[s]))
        return index

    def save(self, directory: str) -> str:
        if fs.abspath(directory) != fs.abspath(self.directory):
            raise ValueError("a ShardedIndex lives where it was built; copy the folder instead.")
        return directory

    def search(self, queries: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        q = _check_queries(queries, self.dim)
        # Search the resident shards first so a bounded cache reloads as little as possible.
        order = list(self._loaded) + [s for s in range(len(self.shards)) if s not in self._loaded]
        all_ids, all_scores = [], []
        for s in order:
            ids, scores = self._index(s).search(q, k, **kwargs)
            all_ids.append(np.where(ids >= 0, ids + self.offsets[s], -1))
            all_scores.append(scores)
        return merge_top_k(np.concatenate(all_ids, 1), np.concatenate(all_scores, 1), k)


def merge_top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row by score (ties: lower id first)."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def load_index(directory: str, max_loaded: int | None = None) -> Index | ShardedIndex:
    """Whichever kind of index `directory` holds."""
    if fs.exists(os.path.join(directory, SHARDED_JSON)):
        return ShardedIndex(directory, max_loaded)
    return Index.load(directory)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth top-k by inner product with numpy, streaming over rows of `vectors`."""
    q = np.asarray(queries, np.float32)
    best_ids = np.full((q.shape[0], 0), -1, np.int64)
    best_scores = np.full((q.shape[0], 0), -np.inf, np.float32)
    for start in range(0, vectors.shape[0], chunk):
        block = np.asarray(vectors[start:start + chunk], np.float32)
        s = q @ block.T
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        ids = np.concatenate([best_ids, top + start], 1)
        scores = np.concatenate([best_scores, np.take_along_axis(s, top, 1)], 1)
        best_ids, best_scores = merge_top_k(ids, scores, k)
    return _pad(best_ids, best_scores, k)
