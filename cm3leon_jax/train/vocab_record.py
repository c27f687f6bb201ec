"""A train run's record of the vocabulary its model was trained on: MODEL_DIR/vocabulary.json.

A vocabulary of the same size but another text model (trained on other text) passes every
size and layout check and turns the model's words into other words. So the trainer records
its task's vocabulary's fingerprint (`MultimodalVocabulary.fingerprint`) beside config.gin,
and the runs that read the model compare theirs with it: a resume (the trainer), SFT from
a base, generate, eval and export (`decode/restore.vocabulary_mismatch`; an export's
manifest carries the record on). Runs saved before records have none and are not checked.

The vocabulary is taken by what it has (`fingerprint`, `directory`, `layout.vocab_size`):
this package sits below `vocab/` in the flow.
"""

from __future__ import annotations

import json
from typing import Any

from cm3leon_jax import fs

FILE = "vocabulary.json"


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
    fs.makedirs(model_dir)
    with fs.open(fs.join(model_dir, FILE), "w") as f:
        json.dump(of(vocab), f, indent=2)


def mismatch(record: dict | None, vocab: Any) -> str | None:
    """How `vocab` differs from the one a model was trained on (its `record`), or None: the
    same, or no record to compare with."""
    if record is None or record.get("fingerprint") == vocab.fingerprint:
        return None
    return (f"its model was trained on the vocabulary in {record.get('directory')!r} "
            f"(fingerprint {record.get('fingerprint')}), not this one (fingerprint "
            f"{vocab.fingerprint}: another text model or layout, even if of the same size)")
