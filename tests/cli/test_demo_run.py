"""`make demo`'s run file, end to end at toy size: every stage runs, a rerun resumes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# demo.gin with every stage shrunk to seconds; the stages and their wiring are unchanged.
TOY = [
    "demo.split_sizes={'train': 80, 'validation': 20, 'test': 20}",
    "demo.num_pictures=4", "demo.parse_examples=10",
    "train_image_tokenizer.num_steps=10", "train_image_tokenizer.eval_every=10",
    "train_image_tokenizer.checkpoint_every=10", "train_image_tokenizer.eval_examples=16",
    "train_retriever.steps=5", "train_retriever.warmup_steps=1",
    "train_retriever.num_train=80", "train_retriever.num_test=20",
    "train_retriever.batch_size=16",
    "preprocess.docs_per_shard=40", "preprocess.text_vocab_size=300",
    "train.num_steps=4", "train.eval_every=0", "train.eval_steps=1",
    "train.global_batch_size=2",
]


def _demo(model_dir):
    args = [sys.executable, "-m", "cm3leon_jax.main", "--gin_file=gin_configs/runs/demo.gin",
            f"--gin.MODEL_DIR='{model_dir}'", *[f"--gin.{b}" for b in TOY]]
    r = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def test_demo_runs_every_stage_and_resumes(tmp_path):
    model_dir = str(tmp_path / "demo")
    metrics = _demo(model_dir)
    assert metrics["corpus"]["splits"] == {"train": 80, "validation": 20, "test": 20}
    assert metrics["preprocess"]["splits"]["train"]["written"] == 80
    retrieval = metrics["preprocess"]["retrieval"]
    assert retrieval["bank_documents"] == 80
    for split in ("train", "validation", "test"):
        assert retrieval["splits"][split]["mean_neighbours"] > 0
    assert metrics["pretrain"]["steps"] == 4
    assert 0 < metrics["pretrain"]["final_eval"]["loss"] < 20
    for picture in ("corpus.png", "reconstructions.png"):
        assert os.path.getsize(os.path.join(model_dir, "pictures", picture)) > 0

    again = _demo(model_dir)  # every stage finds its output and does not redo it
    assert again["retriever"] == metrics["retriever"]
    assert again["preprocess"] == metrics["preprocess"]
    assert again["pretrain"]["steps"] == 4
    assert again["seconds"]["image_tokenizer"] < metrics["seconds"]["image_tokenizer"]
