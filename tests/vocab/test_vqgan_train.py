"""Training the tokenizer: steps reduce the loss, GAN/EMA/restarts work, checkpoints round-trip."""

import dataclasses
import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm3leon_jax.data.synthetic import synthetic_images
from cm3leon_jax.vocab import vqgan_checkpoint
from cm3leon_jax.vocab import vqgan_train as vt
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.patch_discriminator import PatchDiscriminator
from cm3leon_jax.vocab.vqgan import VQGANConfig, init_key

CFG = VQGANConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                  attn_levels=(), latent_channels=8, embed_dim=8, codebook_size=32, num_groups=4)
TRAIN_KW = dict(config=CFG, batch_size=8, learning_rate=3e-3, warmup_steps=1, log_every=1,
                eval_every=0, eval_examples=8, checkpoint_every=1000, write_tensorboard=False)


def _noise_source(index):
    # Smooth random images: cheap, and learnable by a tiny model within steps.
    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return np.kron(small, np.ones((4, 4, 1), np.uint8))


def test_steps_reduce_loss_with_gan_ema_perceptual_and_restarts():
    opt = vt.make_optimizer(3e-3, 1, 30, 0.5, 0.9, 0.0, 1.0)
    seen = []

    def perceptual(x, y):  # any traceable (images, reconstructions) -> scalar plugs in
        seen.append(x.shape)
        return jnp.mean(jnp.abs(x - y))

    weights = vt.VQGANLossWeights(perceptual=perceptual, perceptual_weight=0.1)
    tr = vt.Trainer(CFG, opt, weights, PatchDiscriminator(channels=8, num_layers=2, num_groups=4),
                    opt, ema_decay=0.9, restart_every=5, restart_threshold=0.99)
    state = jax.jit(tr.init)(init_key(0))
    step = jax.jit(lambda s, x: tr.step(s, x, use_disc=True))
    x = np.concatenate([_noise_source(i)[None] for i in range(8)])
    first_disc = state["disc_params"]
    history = []
    for i in range(20):
        before = state
        state, m = step(state, x)
        history.append({k: np.asarray(v) for k, v in m.items()})
        if i == 4:  # the first restart step: dead entries moved, live ones kept
            moved = np.any(np.asarray(before["params"]["quantize"]["embedding"])
                           != np.asarray(state["params"]["quantize"]["embedding"]), axis=-1)
            assert history[-1]["codes_restarted"] > 0
            assert moved.sum() >= history[-1]["codes_restarted"]
    l1 = [h["l1"] for h in history]
    assert np.mean(l1[-3:]) < 0.75 * np.mean(l1[:3]), l1
    assert all(np.isfinite(h["d_loss"]) and np.isfinite(h["g_loss"]) for h in history)
    assert "perceptual_loss" in history[0] and seen
    assert int(state["step"]) == 20
    # The discriminator trained; the EMA weights lag behind the live ones.
    d0 = jax.tree_util.tree_leaves(first_disc)[0]
    assert not np.allclose(d0, jax.tree_util.tree_leaves(state["disc_params"])[0])
    p = state["params"]["encoder"]["conv_in"]["kernel"]
    e = state["ema_params"]["encoder"]["conv_in"]["kernel"]
    assert not np.allclose(p, e)
    np.testing.assert_array_equal(state["ema_params"]["quantize"]["embedding"],
                                  state["params"]["quantize"]["embedding"])


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
def test_streams_give_the_same_step_and_reject_a_batch_that_does_not_split():
    # Two interleaved parts of the batch, averaged: the one-stream step's loss, metrics,
    # code counts and new weights, up to float rounding (restarts due at step 1 see the
    # latents in the batch's own order, so they pick the same ones).
    opt = vt.make_optimizer(3e-3, 1, 30, 0.5, 0.9, 0.0, 1.0)
    x = np.concatenate([_noise_source(i)[None] for i in range(8)])
    out = {}
    for n in (1, 2):
        tr = vt.Trainer(CFG, opt, vt.VQGANLossWeights(), restart_every=1, streams=n)
        state = jax.jit(tr.init)(init_key(0))
        out[n] = jax.jit(lambda s, b, tr=tr: tr.step(s, b))(state, x)
    (one, m1), (two, m2) = out[1], out[2]
    assert m2["codes_restarted"] == m1["codes_restarted"] > 0
    np.testing.assert_array_equal(m2["code_counts"], m1["code_counts"])
    for k in ("loss", "l1", "l2", "psnr", "codebook_loss", "commitment_loss"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           two["params"], one["params"])
    tr3 = vt.Trainer(CFG, opt, vt.VQGANLossWeights(), streams=3)
    with pytest.raises(ValueError, match="streams=3"):
        tr3.step(tr3.init(init_key(0)), x)
    with pytest.raises(ValueError, match="streams=0"):
        vt.Trainer(CFG, opt, vt.VQGANLossWeights(), streams=0)


def test_checkpoint_round_trip_sigterm_save_and_resume(tmp_path):
    # One scenario, two runs (each run compiles and evaluates): a SIGTERM mid-run saves the
    # step reached; the rerun resumes there instead of starting over, finishes and evaluates.
    model_dir = str(tmp_path / "vq")

    def preempting_source(index):
        if index == TRAIN_KW["batch_size"]:  # Loading step 2's batch: the job is told to stop.
            os.kill(os.getpid(), signal.SIGTERM)
        return _noise_source(index)

    r = vt.train_image_tokenizer(model_dir, image_source=preempting_source,
                                 eval_source=_noise_source, num_steps=3, **TRAIN_KW)
    assert r["preempted"] and vqgan_checkpoint.steps(model_dir) == [2]
    tok = ImageTokenizer.from_checkpoint(model_dir)
    assert tok.config == CFG
    params, cfg, step = vqgan_checkpoint.restore_params(model_dir)
    assert step == 2
    x = np.concatenate([_noise_source(i)[None] for i in range(3)])
    np.testing.assert_array_equal(tok.encode(x), ImageTokenizer(cfg, params).encode(x))

    r = vt.train_image_tokenizer(model_dir, image_source=_noise_source, eval_source=_noise_source,
                                 num_steps=3, **TRAIN_KW)
    assert "preempted" not in r and vqgan_checkpoint.steps(model_dir) == [2, 3]
    assert np.isfinite(r["eval/psnr"]) and 0 < r["eval/code_usage"] <= 1
    assert vqgan_checkpoint.restore_params(model_dir)[2] == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ImageTokenizer.from_checkpoint(str(tmp_path / "nothing_here"))


@pytest.mark.slow
def test_a_run_extended_in_pieces_ends_as_a_straight_one_and_tensorboard_has_images(tmp_path):
    # The discriminator joins inside a logging window (step 1 of the 0-1 window). The
    # schedule's length is bound (decay_steps), so 3 steps then 4 follow the 4-step
    # schedule: step 2's learning rate differs between a 3- and a 4-step cosine.
    kw = dict(TRAIN_KW, restart_every=2, disc_start=1, log_every=2, ema_decay=0.9,
              discriminator=PatchDiscriminator(channels=8, num_layers=2, num_groups=4),
              decay_steps=4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    src = synthetic_images(32, "train")
    vt.train_image_tokenizer(a, image_source=src, eval_source=src, num_steps=4,
                             **dict(kw, write_tensorboard=True))
    vt.train_image_tokenizer(b, image_source=src, eval_source=src, num_steps=3, **kw)
    vt.train_image_tokenizer(b, image_source=src, eval_source=src, num_steps=4, **kw)
    pa, _, _ = vqgan_checkpoint.restore_params(a)
    pb, _, _ = vqgan_checkpoint.restore_params(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)
    events = glob.glob(os.path.join(a, "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "originals_over_reconstructions" in tags["tensors"] + tags.get("images", [])
    assert "train/l1" in tags["tensors"] + tags.get("scalars", [])


def test_tokenizer_checkpoints_have_checksums_and_skip_a_corrupt_one(tmp_path, caplog):
    from cm3leon_jax.errors import UserInputError
    from cm3leon_jax.train import checkpoints
    from cm3leon_jax.vocab.chameleon_vqgan_weights import abstract_params

    rng = np.random.default_rng(0)
    trees = [jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    abstract_params(CFG)) for _ in range(2)]
    model_dir = str(tmp_path / "vq")
    vqgan_checkpoint.save_params(model_dir, 1, CFG, trees[0])
    vqgan_checkpoint.save_params(model_dir, 2, CFG, trees[1])
    newest = tmp_path / "vq" / "checkpoints" / "2"
    assert (newest / checkpoints.CHECKSUMS).exists() and not (newest / "state").exists()
    params, cfg, step = vqgan_checkpoint.restore_params(model_dir)
    assert (step, cfg) == (2, CFG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, trees[1])
    # Flipped bytes in the newest weights: the one before is used, with a warning.
    biggest = max((p for p in (newest / "params").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    params, _, step = vqgan_checkpoint.restore_params(model_dir)
    assert step == 1 and "unreadable" in caplog.text
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, trees[0])
    with pytest.raises(UserInputError, match="step 2 .* unreadable .*checksum"):
        vqgan_checkpoint.restore_params(model_dir, step=2)


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
def test_a_resume_refuses_another_data_layout_and_warns_of_another_schedule(tmp_path, caplog):
    # Step s reads examples s*B..: another batch or image size would skip or repeat data.
    from cm3leon_jax.errors import CheckpointMismatchError, UserInputError
    from cm3leon_jax.train import checkpoints

    model_dir = str(tmp_path / "vq")
    kw = dict(TRAIN_KW, image_source=_noise_source, eval_source=_noise_source,
              eval_examples=0)  # 0: no evaluation, only the training metrics come back.
    r = vt.train_image_tokenizer(model_dir, num_steps=1, **kw)
    assert "train/loss" in r and not any(k.startswith("eval/") for k in r)
    folder = tmp_path / "vq" / "checkpoints" / "1"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for change, message in (
            (dict(batch_size=16), "batch_size 8 in the checkpoint, 16 now"),
            (dict(config=dataclasses.replace(CFG, image_size=32)),
             "image_size 16 in the checkpoint, 32 now")):
        with pytest.raises(CheckpointMismatchError, match=f"{message}.*another MODEL_DIR"):
            vt.train_image_tokenizer(model_dir, num_steps=2, **dict(kw, **change))
    assert vqgan_checkpoint.steps(model_dir) == [1]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    # Extending the run without binding decay_steps stretches its schedule: said so.
    caplog.set_level("WARNING")
    vt.train_image_tokenizer(model_dir, num_steps=2, **kw)
    assert "schedule changes mid-run; set decay_steps=1 to keep it" in caplog.text
    # A checkpoint written before runs kept a record still resumes (unchecked).
    old = tmp_path / "vq" / "checkpoints" / "2"
    for p in sorted((old / "data").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (old / "data").rmdir()
    (old / checkpoints.CHECKSUMS).unlink()  # Recorded anew for the edited files.
    checkpoints.write_checksums(checkpoints.orbax_path(str(old)))
    vt.train_image_tokenizer(model_dir, num_steps=3, **dict(kw, decay_steps=2))
    assert vqgan_checkpoint.steps(model_dir) == [1, 2, 3]
    assert (tmp_path / "vq" / "checkpoints" / "3" / "data" / vt.RunRecord.FILE).exists()
    # The newest (with a record) corrupt: set aside, and the run resumes from the one before,
    # though that one has no record.
    newest = tmp_path / "vq" / "checkpoints" / "3"
    biggest = max((p for p in (newest / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    old_files = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    caplog.set_level("INFO", logger=vt.log.name)
    vt.train_image_tokenizer(model_dir, num_steps=3, **dict(kw, decay_steps=2))
    assert "resumed from step 2" in caplog.text
    assert sorted(p.name for p in newest.parent.iterdir()) == ["1", "2", "3", "corrupt.3"]
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == old_files
    assert (newest / "data" / vt.RunRecord.FILE).exists()
    with pytest.raises(UserInputError, match="eval_examples=-1"):
        vt.train_image_tokenizer(model_dir, num_steps=3, **dict(kw, eval_examples=-1))


@pytest.mark.slow
def test_the_same_seed_trains_the_same_tokenizer_and_another_seed_another(tmp_path):
    """Everything deterministic given a seed, and the seed used: two runs of seed 0 agree to
    the bit, seed 1 differs (an ignored seed would pass the first half alone)."""
    params = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        vt.train_image_tokenizer(str(tmp_path / name), image_source=_noise_source,
                                 eval_source=_noise_source, num_steps=2, seed=seed, **TRAIN_KW)
        params[name] = jax.tree.leaves(vqgan_checkpoint.restore_params(str(tmp_path / name))[0])
    for x, y in zip(params["a"], params["b"]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(params["a"], params["c"]))


def test_muon_steps_the_hidden_convolutions_and_adamw_the_rest():
    x = np.concatenate([_noise_source(i)[None] for i in range(8)])
    params = vt.param_shapes(CFG)
    dims = vt.muon_kernels(params)
    is_dims = lambda d: d is None or hasattr(d, "reduction_axis")  # noqa: E731
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): d for path, d in
            jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_dims)[0]}
    # The image's own convolutions, the codebook, norms and biases stay with AdamW.
    for name in ("encoder/conv_in/kernel", "decoder/conv_out/kernel",
                 "quantize/embedding", "encoder/down_0_block_0/conv1/bias",
                 "encoder/down_0_block_0/norm1/scale"):
        assert flat[name] is None, name
    conv = flat["encoder/down_0_block_0/conv1/kernel"]  # [3, 3, 8, 8]: 72 rows by 8 columns
    assert conv.reduction_axis == (0, 1, 2) and conv.output_axis == 3
    assert flat["decoder/up_1_upsample/kernel"] is not None
    # Muon trains the tokenizer as AdamW does.
    opt = vt.make_optimizer(3e-3, 1, 30, 0.5, 0.9, 0.0, 1.0, muon_params=params)
    tr = vt.Trainer(CFG, opt, vt.VQGANLossWeights(), restart_every=5)
    state = jax.jit(tr.init)(init_key(0))
    is_muon = lambda s: isinstance(s, optax.contrib.MuonState)  # noqa: E731
    # Muon's own state, not AdamW's alone.
    assert any(map(is_muon, jax.tree.leaves(state["opt_state"], is_leaf=is_muon)))
    step = jax.jit(lambda s, b: tr.step(s, b, use_disc=False))
    l1 = []
    for _ in range(15):
        state, m = step(state, x)
        l1.append(float(m["l1"]))
    assert np.mean(l1[-3:]) < 0.75 * np.mean(l1[:3]), l1


def test_a_resume_refuses_another_optimizer_and_an_unknown_one(tmp_path):
    from cm3leon_jax.errors import CheckpointMismatchError, UserInputError
    model_dir = str(tmp_path / "vq")
    kw = dict(TRAIN_KW, image_source=_noise_source, eval_source=_noise_source, eval_examples=0)
    with pytest.raises(UserInputError, match="optimizer_kind='sgd'.*'adamw' or 'muon'"):
        vt.train_image_tokenizer(model_dir, num_steps=1, optimizer_kind="sgd", **kw)
    vt.train_image_tokenizer(model_dir, num_steps=1, **kw)
    # Another optimizer's state does not fit the checkpoint's: refused, nothing touched.
    with pytest.raises(CheckpointMismatchError, match="does not fit this run's config: "
                       "opt_state.*another MODEL_DIR.*left untouched"):
        vt.train_image_tokenizer(model_dir, num_steps=2, optimizer_kind="muon", **kw)
    assert vqgan_checkpoint.steps(model_dir) == [1]
    vt.train_image_tokenizer(str(tmp_path / "m"), num_steps=2, optimizer_kind="muon", **kw)
    assert vqgan_checkpoint.steps(str(tmp_path / "m")) == [2]
