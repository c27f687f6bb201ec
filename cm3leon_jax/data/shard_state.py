"""One output shard of preprocessing: its files, its state, and the atomic write.

A shard of DATA (the preprocess output folder) is a set of files beside each other:

    {split}-NNNNN-of-MMMMM.tfrecord            the records (shards.py)
    ...tfrecord.stats.json                     pass 1 done: the shard is `written`
    ...tfrecord.queries.npz                    pass 1's vectors of a non-bank shard
    DATA/retrieval/memory_bank/shard-NNNNN     pass 1's vectors of a bank shard
    ...tfrecord.neighbors.json                pass 2 done: its `neighbors` are in

so a shard's state is read from which files exist, in that order:

    nothing -> written (-> vectors, when retrieval is on) -> neighbors

Every file is written by `fs.atomic_write` (a temporary file, then a rename), so a
killed run leaves each file whole or absent, and a rerun redoes exactly the
shards whose marker is missing. Rewriting an earlier state forgets the later
ones (`forget_neighbors`): neighbors point at bank rows and records that a
rewrite may move.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.data import shards
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import memory_bank

STATS = ".stats.json"
QUERIES = ".queries.npz"
NEIGHBORS = ".neighbors.json"


def retrieval_dir(data_dir: str) -> str:
    """DATA/retrieval: the bank, its index and retrieval.json (a servable retriever folder)."""
    return os.path.join(data_dir, "retrieval")


def bank_dir(data_dir: str) -> str:
    return os.path.join(retrieval_dir(data_dir), "memory_bank")


def forget_neighbors(data_dir: str) -> None:
    """Every shard back to `written`: their neighbors came from a bank that changed."""
    for marker in fs.glob(os.path.join(data_dir, "*" + NEIGHBORS)):
        fs.remove(marker)


@dataclasses.dataclass(frozen=True)
class ShardFiles:
    """The files of shard `index` of `num_shards` of `split` under `data_dir`."""

    data_dir: str
    split: str
    index: int
    num_shards: int

    @classmethod
    def of(cls, data_dir: str, spec) -> "ShardFiles":
        """The files of a `preprocess.ShardSpec` (anything with split, index, num_shards)."""
        return cls(data_dir, spec.split, spec.index, spec.num_shards)

    @property
    def records(self) -> str:
        return shards.shard_path(self.data_dir, self.split, self.index, self.num_shards)

    @property
    def stats(self) -> str:
        return self.records + STATS

    @property
    def queries(self) -> str:
        return self.records + QUERIES

    @property
    def neighbors(self) -> str:
        return self.records + NEIGHBORS

    @property
    def bank_shard(self) -> str:
        return os.path.join(bank_dir(self.data_dir), memory_bank.shard_name(self.index))

    # States.
    def is_written(self) -> bool:
        return fs.exists(self.stats)

    def has_vectors(self, in_bank: bool) -> bool:
        """Whether pass 1 stored the vectors (a shard that wrote no document has none)."""
        return fs.isdir(self.bank_shard) if in_bank else fs.exists(self.queries)

    def has_neighbors(self) -> bool:
        return fs.exists(self.neighbors)

    # Pass 1.
    def write_records(self, docs) -> int:
        """Writes the shard's `shards.TokenizedDocument`s atomically; returns how many."""
        with fs.atomic_write(self.records) as tmp:
            return shards.write_records(docs, tmp)

    def write_stats(self, stats: dict) -> None:
        """Marks the shard written (last, after its records and vectors)."""
        fs.write_json(self.stats, stats)

    def read_stats(self) -> dict:
        return fs.read_json(self.stats)

    def write_queries(self, doc_ids: list[str], vectors: np.ndarray,
                      modalities: np.ndarray | None = None) -> None:
        """A non-bank shard's clean vectors f32[n, d], with their documents' ids (and, for a
        search by modality, their text and image vectors apart, f32[n, 2, d])."""
        extra = {} if modalities is None else {"modalities": modalities}
        with fs.atomic_write(self.queries) as tmp, fs.open(tmp, "wb") as f:
            np.savez(f, doc_ids=np.asarray(doc_ids, np.str_), vectors=vectors, **extra)

    def read_queries(self, modalities: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids str[n], vectors f32[n, d]) written by `write_queries`; with `modalities`,
        the vectors by modality f32[n, 2, d] (a shard written without them is refused)."""
        with fs.np_load(self.queries) as z:
            if not modalities:
                return z["doc_ids"], z["vectors"]
            if "modalities" not in z:
                raise UserInputError(
                    f"{self.queries} holds no vectors by modality (preprocessed without "
                    "SelectionConfig.by_modality): preprocess into a new MODEL_DIR with it.")
            return z["doc_ids"], z["modalities"]

    # Pass 2.
    def forget_neighbors(self) -> None:
        """Back to before pass 2 (its records are about to be rewritten)."""
        if fs.exists(self.neighbors):
            fs.remove(self.neighbors)

    def write_neighbors(self, stats: dict) -> None:
        """Marks pass 2 done (after the records with neighbors are in place)."""
        fs.write_json(self.neighbors, stats)

    def read_neighbors(self) -> dict:
        return fs.read_json(self.neighbors)
