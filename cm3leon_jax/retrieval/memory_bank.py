"""The memory bank on disk: document vectors, ids and token ids, in shards.

    bank_dir/
      bank.json                 dim, shard names and sizes, total count, fingerprint
      shard-00000/
        vectors.npy             f32[n, dim]   document vectors (what the index holds)
        query_vectors.npy       f32[n, dim]   optional: the same documents encoded with
                                              query dropout, used as training queries
        modality_queries.npy    f32[n, 2, dim] optional: the training queries' text and
                                              image vectors apart (zeros for a missing
                                              one), for a search by modality (select.py)
        multimodal.npy          bool[n]       has both text and an image
        doc_ids.npy             str[n]        the source's document ids
        token_offsets.npy       int64[n + 1]  document i is tokens[offsets[i]:offsets[i+1]]
        tokens.npy              int32[total]  the documents' ids (`vocab/document.py`)

Every array is a plain `.npy`, opened memory-mapped, so a bank larger than RAM
is read a page at a time and only the rows a search returns are touched. Shards
are written independently and atomically (`write_shard`, one per preprocessing
worker), then `finalize` lists them in `bank.json`. Rows are numbered globally
in shard order: the row id of shard s's row i is `offsets[s] + i`.

A bank's `fingerprint` (a hash of its dim and of each shard's name, size, first and
last document ids and first and last vectors: cheap for any size) is stored in
bank.json; an index built over the bank records it, so a retriever refuses an index
that belongs to another bank, or to this corpus encoded by another encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Iterator, Sequence

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError

MANIFEST = "bank.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(bank_dir: str, name: str, doc_ids: Sequence[str], vectors: np.ndarray,
                multimodal: np.ndarray, tokens: Sequence[np.ndarray],
                query_vectors: np.ndarray | None = None,
                modality_queries: np.ndarray | None = None) -> str:
    """Writes one shard under `bank_dir/name` atomically; returns its path.

    vectors (and query_vectors): f32[n, dim]; multimodal: bool[n]; tokens: n int arrays;
    modality_queries: f32[n, 2, dim].
    """
    vectors = np.asarray(vectors, np.float32)
    n = len(doc_ids)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"write_shard: vectors have shape {vectors.shape}; expected "
                         f"[{n}, dim] for {n} doc_ids.")
    if len(tokens) != n or np.shape(multimodal) != (n,):
        raise ValueError(f"write_shard: {n} doc_ids but {len(tokens)} token arrays and "
                         f"multimodal of shape {np.shape(multimodal)}; give one per document.")
    if query_vectors is not None and np.shape(query_vectors) != vectors.shape:
        raise ValueError(f"write_shard: query_vectors shape {np.shape(query_vectors)} != "
                         f"vectors shape {vectors.shape}.")
    if modality_queries is not None and np.shape(modality_queries) != (n, 2, vectors.shape[1]):
        raise ValueError(f"write_shard: modality_queries shape {np.shape(modality_queries)} != "
                         f"{(n, 2, vectors.shape[1])}.")
    if not np.isfinite(vectors).all():
        raise ValueError(f"write_shard {name}: vectors hold NaN or inf; check the encoder.")
    final = os.path.join(bank_dir, name)
    tmp = final + ".tmp"
    fs.rmtree(tmp, ignore_errors=True)
    fs.makedirs(tmp)
    lengths = np.array([len(t) for t in tokens], np.int64)
    arrays = {
        "vectors": vectors,
        "multimodal": np.asarray(multimodal, bool),
        "doc_ids": np.asarray([str(d) for d in doc_ids], dtype=np.str_)
        if n
        else np.zeros([0], "U1"),
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tokens": (
            np.concatenate([np.asarray(t, np.int32) for t in tokens])
            if lengths.sum()
            else np.zeros([0], np.int32)
        ),
    }
    if query_vectors is not None:
        arrays["query_vectors"] = np.asarray(query_vectors, np.float32)
    if modality_queries is not None:
        arrays["modality_queries"] = np.asarray(modality_queries, np.float32)
    for key, value in arrays.items():
        fs.np_save(os.path.join(tmp, f"{key}.npy"), value)
    fs.rmtree(final, ignore_errors=True)
    fs.rename(tmp, final)
    return final


def _shard_summary(name: str, doc_ids: np.ndarray, vectors: np.ndarray) -> list:
    """What the fingerprint covers of one shard: its name, size, first and last document
    ids and first and last vectors (two rows read, whatever the shard's size)."""
    n = len(doc_ids)
    ends = np.ascontiguousarray(vectors[[0, n - 1]] if n else vectors[:0], np.float32)
    return [name, n, str(doc_ids[0]) if n else "", str(doc_ids[-1]) if n else "",
            hashlib.sha256(ends.tobytes()).hexdigest()]


def _fingerprint(dim: int, summaries: Sequence[list]) -> str:
    text = json.dumps([int(dim), list(summaries)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def finalize(bank_dir: str) -> dict:
    """Lists every complete shard (sorted by name) in bank.json; returns the manifest."""
    names = sorted(d for d in fs.listdir(bank_dir)
                   if fs.isdir(os.path.join(bank_dir, d)) and not d.endswith(".tmp"))
    if not names:
        raise MissingInputError(f"no shards in {bank_dir!r}; write some with write_shard first.")
    shards, summaries, dim, with_queries, with_modalities = [], [], None, True, True
    for name in names:
        v = fs.np_load(os.path.join(bank_dir, name, "vectors.npy"), mmap_mode="r")
        if dim is not None and v.shape[1] != dim:
            raise ValueError(f"shard {name} has dim {v.shape[1]}, others {dim}; one bank "
                             "holds vectors of one encoder.")
        dim = v.shape[1]
        with_queries &= fs.exists(os.path.join(bank_dir, name, "query_vectors.npy"))
        with_modalities &= fs.exists(os.path.join(bank_dir, name, "modality_queries.npy"))
        shards.append({"name": name, "size": int(v.shape[0])})
        summaries.append(_shard_summary(
            name, fs.np_load(os.path.join(bank_dir, name, "doc_ids.npy"), mmap_mode="r"), v))
    manifest = {"dim": int(dim), "num_docs": sum(s["size"] for s in shards),
                "shards": shards, "has_query_vectors": bool(with_queries),
                "has_modality_queries": bool(with_modalities),
                "fingerprint": _fingerprint(dim, summaries)}
    fs.write_json(os.path.join(bank_dir, MANIFEST), manifest, indent=2)
    return manifest


class MemoryBankWriter:
    """Accumulates documents and writes a shard every `docs_per_shard` of them."""

    def __init__(self, bank_dir: str, docs_per_shard: int = 100_000):
        fs.makedirs(bank_dir)
        self.bank_dir, self.docs_per_shard = bank_dir, docs_per_shard
        self._rows: list[tuple] = []
        self._next = 0

    def add(self, doc_id: str, vector: np.ndarray, multimodal: bool, tokens: np.ndarray,
            query_vector: np.ndarray | None = None,
            modality_query: np.ndarray | None = None) -> None:
        self._rows.append((doc_id, vector, multimodal, tokens, query_vector, modality_query))
        if len(self._rows) >= self.docs_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        ids, vecs, mm, toks, qv, qm = zip(*self._rows)
        queries = None if any(q is None for q in qv) else np.stack(qv)
        modalities = None if any(q is None for q in qm) else np.stack(qm)
        write_shard(self.bank_dir, shard_name(self._next), ids, np.stack(vecs),
                    np.array(mm), toks, queries, modalities)
        self._next += 1
        self._rows = []

    def close(self) -> dict:
        self.flush()
        return finalize(self.bank_dir)


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for f in fs.listdir(self.path):
            if f.endswith(".npy"):
                out[f[:-4]] = fs.np_load(os.path.join(self.path, f), mmap_mode="r")
        return out


class MemoryBank:
    """A read-only, memory-mapped view of a bank written by `write_shard` + `finalize`."""

    def __init__(self, bank_dir: str):
        path = os.path.join(bank_dir, MANIFEST)
        if not fs.exists(path):
            raise MissingInputError(
                f"no {MANIFEST} in {bank_dir!r}: not a memory bank, or its shards were never "
                "finalized (memory_bank.finalize(bank_dir)).")
        with fs.open(path) as f:
            self.manifest = json.load(f)
        self.directory = bank_dir
        self.dim: int = self.manifest["dim"]
        self.shard_sizes = np.array([s["size"] for s in self.manifest["shards"]], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._shards = [_Shard(os.path.join(bank_dir, s["name"]))
                        for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies this bank's contents (see the module docstring): bank.json's, or for a
        bank finalized before fingerprints, computed from its shards' first and last ids."""
        if self.manifest.get("fingerprint"):
            return self.manifest["fingerprint"]
        return _fingerprint(self.dim, [
            _shard_summary(s["name"], self.shard_array(i, "doc_ids"),
                           self.shard_array(i, "vectors"))
            for i, s in enumerate(self.manifest["shards"])])

    @property
    def has_query_vectors(self) -> bool:
        return bool(self.manifest.get("has_query_vectors"))

    @property
    def has_modality_queries(self) -> bool:
        return bool(self.manifest.get("has_modality_queries"))

    def shard_array(self, shard: int, key: str) -> np.ndarray:
        """One shard's memory-mapped array (`vectors`, `query_vectors`, `multimodal`, ...)."""
        arrays = self._shards[shard].arrays
        if key not in arrays:
            raise KeyError(f"shard {shard} of {self.directory!r} has no {key!r}; it has "
                           f"{sorted(arrays)}.")
        return arrays[key]

    def iter_shards(self, key: str = "vectors") -> Iterator[tuple[int, np.ndarray]]:
        """(first row id, array) for each shard in order."""
        for s in range(self.num_shards):
            yield int(self.offsets[s]), self.shard_array(s, key)

    def _gather(self, ids: np.ndarray, key: str, fill) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        if flat.size and flat.max() >= len(self):
            raise IndexError(f"row id {int(flat.max())} is past the bank's {len(self)} rows.")
        first = self.shard_array(0, key)
        out = np.full((flat.size, *first.shape[1:]), fill, first.dtype)
        valid = flat >= 0
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard[valid]):
            rows = valid & (shard == s)
            local = flat[rows] - self.offsets[s]
            # Sorted reads keep memory-mapped access sequential on disk.
            order = np.argsort(local)
            got = np.empty((local.size, *first.shape[1:]), first.dtype)
            got[order] = self.shard_array(int(s), key)[local[order]]
            out[rows] = got
        return out.reshape(*ids.shape, *first.shape[1:])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """int64[...] row ids -> f32[..., dim]; id -1 gives a zero vector."""
        return self._gather(ids, "vectors", 0.0)

    def query_vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, "query_vectors", 0.0)

    def multimodal(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, "multimodal", False)

    def doc_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, "doc_ids", "")

    def tokens(self, row: int) -> np.ndarray:
        """int32[n]: the document's token ids."""
        s = int(np.searchsorted(self.offsets, row, side="right") - 1)
        if not 0 <= row < len(self):
            raise IndexError(f"row id {row} is outside the bank's {len(self)} rows.")
        offsets = self.shard_array(s, "token_offsets")
        local = row - self.offsets[s]
        return np.asarray(self.shard_array(s, "tokens")[offsets[local]:offsets[local + 1]])

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        out = {}
        for start, ids in self.iter_shards("doc_ids"):
            out.update((str(d), start + i) for i, d in enumerate(ids))
        return out

    def row_of(self, doc_id: str) -> int:
        """The row id of a document id, or -1 when the bank does not hold it."""
        return self._row_of.get(doc_id, -1)
