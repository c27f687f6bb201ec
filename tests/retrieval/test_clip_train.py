"""The train_retriever mode learns: loss falls, recall beats chance, the encoder reloads, a
run resumes from its checkpoint and ends as the uninterrupted one."""

import json
import shutil

import numpy as np
import pytest

from cm3leon_jax.data.synthetic import synthetic_pairs
from cm3leon_jax.retrieval import clip, clip_train
from cm3leon_jax.retrieval.encoder import DocumentEncoder

CFG = clip.ClipConfig(image_size=32, patch_size=8, vision_width=48, vision_layers=1,
                      vision_heads=2, vision_mlp=96, vocab_size=1024, context_length=32,
                      text_width=48, text_layers=1, text_heads=2, text_mlp=96,
                      eos_token_id=1023, projection_dim=32)


@pytest.mark.parametrize("mirror", [False, True])
def test_short_training_run_learns_saves_and_resumes(tmp_path, mirror):
    kw = dict(train_pairs=synthetic_pairs("train", 300, 32),
              test_pairs=synthetic_pairs("test", 64, 32), steps=40, batch_size=32,
              learning_rate=3e-3, warmup_steps=5, log_every=20, checkpoint_every=20,
              keep_checkpoints=5, mirror=mirror)
    m = clip_train.train_retriever(str(tmp_path / "run"), CFG, **kw)
    # InfoNCE at chance is ln(batch) = 3.47; the run must get well below it.
    assert m["final_loss"] < np.log(32) - 1.0, m["history"]
    chance = 5 / 64
    assert m["text_to_image_recall@5"] > 2 * chance and m["image_to_text_recall@5"] > 2 * chance, m
    saved = json.load(open(tmp_path / "run" / "retriever_metrics.json"))
    assert saved["text_to_image_recall@1"] == m["text_to_image_recall@1"]
    enc = DocumentEncoder.load(str(tmp_path / "run" / "encoder"))
    images, captions = synthetic_pairs("test", 64, 32)
    again = clip_train.evaluate(enc, images, captions)
    np.testing.assert_allclose(again["text_to_image_recall@5"], m["text_to_image_recall@5"])

    # What a run killed after its step-20 checkpoint leaves: rerun, it ends as this one did
    # (same shapes and schedule, so the session's compilation cache serves the rerun).
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["20", "40"]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "20", cut / "checkpoints" / "20")
    resumed = clip_train.train_retriever(str(cut), CFG, **kw)
    assert resumed["history"] == m["history"] and [h["step"] for h in m["history"]] == [20, 40]
    for key in ("text_to_image_recall@1", "image_to_text_recall@5", "final_loss"):
        assert resumed[key] == m[key], key
    np.testing.assert_array_equal(DocumentEncoder.load(str(cut / "encoder")).embed_images(images),
                                  enc.embed_images(images))


def test_recall_at_counts_any_relevant_hit():
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    relevant = np.array([[False, False, True], [True, False, False]])
    r = clip_train.recall_at(sims, relevant, ks=(1, 2))
    assert r == {1: 0.0, 2: 1.0}


def test_a_mirrored_caption_swaps_left_and_right_only():
    assert clip_train.mirror_caption(
        "a red star on the left, and a blue circle to the right of the red star") == \
        "a red star on the right, and a blue circle to the left of the red star"
    assert clip_train.mirror_caption("a green square in the top left corner") == \
        "a green square in the top right corner"
    assert clip_train.mirror_caption("a bright circle above the square") == \
        "a bright circle above the square"  # "bright" is not "right"


def test_a_mirrored_pair_flips_the_image_left_to_right_with_its_caption():
    images = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    tokens = [[[10 * i + w + 1] for w in range(4)] for i in range(6)]
    mirrored = [[[-(10 * i + w + 1)] for w in range(4)] for i in range(6)]
    plain_batch, plain = clip_train.pair_batch(clip_train.PairDraws(0), images, tokens, None, 6)
    batch, chosen = clip_train.pair_batch(clip_train.PairDraws(0), images, tokens, mirrored, 6)
    flipped = [c[0] < 0 for c in chosen]
    assert any(flipped) and not all(flipped)  # seed 0 mirrors some of the 6, not all
    for b, p, c, pc, f in zip(batch, plain_batch, chosen, plain, flipped):
        # The same draws; a mirrored pair is the image reversed along its width, its
        # caption the mirrored one.
        np.testing.assert_array_equal(b, p[:, ::-1] if f else p)
        assert c == ([-pc[0]] if f else pc)
