"""The `build_retrieval` run mode: documents -> memory bank -> ScaNN index -> neighbors.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/build_retrieval.gin \
        --gin.MODEL_DIR="'runs/demo'" --gin.ENCODER_DIR="'runs/clip_tiny/encoder'"

Writes `MODEL_DIR/retrieval/`:

    retrieval.json              encoder folder, counts, index settings, timings
    memory_bank/                shards of vectors, query-dropout vectors, token ids (memory_bank.py)
    memory_bank/neighbors-*.npz  every document's selected neighbors (neighbors.py)
    index/                      one ScaNN index, or one per bank shard (index.py)

whole or not at all: everything is built in a fresh staging folder beside it
(`train/staging.py`), which takes its place only when complete, so a rebuild never
mixes in an earlier build's shards, neighbors or index. An existing build is
replaced only with `build_retrieval.overwrite=True` (the old one stays until the new
one is in place); a folder there that is not a complete build is never replaced.

Documents come from the caller: any callable returning `SourceDocument`s (gin binds
`data/synthetic.py`'s `synthetic_documents` for the built-in corpus). A document
without token ids (empty `tokens`) is still searchable; its results carry empty
`token_ids`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterable, Iterator

import gin
import numpy as np
from absl import logging
from tqdm import tqdm

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import index as index_lib
from cm3leon_jax.retrieval import memory_bank, neighbors
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.retriever import RETRIEVAL_JSON, Retriever, encoder_record
from cm3leon_jax.retrieval.select import SelectionConfig
from cm3leon_jax.train import staging


@dataclasses.dataclass
class SourceDocument:
    doc_id: str
    text: str | None
    image: np.ndarray | None  # uint8[h, w, 3]
    tokens: np.ndarray  # int32[n]; empty when unknown


def _batches(docs: Iterable[SourceDocument], size: int) -> Iterator[list[SourceDocument]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_bank(docs: Iterable[SourceDocument], encoder: DocumentEncoder, bank_dir: str,
               docs_per_shard: int, query_dropout: float, seed: int,
               batch_size: int = 256, by_modality: bool = False) -> dict:
    """Encodes documents (clean and with query dropout) into a finalized memory bank;
    `by_modality`: with the queries' text and image vectors apart too."""
    writer = memory_bank.MemoryBankWriter(bank_dir, docs_per_shard)
    rng = np.random.default_rng(seed)
    written = 0
    for batch in tqdm(_batches(docs, batch_size), desc="encoding documents"):
        texts = [d.text for d in batch]
        images = [d.image for d in batch]
        clean = encoder.embed_modalities(texts, images)
        vectors, multimodal = encoder.document_vectors(clean)
        modal = (encoder.embed_modalities(texts, images, query_dropout, rng)
                 if query_dropout > 0 else clean)
        queries = encoder.document_vectors(modal)[0] if query_dropout > 0 else vectors
        for d, v, q, m, qm in zip(batch, vectors, queries, multimodal, modal):
            writer.add(d.doc_id, v, bool(m), d.tokens, q, qm if by_modality else None)
        written += len(batch)
    if not written:
        raise UserInputError("build_retrieval.documents gave no documents: a memory bank needs "
                             "at least one; check the source it reads (its split, its path).")
    return writer.close()


def build_index(bank: memory_bank.MemoryBank, index_dir: str,
                config: index_lib.IndexConfig) -> dict:
    """One index for a one-shard bank, else one per shard (searched and merged).

    `index_dir` is emptied first: an earlier index's files there (a sharded_index.json
    outranks a new single index) never survive. The index records the bank's
    fingerprint, so it only ever opens over this bank.
    """
    fs.rmtree(index_dir, ignore_errors=True)
    if bank.num_shards == 1:
        index = index_lib.Index.build(np.asarray(bank.shard_array(0, "vectors")), config)
        index.settings["bank_fingerprint"] = bank.fingerprint
        index.save(index_dir)
        return {"kind": "single", **index.settings}
    # Settings come from the whole bank's size: each shard gets the bank's number of
    # leaves, so a search scans as many vectors as one index over everything and
    # recall matches it (smaller shards with fewer, coarser leaves lose recall). A shard
    # with fewer vectors than that (the last one, often) is brute force, exact at its
    # size (`IndexConfig.resolve`).
    settings = config.resolve(len(bank))
    if settings["algorithm"] == "tree_ah":
        config = dataclasses.replace(config, algorithm="tree_ah",
                                     num_leaves=settings["num_leaves"],
                                     leaves_to_search=settings["leaves_to_search"])
    else:
        config = dataclasses.replace(config, algorithm="brute_force")
    index_lib.ShardedIndex.build((np.asarray(v) for _, v in bank.iter_shards()), index_dir,
                                 config, bank_fingerprint=bank.fingerprint)
    return {"kind": "sharded", "shards": bank.num_shards, **settings,
            "bank_fingerprint": bank.fingerprint}


def check_output(out: str, overwrite: bool, encoder_dir: str) -> str:
    """`out` if build_retrieval may write it: absent, or a complete earlier build (it holds
    retrieval.json) and `overwrite` is set; never the encoder's folder or one around it.
    Raises UserInputError otherwise, before any work is done."""
    if fs.exists(out) and not fs.exists(os.path.join(out, RETRIEVAL_JSON)):
        raise UserInputError(
            f"{out!r} exists but holds no {RETRIEVAL_JSON} (not a complete retrieval build: "
            "an interrupted older build, or another folder), which build_retrieval never "
            "replaces; remove it or choose another MODEL_DIR.")
    if fs.exists(out) and not overwrite:
        raise UserInputError(
            f"{out!r} already holds a retrieval build; set build_retrieval.overwrite=True to "
            "replace it, or choose another MODEL_DIR.")
    return staging.check_target(out, overwrite, {"build_retrieval.encoder_dir": encoder_dir},
                                markers=(RETRIEVAL_JSON,))


@gin.configurable
def build_retrieval(model_dir: str, encoder_dir: str = gin.REQUIRED,
                    documents: Callable[[], Iterable[SourceDocument]] = gin.REQUIRED,
                    docs_per_shard: int = 100_000,
                    index_config: index_lib.IndexConfig | None = None,
                    selection: SelectionConfig | None = None,
                    seed: int = 0, precompute: bool = True, overwrite: bool = False) -> dict:
    """Builds everything a retriever needs under `model_dir/retrieval`; returns the summary.

    The folder appears complete or not at all (built in a staging folder, then renamed);
    an existing build is replaced only with `overwrite=True`.
    """
    logging.set_verbosity(logging.INFO)
    out = check_output(os.path.join(model_dir, "retrieval"), overwrite, encoder_dir)
    selection = selection or SelectionConfig()
    encoder = DocumentEncoder.load(encoder_dir)
    with staging.staged(out, overwrite, markers=(RETRIEVAL_JSON,)) as tmp:
        summary = _build(tmp, encoder_record(encoder_dir, encoder, out), encoder, documents,
                         docs_per_shard,
                         index_config or index_lib.IndexConfig(), selection, seed, precompute)
    logging.info("retrieval built in %s: %s", out, summary)
    return summary


def _build(out: str, encoder_entries: dict, encoder: DocumentEncoder,
           documents: Callable[[], Iterable[SourceDocument]], docs_per_shard: int,
           index_config: index_lib.IndexConfig, selection: SelectionConfig, seed: int,
           precompute: bool) -> dict:
    """build_retrieval's work, into the fresh folder `out` (the staging folder);
    `encoder_entries`: `encoder_record` for the folder it becomes."""
    timings = {}
    t = time.time()
    manifest = write_bank(documents(), encoder, os.path.join(out, "memory_bank"),
                          docs_per_shard, selection.query_dropout, seed,
                          by_modality=selection.by_modality)
    timings["bank_seconds"] = round(time.time() - t, 1)
    bank = memory_bank.MemoryBank(os.path.join(out, "memory_bank"))
    t = time.time()
    index_info = build_index(bank, os.path.join(out, "index"), index_config)
    timings["index_seconds"] = round(time.time() - t, 1)
    summary = {**encoder_entries, "num_docs": manifest["num_docs"],
               "dim": manifest["dim"], "shards": len(manifest["shards"]),
               "index": index_info, "selection": dataclasses.asdict(selection), **timings}
    if precompute:
        # retrieval.json first: Retriever.open reads it.
        fs.write_json(os.path.join(out, RETRIEVAL_JSON), summary, indent=2)
        t = time.time()
        retriever = Retriever.open(out, selection, with_encoder=False)
        neighbors.precompute_neighbors(retriever, os.path.join(out, "memory_bank"))
        rows, _ = neighbors.load_neighbors(os.path.join(out, "memory_bank"))
        summary["neighbors_seconds"] = round(time.time() - t, 1)
        summary["mean_neighbors"] = float((rows >= 0).sum(1).mean())
    fs.write_json(os.path.join(out, RETRIEVAL_JSON), summary, indent=2)
    return summary
