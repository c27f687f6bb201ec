"""Shared pieces of the trainer tests: a tiny tokenized corpus and ways to run the trainer.

The trainer runs exactly as a user runs it: `cm3leon_jax.main` with
gin_configs/train/tiny.gin, either in this process (`run_in_process`) or as a
subprocess (`start_subprocess`), with bindings that shrink it to a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_GIN = os.path.join(REPO, "gin_configs", "train", "tiny.gin")

CAPTIONS = [f"a {c} {s} next to a {c2} {s2}" for c in ("red", "blue", "green")
            for s in ("circle", "star", "square") for c2 in ("pink", "grey")
            for s2 in ("heart", "moon")]


def tiny_config(**changes):
    """`DecoderConfig` of gin_configs/models/tiny.gin, with `changes` (gin state restored)."""
    from cm3leon_jax.model.config import DecoderConfig
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", "tiny.gin"))
        return DecoderConfig().replace(**changes)
    finally:
        gin.clear_config()


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed batch: two segments a row, the tail padding, loss on every real token."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cut, end = sorted(rng.choice(np.arange(2, length - 1), 2, replace=False))
        seg[b, :cut], seg[b, cut:end] = 1, 2
        pos[b, :cut], pos[b, cut:end] = np.arange(cut), np.arange(end - cut)
        tokens[b, end:] = 0
    return {"decoder_input_tokens": tokens,
            "decoder_target_tokens": np.roll(tokens, -1, axis=1) * (seg > 0),
            "decoder_loss_weights": (seg > 0).astype(np.float32),
            "decoder_segment_ids": seg, "decoder_positions": pos}


def build_corpus(root: str) -> int:
    """36 documents per split with 3 neighbors each, as preprocess writes them.

    Returns the vocabulary size (rows the decoder's embedding needs).
    """
    import tasks
    from cm3leon_jax.data import shards
    from cm3leon_jax.vocab import document as document_lib
    from cm3leon_jax.vocab.document import Document, Image, Text
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

    vocab = MultimodalVocabulary.create(
        f"{root}/vocab", TextTokenizer.train(CAPTIONS, 280), image_codes=32,
        num_sentinels=8, image_length=16)
    rng = np.random.default_rng(0)
    docs = [document_lib.encode(Document([Text(c), Image(rng.integers(0, 32, 16))]), vocab)
            for c in CAPTIONS]
    n = len(docs)
    for split in tasks.pretrain.SPLITS:
        records = [shards.TokenizedDocument(
            doc_id=f"{split}-{i}", ids=d, neighbors=[docs[(i + j) % n] for j in (1, 2, 3)],
            neighbor_doc_ids=[f"{split}-{(i + j) % n}" for j in (1, 2, 3)])
            for i, d in enumerate(docs)]
        shards.write_split(records, root, split, num_shards=2)
    return vocab.vocab_size


def bindings(model_dir: str, corpus: str, vocab_size: int, **overrides) -> list[str]:
    """gin bindings for a tiny run: 8 rows of 128 tokens, FSDP over the fake devices."""
    values = {
        "MODEL_DIR": repr(model_dir),
        "data_dirs.synthetic": repr(corpus),
        "DecoderConfig.vocab_size": vocab_size,
        "DecoderConfig.max_length": 128,
        "train.seq_len": 128,
        "train.global_batch_size": 8,
        "train.num_steps": 8,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_steps": 1,
        "train.progress_bar": False,
        "learning_rate_schedule.warmup_steps": 2,
        "learning_rate_schedule.decay_steps": 100,
        "Checkpointer.save_every": 4,
        "make_mesh.data": 2,
        "make_mesh.fsdp": -1,
    }
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def run_in_process(binding_list: list[str]) -> dict:
    """Parses tiny.gin + bindings and runs the mode, as `cm3leon_jax.main` does."""
    from cm3leon_jax import main as main_lib
    gin.clear_config()
    try:
        main_lib.configure([TRAIN_GIN], binding_list)
        return main_lib.run()
    finally:
        gin.clear_config()


def start_subprocess(binding_list: list[str], env: dict | None = None,
                     log_path: str | None = None,
                     program: tuple[str, ...] = ("-m", "cm3leon_jax.main")) -> subprocess.Popen:
    """`python -m cm3leon_jax.main --gin_file=tiny.gin --gin.K=V ...` in the background.

    `program`: what python runs instead (e.g. a script that injects a fault first).
    """
    args = [sys.executable, *program, f"--gin_file={TRAIN_GIN}"]
    args += [f"--gin.{b}" for b in binding_list]
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(args, cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def read_metrics(model_dir: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: values}; later lines win (a resumed run rewrites steps)."""
    out: dict[int, dict[str, float]] = {}
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(row.pop("step"), {}).update(row)
    return out


def losses(model_dir: str) -> dict[int, float]:
    return {s: v["loss"] for s, v in read_metrics(model_dir).items() if "loss" in v}


def tree_digests(root: str) -> dict[str, bytes]:
    """{relative path: sha256} of every file under `root` (to check a folder is untouched)."""
    import hashlib
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).digest()
    return out
