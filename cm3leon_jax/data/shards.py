"""The tokenized corpus on disk: TFRecord shards that SeqIO tasks read.

Offline preprocessing writes, per split, `{split}-00000-of-000NN.tfrecord`
files of `tf.train.Example`s, one per query document:

    doc_id              bytes       the source's id of the document
    ids                 int64[n]    the document's tokens (`vocab/document.py`)
    neighbor_ids       int64[m]    the retrieved candidates' tokens, concatenated
    neighbor_lengths   int64[c]    where each candidate ends (c candidates)
    neighbor_doc_ids   bytes[c]    their ids, for inspection

The neighbors are materialized into each record, so training reads one file
and does no lookups; the memory bank they came from stays on the retrieval side.
A `manifest.json` beside the shards records counts and what was skipped, and
`plan.json` what they were made from (`check_plan`), so a rerun of another plan is
refused instead of mixing its shards with the earlier ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError, check_count
from cm3leon_jax.train import vocab_record

FEATURES = {
    "doc_id": tf.io.FixedLenFeature([], tf.string),
    "ids": tf.io.VarLenFeature(tf.int64),
    "neighbor_ids": tf.io.VarLenFeature(tf.int64),
    "neighbor_lengths": tf.io.VarLenFeature(tf.int64),
    "neighbor_doc_ids": tf.io.VarLenFeature(tf.string),
}


@dataclasses.dataclass
class TokenizedDocument:
    doc_id: str
    ids: np.ndarray  # int32[n]
    neighbors: Sequence[np.ndarray] = ()  # most relevant first
    neighbor_doc_ids: Sequence[str] = ()


def serialize(doc: TokenizedDocument) -> bytes:
    lengths = [len(n) for n in doc.neighbors]
    flat = np.concatenate(doc.neighbors) if lengths else np.zeros([0], np.int64)

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(v).tolist()))

    def strings(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode() for s in v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "doc_id": strings([doc.doc_id]),
        "ids": ints(doc.ids),
        "neighbor_ids": ints(flat),
        "neighbor_lengths": ints(lengths),
        "neighbor_doc_ids": strings(doc.neighbor_doc_ids),
    })).SerializeToString(deterministic=True)  # Map order fixed: same bytes in any process.


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """One serialized record -> dense int32 tensors (strings stay strings)."""
    ex = tf.io.parse_single_example(serialized, FEATURES)
    out = {"doc_id": ex["doc_id"]}
    for k in ("ids", "neighbor_ids", "neighbor_lengths"):
        out[k] = tf.cast(tf.sparse.to_dense(ex[k]), tf.int32)
    out["neighbor_doc_ids"] = tf.sparse.to_dense(ex["neighbor_doc_ids"])
    return out


def slices(num_examples: int, docs_per_shard: int, setting: str) -> list[tuple[int, int]]:
    """`[start, stop)` of each shard of `num_examples` in shards of about `docs_per_shard`
    (at least one shard); `setting` names where `docs_per_shard` was given, for its error."""
    check_count(setting, docs_per_shard)
    num = max(1, -(-num_examples // docs_per_shard))
    bounds = np.linspace(0, num_examples, num + 1).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(num)]


def shard_path(directory: str, split: str, index: int, num_shards: int) -> str:
    return os.path.join(directory, f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord")


def shard_pattern(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}-*-of-*.tfrecord")


_SHARD_NAME = re.compile(r"(.+)-\d{5,}-of-\d{5,}\.tfrecord")


def write_records(docs: Iterable[TokenizedDocument], path: str) -> int:
    """Writes docs to one TFRecord file; returns how many."""
    n = 0
    with tf.io.TFRecordWriter(path) as writer:
        for n, doc in enumerate(docs, start=1):
            writer.write(serialize(doc))
    return n


def write_split(docs: Iterable[TokenizedDocument], directory: str, split: str,
                num_shards: int) -> int:
    """Writes docs round-robin over `num_shards` files; returns how many."""
    fs.makedirs(directory)
    writers = [tf.io.TFRecordWriter(shard_path(directory, split, i, num_shards))
               for i in range(num_shards)]
    n = 0
    try:
        for n, doc in enumerate(docs, start=1):
            writers[(n - 1) % num_shards].write(serialize(doc))
    finally:
        for w in writers:
            w.close()
    return n


def read_file(path: str) -> tf.data.Dataset:
    """One shard file's records, in order."""
    return tf.data.TFRecordDataset([path]).map(parse)


def read_split(directory: str, split: str, made_by: str = "preprocess") -> tf.data.Dataset:
    """The split's records in a fixed order (files sorted, read in turn). `made_by` is the
    run mode that writes the folder (`preprocess` or `sft_preprocess`), for the error."""
    return read_records(directory, split, made_by).map(parse)


def read_records(directory: str, split: str, made_by: str = "preprocess") -> tf.data.Dataset:
    """`read_split`'s serialized records, unparsed."""
    files = sorted(fs.glob(shard_pattern(directory, split)))
    if not files:
        raise MissingInputError(
            f"no shards for split {split!r} in {directory!r}; run the "
            f"`{made_by}` mode first (see gin_configs/runs/{made_by}.gin).")
    return tf.data.TFRecordDataset(files)


def written_splits(directory: str) -> list[str]:
    """The splits that have shard files in `directory`, sorted."""
    names = (os.path.basename(p) for p in fs.glob(shard_pattern(directory, "*")))
    return sorted({m.group(1) for m in map(_SHARD_NAME.fullmatch, names) if m})


def query_lengths(directory: str, split: str) -> np.ndarray:
    """int64[n]: the token count of every document (its `ids`) of the split's shards."""
    ids = {"ids": FEATURES["ids"]}
    lengths = read_records(directory, split).map(
        lambda r: tf.size(tf.io.parse_single_example(r, ids)["ids"].values, tf.int64))
    return np.fromiter(lengths.as_numpy_iterator(), np.int64)


def read_doc_tokens(directory: str, split: str) -> dict[str, np.ndarray]:
    """doc_id -> int32[n] ids of every document of the split's shards."""
    return {ex["doc_id"].decode(): ex["ids"].astype(np.int32)
            for ex in read_split(directory, split).as_numpy_iterator()}


PLAN_FILE = vocab_record.PLAN_FILE
read_plan = vocab_record.read_plan  # MODEL_DIR/plan.json as a run wrote it, or {}.


def check_image_tokenizer(vocab_dir: str, tokenizer: Any, setting: str) -> None:
    """Raises UserInputError when `tokenizer` is not the one whose codes the data folder of
    `vocab_dir` (its parent) holds: preprocessing and SFT preprocessing record that one's
    `fingerprint` in plan.json (config and weights: a checkpoint of the same shape from
    another run, or another step, makes other codes, and nothing else would tell). A folder
    without the record (an import's vocabulary, data from before it) is not checked."""
    data_dir, plan = _data_plan(vocab_dir)
    recorded = [v["config_and_weights"] for v in plan.values()
                if isinstance(v, dict) and "config_and_weights" in v]
    mine = getattr(tokenizer, "fingerprint", None)
    if recorded and mine is not None and mine != recorded[0]:
        raise UserInputError(
            f"{setting} is not the image tokenizer the data in {data_dir!r} was made with (its "
            f"{PLAN_FILE} records {recorded[0]}, this one is {mine}: another checkpoint, or "
            "the same one at another step), so its codes would mean other images than the "
            "ones the model was trained on. Give the image tokenizer that preprocessing used.")


def _data_plan(vocab_dir: str) -> tuple[str, dict]:
    """(the data folder of `vocab_dir`, its plan.json or {})."""
    data_dir = os.path.dirname(str(vocab_dir).rstrip("/"))
    return data_dir, read_plan(data_dir)


def check_caption_style(vocab_dir: str, style: str, setting: str) -> None:
    """Raises UserInputError for image-first captions (`image <break>` then the caption) of a
    model whose data laid every document out caption first (`preprocess.image_first_prob`
    0 in its plan.json, as `preprocess_user.gin` makes it): it never saw text after an
    image, and would caption from a prompt it was not trained on. Data without the record
    (SFT data, an import) is not checked."""
    data_dir, plan = _data_plan(vocab_dir)
    if style == "image_first" and plan.get("preprocess.image_first_prob") == 0:
        raise UserInputError(
            f"{setting}='image_first', and the data in {data_dir!r} laid out every document "
            "caption first (preprocess.image_first_prob 0): its model has not seen a caption "
            f"after an image. Bind {setting}='infill' (CM3's masked caption), or preprocess "
            "with image-first documents too (preprocess.image_first_prob > 0).")


def plan_layout(specs: Iterable[Any], key=lambda spec: spec.split) -> dict[str, list[int]]:
    """{key: [shards, records]} of shard specs (anything with num_shards, start, stop),
    grouped by `key(spec)` (the split; `family/split` for SFT data)."""
    layout: dict[str, list[int]] = {}
    for spec in specs:
        layout.setdefault(key(spec), [spec.num_shards, 0])[1] += spec.stop - spec.start
    return layout


def check_plan(model_dir: str, plan: dict, planned: Iterable[str], patterns: Iterable[str],
               *, who: str, settings: str, optional: Sequence[str] = ()) -> None:
    """Records `plan` in MODEL_DIR/plan.json on the first run, and refuses a rerun whose
    plan differs: its shards would sit beside the earlier ones (a split read as both, or
    records of another source, length or layout kept as done).

    Args:
      model_dir: the output folder.
      plan: JSON-able: what decides the records, e.g. {"source": the source's identity,
        "shards": `plan_layout(specs)`} and, for SFT data, its seq_len and families.
      planned: the shard files this run writes.
      patterns: globs of every shard file a run of this mode may have left in model_dir;
        checked when plan.json is absent (a folder from before plan.json).
      who: the run mode, for the messages ("preprocessing", "sft_preprocess").
      settings: the bindings that change a plan, for the messages.
      optional: keys of `plan` recorded since plan.json was first written (the settings
        that decide the records, by their gin names): a plan.json without one is accepted
        with a warning, and a changed one is named down to the field that changed.
    """
    path = fs.join(model_dir, PLAN_FILE)
    if not fs.exists(path):  # A first run, or a folder from before plan.json.
        found = set().union(*(fs.glob(p) for p in patterns))
        stale = sorted(found - set(planned))
        if stale:
            name = stale[0][len(str(model_dir)):].lstrip("/\\")
            raise UserInputError(
                f"{model_dir} holds shards of another layout ({name}, ...): give {who} a "
                "new MODEL_DIR, or empty this one.")
        fs.makedirs(model_dir)
        # Shards made before plan.json: their layout is checked above, their settings are not
        # known, so none is recorded for them.
        fs.write_json(path, {k: v for k, v in plan.items() if not (found and k in optional)})
        return
    earlier = fs.read_json(path)
    plan = json.loads(json.dumps(plan))  # Tuples as lists, as plan.json holds them.
    unrecorded = [k for k in optional if k not in earlier]
    if unrecorded:
        logging.warning("%s predates recording %s in it: a rerun with other values of them "
                        "cannot be told apart.", path, ", ".join(unrecorded))
    plan = {k: v for k, v in plan.items() if k not in unrecorded}
    if earlier != plan:
        differ = _differences(earlier, plan, nested=optional)
        what = ("with other settings" if any(earlier.get(k) != plan.get(k) for k in optional)
                else "from another source or shard layout")
        layout = ("; shards as [count, records]" if earlier.get("shards") != plan.get("shards")
                  else "")
        raise UserInputError(
            f"{model_dir} was preprocessed {what} ({'; '.join(differ)}{layout}): the source "
            f"changed or {settings} did. Give {who} a new MODEL_DIR "
            "(or delete this one), or rerun it with the earlier settings: the records and "
            "neighbors it has would be kept as done, or mixed with the new ones.")


def _differences(earlier: dict, now: dict, nested: Sequence[str] = (), prefix: str = ""
                 ) -> list[str]:
    """`key: value then, value now` for each key that differs; the keys in `nested` (and
    the dicts under them) name each changed field, `key.field`."""
    def shown(value, other):
        return "{...}" if isinstance(value, dict) and not isinstance(other, dict) else value

    out = []
    for k in dict.fromkeys([*earlier, *now]):
        a, b = earlier.get(k), now.get(k)
        if a == b:
            continue
        if (prefix or k in nested) and isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, prefix=f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {shown(a, b)} then, {shown(b, a)} now")
    return out


def write_manifest(directory: str, manifest: dict) -> str:
    """Writes DATA/manifest.json atomically (a killed run leaves the old one or the new one)."""
    path = fs.join(directory, "manifest.json")
    fs.write_json(path, manifest, indent=2, sort_keys=True)
    return path


def read_manifest(directory: str) -> dict:
    return fs.read_json(fs.join(directory, "manifest.json"))
