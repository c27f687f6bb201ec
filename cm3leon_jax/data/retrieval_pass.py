"""Retrieval inside preprocessing: document vectors, the memory bank, every shard's neighbors.

Bind `preprocess.retrieval = @RetrievalConfig()` with an encoder folder (the
train_retriever mode writes one) and preprocessing runs in two passes over the
same shards (DATA is the preprocess output folder):

    pass 1, per shard, while tokenizing (Beam):
        every written document -> its vector (clean, and with query dropout)
        train shard i   -> DATA/retrieval/memory_bank/shard-0000i   vectors, query
                           vectors, token ids: one memory-bank shard per data shard
        other splits    -> DATA/{shard}.queries.npz                 clean vectors
    driver:
        finalize the bank, build its ScaNN index, write retrieval.json, so that
        DATA/retrieval is a complete retriever folder (serve_retrieval.gin serves it)
    pass 2, per shard (Beam):
        search each document's query vector, keep k by the selection rules, write
        their tokens into the shard's `neighbor_ids` (the shard is rewritten
        atomically), then DATA/{shard}.neighbors.json, which marks it done

Train documents search with their query-dropout vector and never get themselves
back. With `SelectionConfig.by_modality` (the paper's "one by image, one by text") every
document's text and image vectors are also kept apart (the bank's `modality_queries`, the
queries file's `modalities`), and a document with both is searched by each
(`Retriever.search_by_modality_raw`). Validation and test documents search with their
clean vector (there is no dropout at inference) against the train bank only, so no
evaluation document is ever retrieved. A rerun skips shards finished in either pass; a
train shard tokenized again rebuilds the bank and index, and that invalidates
every shard's neighbors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from typing import Sequence

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.data import shards
from cm3leon_jax.data.shard_state import ShardFiles, bank_dir, forget_neighbors, retrieval_dir
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import build, memory_bank
from cm3leon_jax.retrieval.encoder import cached_encoder
from cm3leon_jax.retrieval.index import IndexConfig
from cm3leon_jax.retrieval.neighbors import materialize
from cm3leon_jax.retrieval.retriever import RETRIEVAL_JSON, Retriever, encoder_record
from cm3leon_jax.retrieval.select import SelectionConfig
from cm3leon_jax.train import vocab_record
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """What the preprocess mode needs to retrieve neighbors for every document.

    Attributes:
      encoder_dir: a `DocumentEncoder` folder (train_retriever's MODEL_DIR/encoder,
        or a Hugging Face CLIP checkpoint with its tokenizer).
      selection: the selection rules and query dropout (paper values by default:
        k = 3 candidates stored per document, 0.9 thresholds, 20% dropout).
      index: how the ScaNN index is built (chosen from the bank's size by default).
      bank_split: the split whose documents form the memory bank.
      search_batch: queries per index search.
      seed: seeds query dropout (with the shard), so reruns agree.
    """

    encoder_dir: str = gin.REQUIRED
    selection: SelectionConfig = SelectionConfig()
    index: IndexConfig = IndexConfig()
    bank_split: str = "train"
    search_batch: int = 512
    seed: int = 0


def plan_entry(config: RetrievalConfig | None, recorded: dict | None = None) -> dict | None:
    """What of `config` decides the neighbors written, for preprocessing's plan.json: the
    encoder by its contents (`DocumentEncoder.fingerprint`, from the driver's
    `cached_encoder`, which in-process workers share: a folder copied elsewhere is the same
    encoder, weights replaced in place are another), bank split, seed, selection rules and
    index (not `search_batch` or the index's training threads, which change none of them).

    `recorded`: the entry an earlier plan.json holds. One from before the fingerprint named
    the encoder by its absolute path (`encoder_dir`), and is compared in that form."""
    if config is None:
        return None
    index = dataclasses.asdict(config.index)
    index.pop("training_threads", None)
    if isinstance(recorded, dict) and "encoder_dir" in recorded:
        encoder = {"encoder_dir": fs.abspath(config.encoder_dir)}
    else:
        encoder = {"encoder_fingerprint": cached_encoder(config.encoder_dir).fingerprint}
    selection = dataclasses.asdict(config.selection)
    if not selection["by_modality"]:  # Folders from before the setting searched without it.
        del selection["by_modality"]
    return {**encoder, "bank_split": config.bank_split, "seed": config.seed,
            "selection": selection, "index": index}


def check_none_before(data_dir: str) -> None:
    """Raises UserInputError when a rerun without retrieval finds a folder preprocessed with
    it: its finished shards would keep their neighbors (plan.json records this only since
    the settings were added to it)."""
    if fs.exists(os.path.join(retrieval_dir(data_dir), RETRIEVAL_JSON)):
        raise UserInputError(
            f"{data_dir} was preprocessed with retrieval (it has {RETRIEVAL_JSON}), now "
            "preprocess.retrieval = None: its shards would keep their neighbors. Give "
            "preprocessing a new MODEL_DIR, or rerun it with the earlier RetrievalConfig.")


def _check_same_as_built(meta: dict, config: RetrievalConfig, meta_path: str) -> None:
    """Raises UserInputError when `config`'s selection rules are not those the neighbors at
    `meta_path` were found with (a folder whose plan.json predates recording them); fields
    it did not record are not compared. Not the encoder's path: a folder copied with its
    encoder would be refused."""
    then = meta.get("selection", {})
    now = json.loads(json.dumps(dataclasses.asdict(config.selection)))
    differ = [f"SelectionConfig.{k}: {then.get(k)} then, {v} now"
              for k, v in now.items() if k in then and then[k] != v]
    if differ:
        raise UserInputError(
            f"{meta_path} was made with another retrieval setting ({'; '.join(differ)}): "
            "its neighbors would be kept. Give preprocessing a new MODEL_DIR, or rerun it "
            "with the earlier SelectionConfig.")


class VectorWriter:
    """Pass 1 for one shard: collects the written documents' vectors, then stores them."""

    def __init__(self, encoder, config: RetrievalConfig, spec):
        self.encoder, self.config, self.spec = encoder, config, spec
        self.in_bank = spec.split == config.bank_split
        self.rng = np.random.default_rng(
            [config.seed, zlib.crc32(spec.split.encode()), spec.index])
        self.doc_ids: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.vectors, self.queries, self.multimodal = [], [], []
        self.by_modality: list[np.ndarray] = []  # SelectionConfig.by_modality's queries.

    def add(self, docs: Sequence[shards.TokenizedDocument], captions: Sequence[str],
            images: Sequence[np.ndarray]) -> None:
        if not docs:
            return
        clean = self.encoder.embed_modalities(list(captions), list(images))
        vectors, multimodal = self.encoder.document_vectors(clean)
        self.vectors.append(vectors)
        self.multimodal.append(multimodal)
        queries = clean  # Train documents search with dropout, the others clean.
        dropout = self.config.selection.query_dropout
        if self.in_bank and dropout > 0:
            queries = self.encoder.embed_modalities(list(captions), list(images), dropout,
                                                    self.rng)
            self.queries.append(self.encoder.document_vectors(queries)[0])
        if self.config.selection.by_modality:
            self.by_modality.append(queries)
        self.doc_ids += [d.doc_id for d in docs]
        self.tokens += [d.ids for d in docs]

    def write(self, files: ShardFiles) -> None:
        """Stores what was collected (atomically); nothing when the shard wrote no document."""
        if not self.doc_ids:
            return
        vectors = np.concatenate(self.vectors)
        by_modality = np.concatenate(self.by_modality) if self.by_modality else None
        if self.in_bank:
            queries = np.concatenate(self.queries) if self.queries else None
            memory_bank.write_shard(bank_dir(files.data_dir),
                                    memory_bank.shard_name(files.index), self.doc_ids,
                                    vectors, np.concatenate(self.multimodal), self.tokens,
                                    queries, by_modality)
        else:
            files.write_queries(self.doc_ids, vectors, by_modality)


def build_bank(data_dir: str, config: RetrievalConfig, bank_changed: bool) -> dict:
    """Finalizes the bank and indexes it (unless nothing changed); returns retrieval.json."""
    out = retrieval_dir(data_dir)
    meta_path = os.path.join(out, RETRIEVAL_JSON)
    if not bank_changed and fs.exists(meta_path):
        meta = fs.read_json(meta_path)
        _check_same_as_built(meta, config, meta_path)
        return meta
    if not fs.isdir(bank_dir(data_dir)):
        _no_bank(data_dir, config.bank_split)
    start = time.time()
    manifest = memory_bank.finalize(bank_dir(data_dir))
    bank = memory_bank.MemoryBank(bank_dir(data_dir))
    index_info = build.build_index(bank, os.path.join(out, "index"), config.index)
    summary = {**encoder_record(config.encoder_dir, cached_encoder(config.encoder_dir), out),
               "num_docs": manifest["num_docs"],
               "dim": manifest["dim"], "shards": len(manifest["shards"]), "index": index_info,
               "selection": dataclasses.asdict(config.selection),
               "index_seconds": round(time.time() - start, 1)}
    vocab = os.path.join(data_dir, "vocab")  # What the documents' tokens were made with.
    if fs.exists(os.path.join(vocab, "layout.json")):
        summary["vocabulary"] = vocab_record.of(MultimodalVocabulary(vocab))
    # Neighbors found in an older bank may point at rows that moved or vanished: forgotten
    # first, so that a kill between the two cannot leave them beside the new retrieval.json.
    forget_neighbors(data_dir)
    fs.write_json(meta_path, summary, indent=2)
    return summary


def _no_bank(data_dir: str, split: str) -> None:
    """build_bank's error when no document of the bank's split was written: the skip counts
    of the manifest (written before the retrieval step) say why."""
    path = fs.join(data_dir, "manifest.json")
    counts = fs.read_json(path).get("splits", {}).get(split, {}) if fs.exists(path) else {}
    skipped = counts.get("skipped", {})
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    raise UserInputError(
        f"no {split!r} document was written to {data_dir}, so there is no memory bank to "
        f"retrieve from: of {counts.get('read', 0)} pairs read, skipped "
        f"{why or 'none'} (sample ids under skipped_sample_ids in {path}). Fix those pairs "
        "(e.g. image_too_small: prepare the source at the image tokenizer's size or larger) "
        "and preprocess into a new MODEL_DIR.")


def _queries(files: ShardFiles, retriever: Retriever,
             config: RetrievalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc ids, query vectors f32[n, d] (by modality: f32[n, 2, d]), own bank rows
    int64[n] or -1) of one shard."""
    bank = retriever.bank
    by_modality = config.selection.by_modality
    shape = [0, 2, bank.dim] if by_modality else [0, bank.dim]
    nothing = np.zeros([0], np.str_), np.zeros(shape, np.float32), np.zeros([0], np.int64)
    if files.split != config.bank_split:
        if not files.has_vectors(in_bank=False):
            return nothing  # the shard wrote no document
        doc_ids, vectors = files.read_queries(modalities=by_modality)
        return doc_ids, vectors, np.full([len(doc_ids)], -1, np.int64)
    names = [s["name"] for s in bank.manifest["shards"]]
    name = memory_bank.shard_name(files.index)
    if name not in names:
        return nothing
    s = names.index(name)
    if by_modality and not bank.has_modality_queries:
        raise UserInputError(
            f"the memory bank {bank.directory!r} holds no query vectors by modality (built "
            "without SelectionConfig.by_modality): preprocess into a new MODEL_DIR with it.")
    key = ("modality_queries" if by_modality
           else "query_vectors" if bank.has_query_vectors else "vectors")
    n = int(bank.shard_sizes[s])
    return (np.asarray(bank.shard_array(s, "doc_ids")), np.asarray(bank.shard_array(s, key)),
            bank.offsets[s] + np.arange(n, dtype=np.int64))


def attach_neighbors(spec, data_dir: str, retriever: Retriever,
                      config: RetrievalConfig) -> dict:
    """Pass 2 for one shard: search, select, materialize, rewrite; returns its counts."""
    files = ShardFiles.of(data_dir, spec)
    records = list(shards.read_file(files.records).as_numpy_iterator())
    doc_ids, queries, own = _queries(files, retriever, config)
    got = [r["doc_id"].decode() for r in records]
    if got != [str(d) for d in doc_ids]:
        raise ValueError(f"{files.records} holds {len(got)} documents but its vectors describe "
                         f"{len(doc_ids)} others; delete {files.stats} so that "
                         "preprocessing tokenizes and encodes this shard again.")
    k = config.selection.k
    rows = np.full([len(records), k], -1, np.int64)
    search = (retriever.search_by_modality_raw if config.selection.by_modality
              else retriever.search_vectors_raw)
    for a in range(0, len(records), config.search_batch):
        b = min(a + config.search_batch, len(records))
        rows[a:b] = search(queries[a:b], exclude_rows=own[a:b])[0]
    docs = []
    for record, doc_rows in zip(records, rows):
        tokens, ids = materialize(retriever.bank, doc_rows)
        docs.append(shards.TokenizedDocument(record["doc_id"].decode(), record["ids"],
                                             tokens, ids))
    files.write_records(docs)
    stats = {"split": spec.split, "documents": len(docs),
             "neighbors_per_document": np.bincount((rows >= 0).sum(1),
                                                    minlength=k + 1).tolist()}
    files.write_neighbors(stats)
    return stats


@dataclasses.dataclass
class NeighborWorker:
    """What each Beam worker runs per shard in pass 2 (the retriever opens in `setup`)."""

    data_dir: str
    config: RetrievalConfig
    gin_config: str = ""

    def setup(self) -> None:
        if self.gin_config and not gin.config_str():
            gin.parse_config(self.gin_config)
        self._retriever = Retriever.open(retrieval_dir(self.data_dir), self.config.selection,
                                         with_encoder=False)

    def __call__(self, spec) -> dict:
        stats = attach_neighbors(spec, self.data_dir, self._retriever, self.config)
        return {**stats, "counters": {"documents_with_neighbors": stats["documents"]}}


def summarize(specs, data_dir: str, bank_summary: dict) -> dict:
    """The manifest's `retrieval` entry: the bank, the index, neighbors per split."""
    splits: dict = {}
    for spec in specs:
        stats = ShardFiles.of(data_dir, spec).read_neighbors()
        counts = np.asarray(stats["neighbors_per_document"])
        total = splits.setdefault(spec.split, np.zeros_like(counts))
        splits[spec.split] = total + counts
    per_split = {split: {"documents": int(c.sum()),
                         "neighbors_per_document": c.tolist(),
                         "mean_neighbors": float((c * np.arange(c.size)).sum() / max(c.sum(), 1))}
                 for split, c in splits.items()}
    return {"bank_documents": bank_summary["num_docs"], "index": bank_summary["index"],
            "encoder_dir": bank_summary["encoder_dir"], "splits": per_split}
