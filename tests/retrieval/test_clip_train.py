"""The train_retriever mode learns: loss falls, recall beats chance, the encoder reloads."""

import json
import shutil

import numpy as np

from cm3leon_jax.data.synthetic import synthetic_pairs
from cm3leon_jax.retrieval import clip, clip_train
from cm3leon_jax.retrieval.encoder import DocumentEncoder

CFG = clip.ClipConfig(image_size=32, patch_size=8, vision_width=48, vision_layers=1,
                      vision_heads=2, vision_mlp=96, vocab_size=1024, context_length=32,
                      text_width=48, text_layers=1, text_heads=2, text_mlp=96,
                      eos_token_id=1023, projection_dim=32)


def test_short_training_run_learns_and_saves(tmp_path):
    cfg = CFG
    m = clip_train.train_retriever(str(tmp_path), cfg,
                                   train_pairs=synthetic_pairs("train", 300, 32),
                                   test_pairs=synthetic_pairs("test", 64, 32), steps=40,
                                   batch_size=32, learning_rate=3e-3, warmup_steps=5,
                                   log_every=20)
    # InfoNCE at chance is ln(batch) = 3.47; the run must get well below it.
    assert m["final_loss"] < np.log(32) - 1.0, m["history"]
    chance = 5 / 64
    assert m["text_to_image_recall@5"] > 2 * chance and m["image_to_text_recall@5"] > 2 * chance, m
    saved = json.load(open(tmp_path / "retriever_metrics.json"))
    assert saved["text_to_image_recall@1"] == m["text_to_image_recall@1"]
    enc = DocumentEncoder.load(str(tmp_path / "encoder"))
    images, captions = synthetic_pairs("test", 64, 32)
    again = clip_train.evaluate(enc, images, captions)
    np.testing.assert_allclose(again["text_to_image_recall@5"], m["text_to_image_recall@5"])


def test_recall_at_counts_any_relevant_hit():
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    relevant = np.array([[False, False, True], [True, False, False]])
    r = clip_train.recall_at(sims, relevant, ks=(1, 2))
    assert r == {1: 0.0, 2: 1.0}


def test_a_run_resumes_from_its_checkpoint_and_ends_the_same(tmp_path):
    """A run stopped after its step-3 checkpoint, rerun, ends as the uninterrupted run."""
    kw = dict(train_pairs=synthetic_pairs("train", 40, 32), test_pairs=synthetic_pairs(
        "test", 16, 32), steps=6, batch_size=8, learning_rate=3e-3, warmup_steps=1,
        log_every=2, checkpoint_every=3, keep_checkpoints=5, write_tensorboard=False)
    full = clip_train.train_retriever(str(tmp_path / "full"), CFG, **kw)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["3", "6"]
    # What a run killed after step 3's save leaves behind.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "3", cut / "checkpoints" / "3")
    resumed = clip_train.train_retriever(str(cut), CFG, **kw)
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6]
    assert resumed["history"] == full["history"]
    for key in ("text_to_image_recall@1", "image_to_text_recall@5", "final_loss"):
        assert resumed[key] == full[key], key
    a = DocumentEncoder.load(str(tmp_path / "full" / "encoder"))
    b = DocumentEncoder.load(str(cut / "encoder"))
    images = synthetic_pairs("test", 4, 32)[0]
    np.testing.assert_array_equal(a.embed_images(images), b.embed_images(images))
