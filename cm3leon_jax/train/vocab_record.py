"""A train run's record of the vocabulary its model was trained on: MODEL_DIR/vocabulary.json.

A vocabulary of the same size but another text model (trained on other text) passes every
size and layout check and turns the model's words into other words. So the trainer records
its task's vocabulary's fingerprint (`MultimodalVocabulary.fingerprint`) beside config.gin,
and the runs that read the model compare theirs with it: a resume (the trainer), SFT from
a base, generate, eval and export (`decode/restore.vocabulary_mismatch`; an export's
manifest carries the record on). Runs saved before records have none and are not checked.

The record also names the preprocessed data folder the vocabulary lies in (its parent:
preprocessing writes DATA/vocab) with a digest of that folder's plan.json (what it was made
from and how: the source, its held-out split, the layout of its documents), so that a run
given a data folder can refuse one the model was not trained on (`data_mismatch`:
generate's and eval's `data_dir`; another preprocessing of the same captions has the same
vocabulary).

The vocabulary is taken by what it has (`fingerprint`, `directory`, `layout.vocab_size`):
this package sits below `vocab/` in the flow.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from cm3leon_jax import fs

FILE = "vocabulary.json"
# Preprocessing's record of how a data folder was made (data/preprocess.py writes it; the
# data package reads it through here, which sits below it in the flow).
PLAN_FILE = "plan.json"


def of(vocab: Any) -> dict:
    """What a record holds of `vocab`."""
    return {"fingerprint": vocab.fingerprint, "directory": vocab.directory,
            "vocab_size": vocab.layout.vocab_size}


def read(model_dir: str) -> dict | None:
    """The record in `model_dir`, or None (a run from before records, or none)."""
    path = fs.join(model_dir, FILE)
    if not fs.exists(path):
        return None
    with fs.open(path) as f:
        return json.load(f)


def write(model_dir: str, vocab: Any) -> None:
    """The trainer's record: `of(vocab)`, and the data folder it lies in with its plan's
    digest where that folder is preprocessing's (a plan.json and a retrieval bank beside the
    vocabulary). An SFT data folder is not: its vocab/ is a copy of the base's data's, and
    a fine-tuned model generates and is evaluated with the base's bank and held-out split."""
    record = of(vocab)
    data_dir = posixpath.dirname(fs.abspath(str(vocab.directory)).rstrip("/"))
    digest = plan_digest(data_dir) if fs.exists(fs.join(data_dir, "retrieval")) else None
    if digest is not None:
        record["data"] = {"directory": data_dir, "plan": digest}
    fs.makedirs(model_dir)
    with fs.open(fs.join(model_dir, FILE), "w") as f:
        json.dump(record, f, indent=2)


def read_plan(data_dir: str) -> dict:
    """`data_dir`'s plan.json as a run wrote it ({} before the first run, or none)."""
    path = fs.join(data_dir, PLAN_FILE)
    return fs.read_json(path) if data_dir and fs.exists(path) else {}


def plan_digest(data_dir: str) -> str | None:
    """A digest of `data_dir`'s plan.json (its keys sorted), or None where it has none."""
    plan = read_plan(data_dir)
    if not plan:
        return None
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def data_mismatch(record: dict | None, data_dir: str) -> str | None:
    """How `data_dir` is not the data folder a model was trained on (its `record`), or None:
    the same plan (the folder itself, or a copy), or no record of one to compare with."""
    trained = (record or {}).get("data")
    if not trained:
        return None
    digest = plan_digest(data_dir)
    if digest == trained.get("plan"):
        return None
    made = (f"this one was made otherwise (plan {digest}: another source, held-out split or "
            "document layout, even with the same vocabulary)" if digest else
            "this one holds no plan.json to compare (a copy should take it along)")
    return (f"its model was trained on the data folder {trained.get('directory')!r} (plan "
            f"{trained.get('plan')}), and {made}")


def mismatch(record: dict | None, vocab: Any) -> str | None:
    """How `vocab` differs from the one a model was trained on (its `record`), or None: the
    same, or no record to compare with."""
    if record is None or record.get("fingerprint") == vocab.fingerprint:
        return None
    return (f"its model was trained on the vocabulary in {record.get('directory')!r} "
            f"(fingerprint {record.get('fingerprint')}), not this one (fingerprint "
            f"{vocab.fingerprint}: another text model or layout, even if of the same size)")
