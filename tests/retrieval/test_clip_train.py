"""The train_retriever mode learns: loss falls, recall beats chance, the encoder reloads, a
run resumes from its checkpoint and ends as the uninterrupted one."""

import json
import shutil

import jax
import numpy as np
import pytest

from cm3leon_jax.data import shapes, shapes_language
from cm3leon_jax.data.synthetic import synthetic_pairs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import clip, clip_train
from cm3leon_jax.retrieval.encoder import DocumentEncoder

CFG = clip.ClipConfig(image_size=32, patch_size=8, vision_width=48, vision_layers=1,
                      vision_heads=2, vision_mlp=96, vocab_size=1024, context_length=32,
                      text_width=48, text_layers=1, text_heads=2, text_mlp=96,
                      eos_token_id=1023, projection_dim=32)


@pytest.mark.parametrize("mirror,hard_negatives", [  # Options the demo does not take: slow.
    (False, None), pytest.param(True, None, marks=pytest.mark.slow),
    pytest.param(True, shapes_language.class_swaps, marks=pytest.mark.slow)])
def test_short_training_run_learns_saves_and_resumes(tmp_path, mirror, hard_negatives):
    kw = dict(train_pairs=synthetic_pairs("train", 300, 32),
              test_pairs=synthetic_pairs("test", 64, 32), steps=40, batch_size=32,
              learning_rate=3e-3, warmup_steps=5, log_every=20, checkpoint_every=20,
              keep_checkpoints=5, mirror=mirror, hard_negatives=hard_negatives)
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


def _tiny_run_kw(**over):
    return dict(dict(train_pairs=synthetic_pairs("train", 100, 32),
                     test_pairs=synthetic_pairs("test", 8, 32), batch_size=16,
                     learning_rate=3e-3, warmup_steps=1, log_every=1, checkpoint_every=100,
                     keep_checkpoints=5, write_tensorboard=False), **over)


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
def test_a_run_extended_in_pieces_ends_as_a_straight_one(tmp_path):
    # decay_steps binds the schedule: 3 steps then 4 follow the 4-step cosine (step 2's
    # learning rate differs between a 3- and a 4-step one).
    kw = _tiny_run_kw(decay_steps=4)
    straight = clip_train.train_retriever(str(tmp_path / "a"), CFG, steps=4, **kw)
    clip_train.train_retriever(str(tmp_path / "b"), CFG, steps=3, **kw)
    pieces = clip_train.train_retriever(str(tmp_path / "b"), CFG, steps=4, **kw)
    assert pieces["history"] == straight["history"]
    a, b = (DocumentEncoder.load(str(tmp_path / d / "encoder")).params for d in "ab")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
def test_a_resume_refuses_another_batch_size_and_warns_of_another_schedule(tmp_path, caplog):
    from cm3leon_jax.errors import CheckpointMismatchError
    from cm3leon_jax.train import checkpoints

    run = str(tmp_path / "run")
    clip_train.train_retriever(run, CFG, steps=1, **_tiny_run_kw(warmup_steps=0))
    draws = tmp_path / "run" / "checkpoints" / "1" / "data" / clip_train.PairDraws.FILE
    before = draws.read_bytes()
    with pytest.raises(CheckpointMismatchError,
                       match="batch_size 16 in the checkpoint, 32 now.*another MODEL_DIR"):
        clip_train.train_retriever(run, CFG, steps=2, **_tiny_run_kw(batch_size=32))
    assert draws.read_bytes() == before
    caplog.set_level("WARNING")
    clip_train.train_retriever(run, CFG, steps=2, **_tiny_run_kw())
    assert "schedule changes mid-run; set decay_steps=1 to keep it" in caplog.text

    # A checkpoint written before the record was kept still resumes.
    old = tmp_path / "run" / "checkpoints" / "2"
    saved = json.loads((old / "data" / clip_train.PairDraws.FILE).read_text())
    (old / "data" / clip_train.PairDraws.FILE).write_text(json.dumps(
        {k: saved[k] for k in ("bit_generator", "history")}))
    (old / checkpoints.CHECKSUMS).unlink()  # Recorded anew for the edited files.
    checkpoints.write_checksums(checkpoints.orbax_path(str(old)))
    m = clip_train.train_retriever(run, CFG, steps=3, **_tiny_run_kw(decay_steps=2))
    assert [h["step"] for h in m["history"]] == [1, 2, 3]


@pytest.mark.parametrize("which", ["train_pairs", "test_pairs"])
def test_fewer_caption_lists_than_images_are_refused(tmp_path, which):
    images = np.zeros((40, 32, 32, 3), np.uint8)
    captions = [["a red circle"] * 4] * 40
    kw = _tiny_run_kw(**{which: (images, captions[:20])})
    with pytest.raises(UserInputError, match=f"{which} holds 40 images but 20 caption lists"):
        clip_train.train_retriever(str(tmp_path / "run"), CFG, steps=2, **kw)


def test_hard_negatives_follow_the_drawn_caption_and_its_mirror():
    images = np.zeros((6, 4, 4, 3), np.uint8)
    tokens = [[[10 * i + w + 1] for w in range(4)] for i in range(6)]
    mirrored = [[[-(10 * i + w + 1)] for w in range(4)] for i in range(6)]
    # Each caption's pool: two negatives that name it; image 5's captions have none.
    pools = [[[[1000 + 10 * i + w], [2000 + 10 * i + w]] if i < 5 else [] for w in range(4)]
             for i in range(6)]
    mirrored_pools = [[[[-t[0]] for t in pool] for pool in caps] for caps in pools]
    plain_batch, plain = clip_train.pair_batch(clip_train.PairDraws(0), images, tokens,
                                               mirrored, 6)
    batch, chosen = clip_train.pair_batch(clip_train.PairDraws(0), images, tokens, mirrored, 6,
                                          (pools, mirrored_pools))
    assert len(chosen) == 12 and chosen[:6] == plain  # the same pairs, then one negative each
    np.testing.assert_array_equal(batch, plain_batch)
    for caption, negative in zip(chosen[:6], chosen[6:]):
        image, which = divmod(abs(caption[0]) - 1, 10)
        if image == 5:
            assert negative is None
            continue
        sign = -1 if caption[0] < 0 else 1  # a mirrored caption draws a mirrored negative
        assert sign * negative[0] in (1000 + 10 * image + which, 2000 + 10 * image + which)


def test_clip_loss_hard_negatives_enter_the_image_to_text_side_only_where_valid():
    params = clip.init_params(CFG, 0)
    model = clip.CLIP(CFG)
    pixels = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    true = np.array([[1022, 5 + i, 1023, 0] for i in range(4)], np.int32)
    negatives = np.array([[1022, 50 + i, 1023, 0] for i in range(4)], np.int32)
    lengths = np.full(8, 3, np.int32)
    both = np.concatenate([true, negatives])
    plain, _ = clip_train.clip_loss(params, model, pixels, true, lengths[:4])
    masked, _ = clip_train.clip_loss(params, model, pixels, both, lengths,
                                     np.zeros(4, bool))
    np.testing.assert_allclose(masked, plain, rtol=1e-6)
    one, _ = clip_train.clip_loss(params, model, pixels, both, lengths,
                                  np.array([True, False, False, False]))
    every, _ = clip_train.clip_loss(params, model, pixels, both, lengths, np.ones(4, bool))
    assert plain < one < every  # each valid negative adds a competitor to its image's row


def test_class_swaps_name_every_other_class_in_each_introduced_object():
    caption = "a small red star above a large blue circle, then the red star again"
    swaps = shapes_language.class_swaps(caption)
    assert caption not in swaps and len(swaps) == 2 * (len(shapes.KINDS) - 1)
    assert "a small red circle above a large blue circle, then the red star again" in swaps
    assert "a small red star above a large blue hexagon, then the red star again" in swaps
    assert shapes_language.class_swaps("a plain gray background") == []


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
def test_the_temperature_is_clipped_after_the_update_and_keeps_its_gradient():
    # A cap inside the loss would give the scale no gradient above it: stuck for good.
    cap = clip_train.MAX_LOGIT_SCALE
    params = dict(clip.init_params(CFG, 0), logit_scale=np.float32(cap + 0.005))
    opt = clip_train.make_optimizer(1e-2, 0, 100, 0.1)
    step = clip_train.train_step(clip.CLIP(CFG), opt)
    pixels = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
    tokens = np.array([[1022, 5 + i, 1023, 0] for i in range(8)], np.int32)
    lengths = np.full(8, 3, np.int32)
    grad = jax.grad(lambda p: clip_train.clip_loss(p, clip.CLIP(CFG), pixels, tokens,
                                                   lengths)[0])(params)["logit_scale"]
    assert grad != 0
    params, _, _, _ = step(params, opt.init(params), pixels, tokens, lengths)
    assert float(params["logit_scale"]) <= cap


@pytest.mark.slow
def test_the_same_seed_trains_the_same_encoder_and_another_seed_another(tmp_path):
    """Two runs of seed 0 give the same encoder to the bit and the same losses; seed 1 (its
    initialization and its pair draws) another."""
    runs = {name: clip_train.train_retriever(str(tmp_path / name), CFG, steps=2, seed=seed,
                                             **_tiny_run_kw())
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    params = {name: jax.tree.leaves(DocumentEncoder.load(str(tmp_path / name / "encoder")).params)
              for name in runs}
    assert runs["a"]["history"] == runs["b"]["history"] != runs["c"]["history"]
    for x, y in zip(params["a"], params["b"]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(params["a"], params["c"]))
