"""Training the image tokenizer: the `train_image_tokenizer` run mode.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/train_image_tokenizer.gin \
        --gin.MODEL_DIR="'runs/vq_tiny'"

One step, data-parallel over the shared mesh of `model/partitioning.py` (images
split by the `batch` rule, weights replicated):

    images -> VQGAN -> reconstruction, codes
    generator loss = l1 * |x - x'| + l2 * (x - x')^2 + perceptual (pluggable, off)
                   + codebook * |sg(z) - e|^2 + commitment * |z - sg(e)|^2
                   + disc_weight * hinge_g(D(x'))            (from `disc_start` on)
    discriminator  = hinge_d(D(x), D(sg(x')))                 (from `disc_start` on)
    then: EMA of the weights (optional), running code usage, and every
    `restart_every` steps the dead codes move onto random encoder outputs.
    The generator's optimizer: AdamW, or Muon on the convolutions between hidden channels
    with AdamW on the rest (`optimizer_kind`; `muon_kernels`).

`streams` > 1 computes the generator's loss and gradients as `streams` independent
parts of the batch (rows i, i + streams, ...), averaged: the same loss and gradient up to
float rounding (every term is a mean over equal-sized parts), in independent ops that
XLA:CPU's executor runs on different cores at once. On 2 cores the tiny VQGAN's step
otherwise keeps 1.3 of them busy (its many small GroupNorm and swish fusions run one
at a time); 2 streams made it 1.3x faster (benchmarks/RESULTS_image_tokenizer.md).

Determinism: step s reads examples s*B .. s*B+B-1 of the image source and uses
rng fold_in(seed, s), so a resumed run (from MODEL_DIR/checkpoints) continues the
exact same run. Each checkpoint records the batch size and image size (a resume with
others would skip or repeat data: refused) and the learning-rate schedule's length (a
resume with another is warned about: bind `decay_steps` to extend a run in pieces). The
optimizer, the checkpointer (checksums, a save on SIGTERM,
corrupt checkpoints set aside) and the metrics writer are the decoder trainer's
(`train/optimizer.py`, `train/checkpoints.py`, `train/metrics.py`); the loss and the
model are this file's, and `vqgan_checkpoint.py` adds the items the tokenizer loads
(config + inference params) beside the training state. TensorBoard and
MODEL_DIR/metrics.jsonl: losses, PSNR, codebook usage, images/s, and a grid of
originals over reconstructions.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm3leon_jax import fs
from cm3leon_jax.errors import CheckpointMismatchError, UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.train import checkpoints, optimizer
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import step as step_lib
from cm3leon_jax.vocab import image_inputs, quantizer, vqgan_checkpoint
from cm3leon_jax.vocab.image_sources import ImageSource
from cm3leon_jax.vocab.image_tokenizer import images_to_model, model_to_images
from cm3leon_jax.vocab.patch_discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from cm3leon_jax.vocab.vqgan import VQGAN, VQGANConfig, init_key

log = logging.getLogger(__name__)

PerceptualLoss = Callable[[jax.Array, jax.Array], jax.Array]


@gin.configurable
class VQGANLossWeights:
    """Weights of the generator's loss terms (gin: `VQGANLossWeights.l1 = 1.0`).

    `perceptual` is a traceable function (images, reconstructions) -> scalar, both
    f32[b, h, w, 3] in [-1, 1], e.g. an LPIPS port with weights you supply; no
    perceptual weights can be downloaded here, so it is off by default.
    """

    def __init__(self, l1: float = 1.0, l2: float = 1.0, codebook: float = 1.0,
                 commitment: float = 0.25, perceptual: PerceptualLoss | None = None,
                 perceptual_weight: float = 0.0, disc: float = 0.1):
        self.l1, self.l2, self.codebook, self.commitment = l1, l2, codebook, commitment
        self.perceptual, self.perceptual_weight, self.disc = perceptual, perceptual_weight, disc


def psnr(images: jax.Array, recon: jax.Array) -> jax.Array:
    """Mean PSNR (dB) of uint8-range images; inputs f32 in [-1, 1], b leading."""
    a = (images + 1.0) * 127.5
    b = jnp.clip(jnp.round((recon + 1.0) * 127.5), 0, 255)
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, images.ndim)))
    return jnp.mean(10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10)))


def make_optimizer(learning_rate: float, warmup_steps: int, decay_steps: int, b1: float,
                   b2: float, weight_decay: float, grad_clip: float,
                   muon_params: Any = None) -> optax.GradientTransformation:
    """The shared builder (`train/optimizer.py`) with the tokenizer's settings: linear
    warm-up, cosine decay to 10% of the peak at `decay_steps`, AdamW behind global-norm
    clipping; with `muon_params` (the parameters, or their shapes) Muon steps the kernels
    `muon_kernels` names and AdamW the rest."""
    warmup = max(1, warmup_steps)
    schedule = optimizer.warmup_then_decay(learning_rate, warmup, "cosine",
                                           final_lr_fraction=0.1,
                                           total_steps=max(decay_steps, warmup_steps + 1))
    if muon_params is not None:  # (Decay, when > 0, skips norms and biases here.)
        return optimizer.muon_on(schedule, muon_kernels(muon_params), b1=b1, b2=b2,
                                 weight_decay=weight_decay, clip_norm=grad_clip)
    # Decay (when weight_decay > 0) on every weight, as taming's GAN trainer does.
    return optimizer.adamw(schedule, b1, b2, 1e-8, weight_decay, grad_clip, mask=None)


def muon_kernels(params: Any, image_channels: int = 3) -> Any:
    """Muon's matrices among the tokenizer's parameters: every convolution or dense kernel
    whose input and output both have more than `image_channels` channels, read as (its
    window and input channels) by (its output channels). The convolutions from and to
    the image's channels, the codebook, norms and biases stay with AdamW."""
    def dims(path, leaf):
        name = getattr(path[-1], "key", None)
        shape = getattr(leaf, "shape", ())
        if name != "kernel" or len(shape) < 2 or min(shape[-2:]) <= image_channels:
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(len(shape) - 1)),
                                                  output_axis=len(shape) - 1)
    return jax.tree_util.tree_map_with_path(dims, params)


class Trainer:
    """The pure pieces of training: state, one step, evaluation. No I/O."""

    def __init__(self, cfg: VQGANConfig, optimizer: optax.GradientTransformation,
                 weights: VQGANLossWeights, discriminator: nn.Module | None = None,
                 disc_optimizer: optax.GradientTransformation | None = None,
                 ema_decay: float | None = None, usage_decay: float = 0.99,
                 restart_every: int = 100, restart_threshold: float = 0.1, seed: int = 0,
                 streams: int = 1):
        if streams < 1:
            raise ValueError(f"streams={streams}: the batch splits into at least 1 part")
        self.cfg, self.model, self.opt, self.w = cfg, VQGAN(cfg), optimizer, weights
        self.streams = streams
        self.disc, self.disc_opt = discriminator, disc_optimizer
        self.ema_decay, self.usage_decay = ema_decay, usage_decay
        self.restart_every, self.restart_threshold = restart_every, restart_threshold
        self.seed = seed

    def init(self, rng: jax.Array) -> dict[str, Any]:
        x = jnp.zeros((1, self.cfg.image_size, self.cfg.image_size, self.cfg.in_channels))
        k_model, k_disc = jax.random.split(rng)
        params = self.model.init(k_model, x)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": self.opt.init(params),
                 # Usage starts at zero, so the first restart (step `restart_every`)
                 # already moves every code unused so far: with taming's tiny initial
                 # codebook most codes are never picked, and waiting for a uniform
                 # prior to decay would leave them dead for hundreds of steps.
                 "usage": jnp.zeros((self.cfg.codebook_size,), jnp.float32)}
        if self.disc is not None:
            dp = self.disc.init(k_disc, x)["params"]
            state.update(disc_params=dp, disc_opt_state=self.disc_opt.init(dp))
        if self.ema_decay is not None:
            state["ema_params"] = params
        return state

    def inference_params(self, state: dict[str, Any]) -> Any:
        return state.get("ema_params", state["params"])

    def _generator_loss(self, params, disc_params, images, use_disc: bool):
        recon, enc = self.model.apply({"params": params}, images)
        q = enc.quant
        l1 = jnp.mean(jnp.abs(recon - images))
        l2 = jnp.mean(jnp.square(recon - images))
        loss = (self.w.l1 * l1 + self.w.l2 * l2 + self.w.codebook * q.codebook_loss
                + self.w.commitment * q.commitment_loss)
        metrics = {"l1": l1, "l2": l2, "codebook_loss": q.codebook_loss,
                   "commitment_loss": q.commitment_loss, "psnr": psnr(images, recon)}
        if self.w.perceptual is not None and self.w.perceptual_weight:
            p = self.w.perceptual(images, recon)
            loss += self.w.perceptual_weight * p
            metrics["perceptual_loss"] = p
        if use_disc:
            g = hinge_g_loss(self.disc.apply({"params": disc_params}, recon))
            loss += self.w.disc * g
            metrics["g_loss"] = g
        metrics["loss"] = loss
        return loss, (metrics, q.codes, jax.lax.stop_gradient(q.latents), recon)

    def _batch_loss(self, params, disc_params, images, use_disc: bool):
        """`_generator_loss` of the batch, as the mean over `streams` interleaved parts.

        Part i holds rows i, i + streams, ...: with the batch sharded over devices in
        contiguous blocks, every part keeps an equal share on each device. Codes, latents
        and reconstructions come back in the batch's own order.
        """
        n = self.streams
        if n == 1:
            return self._generator_loss(params, disc_params, images, use_disc)
        outs = [self._generator_loss(params, disc_params, images[i::n], use_disc)
                for i in range(n)]
        loss = sum(o[0] for o in outs) / n
        metrics = jax.tree_util.tree_map(lambda *m: sum(m) / n, *(o[1][0] for o in outs))

        def interleave(parts):  # [b/n, ...] x n -> [b, ...], row j*n + i from part i
            stacked = jnp.stack(parts, axis=1)
            return stacked.reshape((-1,) + stacked.shape[2:])

        codes, latents, recon = (interleave([o[1][k] for o in outs]) for k in (1, 2, 3))
        return loss, (metrics, codes, latents, recon)

    def step(self, state: dict[str, Any], images_u8: jax.Array, use_disc: bool = False
             ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """One optimization step on uint8[b, s, s, 3]. `use_disc` is static (jit twice)."""
        images = images_to_model(images_u8)
        rng = jax.random.fold_in(init_key(self.seed), state["step"])
        if images.shape[0] % self.streams:
            raise ValueError(f"a batch of {images.shape[0]} images does not split into "
                             f"streams={self.streams} equal parts; pick a batch_size that "
                             "divides by it (times the number of devices)")
        grad_fn = jax.value_and_grad(self._batch_loss, has_aux=True)
        (_, (metrics, codes, latents, recon)), grads = grad_fn(
            state["params"], state.get("disc_params"), images, use_disc)
        latents = latents.reshape(-1, latents.shape[-1])
        updates, opt_state = self.opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=state["step"] + 1, opt_state=opt_state)

        usage = quantizer.update_usage(state["usage"], codes, self.usage_decay)
        if self.restart_every:
            emb, new_usage, n = quantizer.restart_dead_codes(
                params["quantize"]["embedding"], usage, latents, rng, self.restart_threshold)
            due = (state["step"] + 1) % self.restart_every == 0
            emb = jnp.where(due, emb, params["quantize"]["embedding"])
            usage = jnp.where(due, new_usage, usage)
            params = {**params, "quantize": {**params["quantize"], "embedding": emb}}
            metrics["codes_restarted"] = jnp.where(due, n, 0).astype(jnp.float32)
        new.update(params=params, usage=usage)

        if use_disc:
            def d_loss_fn(dp):
                real = self.disc.apply({"params": dp}, images)
                fake = self.disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
                return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))
            (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
                state["disc_params"])
            d_updates, d_opt = self.disc_opt.update(d_grads, state["disc_opt_state"],
                                                     state["disc_params"])
            new.update(disc_params=optax.apply_updates(state["disc_params"], d_updates),
                       disc_opt_state=d_opt)
            metrics.update(d_loss=d_loss, logits_real=lr_, logits_fake=lf_)
        elif self.disc is not None:
            # Same metric names before the discriminator starts, so that a logging
            # window spanning `disc_start` adds up like any other.
            zero = jnp.zeros((), jnp.float32)
            metrics.update(g_loss=zero, d_loss=zero, logits_real=zero, logits_fake=zero)

        if self.ema_decay is not None:
            d = self.ema_decay
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema_params"],
                                         params)
            # The codebook is not averaged: a restarted entry must move at once, and an
            # average of old and new entries matches neither the encoder nor the decoder.
            new["ema_params"] = {**ema, "quantize": params["quantize"]}
        metrics["code_counts"] = quantizer.code_histogram(codes, self.cfg.codebook_size)
        return new, metrics

    def evaluate(self, params: Any, images_u8: jax.Array) -> dict[str, jax.Array]:
        """PSNR, losses and code counts of a batch; also returns reconstructions."""
        images = images_to_model(images_u8)
        recon, enc = self.model.apply({"params": params}, images)
        return {"psnr": psnr(images, recon), "l1": jnp.mean(jnp.abs(recon - images)),
                "code_counts": quantizer.code_histogram(enc.quant.codes, self.cfg.codebook_size),
                "recon": model_to_images(recon)}


def _grid(originals: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Originals on the top row, reconstructions below: uint8[2h, n*w, 3]."""
    return np.concatenate([np.concatenate(list(originals), axis=1),
                           np.concatenate(list(recon), axis=1)], axis=0)


class RunRecord:
    """What each checkpoint records of the run beside its state, as the checkpointer's data
    item: the data layout (step s reads examples s*B.., so another batch size or image size
    would skip or repeat data; `layout_difference` makes the checkpointer refuse it) and the
    learning-rate schedule's length (`restore` reads it back, to warn when it changes)."""

    FILE = "run_record.json"

    def __init__(self, batch_size: int, image_size: int, decay_steps: int):
        self.layout = {"batch_size": batch_size, "image_size": image_size}
        self.decay_steps = decay_steps
        self.saved_decay_steps: int | None = None  # The restored checkpoint's, once read.

    def save(self, directory: str) -> None:
        if jax.process_index() == 0:
            fs.makedirs(directory)
            fs.write_json(fs.join(directory, self.FILE),
                          {**self.layout, "decay_steps": self.decay_steps})

    def layout_difference(self, directory: str) -> str | None:
        """How the layout saved under `directory` differs from this run's (None: it fits)."""
        if not fs.exists(fs.join(directory, self.FILE)):  # E.g. a decoder's data position.
            raise CheckpointMismatchError(
                f"{directory} holds no {self.FILE}: another kind of run wrote this checkpoint "
                "(a decoder's MODEL_DIR?). Give the image tokenizer its own MODEL_DIR; the "
                "checkpoints were left untouched.")
        saved = fs.read_json(fs.join(directory, self.FILE))
        diff = [f"{k} {saved[k]} in the checkpoint, {v} now" for k, v in self.layout.items()
                if saved.get(k, v) != v]
        return ", ".join(diff) or None

    def restore(self, directory: str) -> None:
        self.saved_decay_steps = fs.read_json(fs.join(directory, self.FILE)).get("decay_steps")

    def restart(self) -> None:
        self.saved_decay_steps = None


def load_batch(source: ImageSource, start: int, count: int, image_size: int) -> np.ndarray:
    """Examples start..start+count-1 as uint8[count, s, s, 3] (tokenizer input rules)."""
    return np.concatenate([image_inputs.to_rgb_uint8(source(i), image_size)
                           for i in range(start, start + count)])


@gin.configurable
def train_image_tokenizer(
    model_dir: str,
    config: VQGANConfig | None = None,
    image_source: ImageSource = gin.REQUIRED,
    eval_source: ImageSource = gin.REQUIRED,
    num_steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 2e-4,
    warmup_steps: int = 100,
    decay_steps: int | None = None,
    b1: float = 0.5,
    b2: float = 0.9,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    weights: VQGANLossWeights | None = None,
    optimizer_kind: str = "adamw",
    disc_start: int | None = None,
    discriminator: nn.Module | None = None,
    disc_learning_rate: float | None = None,
    ema_decay: float | None = None,
    usage_decay: float = 0.99,
    restart_every: int = 100,
    restart_threshold: float = 0.1,
    log_every: int = 50,
    eval_every: int = 500,
    eval_examples: int = 64,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 3,
    seed: int = 0,
    streams: int = 1,
    write_tensorboard: bool = True,
) -> dict[str, float]:
    """Trains a VQGAN tokenizer into MODEL_DIR; resumes if MODEL_DIR has checkpoints.

    Args:
      model_dir: where checkpoints (MODEL_DIR/checkpoints) and TensorBoard go.
      config: the network (default: `VQGANConfig()` as bound by the size gin file).
      image_source: `index -> uint8[h, w, 3]` (image_sources.py), e.g. the synthetic
        corpus' train split (`cm3leon_jax.data.synthetic.synthetic_images`).
      eval_source: held-out images for PSNR / usage (e.g. the synthetic test split).
      num_steps, batch_size: global batch, split over all devices (must divide).
      learning_rate, warmup_steps, b1, b2, weight_decay, grad_clip: AdamW with
        linear warm-up and cosine decay to 10%; b1 0.5 / b2 0.9 as in taming's GAN.
      decay_steps: where the cosine decay ends (None: num_steps); bind it to extend a run
        in pieces (N, then 2N steps) as a straight 2N; another one on resume warns.
      weights: loss weights (VQGANLossWeights, gin-configurable).
      optimizer_kind: "adamw", or "muon": Muon on the hidden convolutions (`muon_kernels`),
        AdamW on the rest, one learning rate; the discriminator keeps AdamW.
      disc_start, discriminator, disc_learning_rate: the step the PatchGAN discriminator
        joins at (None: never), its module (PatchDiscriminator()), its LR (learning_rate).
      ema_decay: keep an EMA of the weights (e.g. 0.999) and tokenize with it.
      usage_decay, restart_every, restart_threshold: every `restart_every` steps (0: never)
        the codes whose running usage is below `restart_threshold` x uniform restart.
      log_every, eval_every, checkpoint_every: intervals in steps; eval_examples: images of
        eval_source per evaluation (0: none). seed: initialization and restart randomness.
      streams: split each device's share of the batch into this many independent parts
        (see the module docstring): 2 on a CPU, 1 on an accelerator. The per-device
        batch must divide by it. write_tensorboard: False keeps TensorFlow out (tests).
    Returns: the final evaluation metrics (psnr, code_usage, perplexity, ...) and loss.
    """
    cfg = config or VQGANConfig()
    decay_steps = _schedule_length(num_steps, decay_steps, eval_examples)
    disc = (discriminator or PatchDiscriminator()) if disc_start is not None else None
    opt = functools.partial(make_optimizer, warmup_steps=warmup_steps, decay_steps=decay_steps,
                            b1=b1, b2=b2, weight_decay=weight_decay, grad_clip=grad_clip)
    disc_opt = opt(disc_learning_rate or learning_rate) if disc else None
    trainer = Trainer(cfg, opt(learning_rate, muon_params=_muon_params(cfg, optimizer_kind)),
                      weights or VQGANLossWeights(), disc, disc_opt, ema_decay, usage_decay,
                      restart_every, restart_threshold, seed, streams)
    run = _Run(model_dir, trainer, batch_size, disc_start, checkpoint_every, keep_checkpoints,
               write_tensorboard, decay_steps)
    run.writer.write_hparams({"image_size": cfg.image_size, "codebook_size": cfg.codebook_size,
                              "batch_size": batch_size, "learning_rate": learning_rate,
                              "optimizer_kind": optimizer_kind, "num_steps": num_steps})
    try:
        return run.train(image_source, num_steps, log_every, eval_every,
                         functools.partial(run.evaluate, eval_source, eval_examples))
    finally:
        run.close()


def param_shapes(cfg: VQGANConfig) -> Any:
    """The VQGAN's parameters as shapes only (what `make_optimizer`'s `muon_params` needs)."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels))
    return jax.eval_shape(VQGAN(cfg).init, init_key(0), images)["params"]


def _muon_params(cfg: VQGANConfig, optimizer_kind: str) -> Any:
    """`param_shapes` for Muon, None for AdamW; a UserInputError for any other kind."""
    if optimizer_kind not in ("adamw", "muon"):
        raise UserInputError(f"train_image_tokenizer.optimizer_kind={optimizer_kind!r}: choose "
                             "'adamw' or 'muon'.")
    return param_shapes(cfg) if optimizer_kind == "muon" else None


def _schedule_length(num_steps: int, decay_steps: int | None, eval_examples: int) -> int:
    """decay_steps, else num_steps; first a UserInputError for counts that
    `train_image_tokenizer` cannot use (before any work)."""
    if eval_examples < 0:
        raise UserInputError(f"train_image_tokenizer.eval_examples={eval_examples}: give the "
                             "number of images to evaluate on, or 0 for no evaluation.")
    if decay_steps is not None and decay_steps < 1:
        raise UserInputError(f"train_image_tokenizer.decay_steps={decay_steps}: give the step "
                             "at which the learning rate's decay ends (>= 1), or None for "
                             "num_steps.")
    return num_steps if decay_steps is None else decay_steps


class _Run:
    """One tokenizer training run: mesh, jitted steps, checkpoints, metrics, the loop."""

    def __init__(self, model_dir: str, trainer: Trainer, batch_size: int,
                 disc_start: int | None, checkpoint_every: int, keep_checkpoints: int,
                 write_tensorboard: bool, decay_steps: int):
        self.trainer, self.cfg, self.batch_size = trainer, trainer.cfg, batch_size
        self.disc_start = disc_start
        devices = jax.devices()
        if batch_size % (len(devices) * trainer.streams):
            raise UserInputError(f"batch_size={batch_size} does not split over {len(devices)} "
                                 f"devices times streams={trainer.streams}; use a multiple of "
                                 f"{len(devices) * trainer.streams}")
        # The shared mesh (model/partitioning.py): images split by the `batch` rule,
        # weights replicated (the tokenizer is small).
        self.mesh = partitioning.make_mesh(devices=devices)
        size = self.cfg.image_size
        self.data_sharding = step_lib.batch_sharding(self.mesh, (batch_size, size, size, 3))
        self.replicated = NamedSharding(self.mesh, P())
        self.steps = {flag: jax.jit(functools.partial(trainer.step, use_disc=flag),
                                    donate_argnums=0,
                                    out_shardings=(self.replicated, self.replicated))
                      for flag in ({False, True} if disc_start is not None else {False})}
        self.eval_step = jax.jit(trainer.evaluate)
        self.window = _Window()
        self.ckpt = vqgan_checkpoint.checkpointer(model_dir, save_every=checkpoint_every,
                                                  keep=keep_checkpoints)
        self.model_dir = model_dir
        self.record = RunRecord(batch_size, size, decay_steps)
        self.writer = metrics_lib.MetricsWriter(model_dir, tensorboard=write_tensorboard)

    def restore_or_init(self) -> tuple[dict[str, Any], int]:
        """(state, step): the newest checkpoint's, else a fresh initialization at step 0."""
        key = init_key(self.trainer.seed)
        abstract = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
            jax.eval_shape(self.trainer.init, key))
        record, state = self._restore(abstract)
        if state is None:
            return jax.jit(self.trainer.init, out_shardings=self.replicated)(key), 0
        start = int(state["step"])
        log.info("resumed from step %d of %s", start, self.ckpt.directory)
        saved = self.record.saved_decay_steps
        if record is not None and saved is not None and saved != self.record.decay_steps:
            log.warning("the checkpoint's learning rate decays until step %d, this run's until "
                        "step %d: the learning-rate schedule changes mid-run; set "
                        "decay_steps=%d to keep it.", saved, self.record.decay_steps, saved)
        return state, start

    def _restore(self, abstract: Any) -> tuple[RunRecord | None, dict[str, Any] | None]:
        """(the record checked, the newest readable checkpoint's state or None).

        A checkpoint written before runs kept a record resumes unchecked, also when it is
        the newest left once a corrupt one after it was set aside.
        """
        while True:
            record = self.record if self._newest_has_record() else None
            try:
                return record, self.ckpt.restore(abstract, record)
            except CheckpointMismatchError:
                if record is None or self._newest_has_record():
                    raise  # Not a fallback to an older checkpoint: as it was.

    def _newest_has_record(self) -> bool:
        steps = vqgan_checkpoint.steps(self.model_dir)
        return bool(steps) and fs.isdir(fs.join(
            vqgan_checkpoint.checkpoint_dir(self.model_dir), str(steps[-1]), "data"))

    def train(self, source: ImageSource, num_steps: int, log_every: int, eval_every: int,
              evaluate: Callable[[int, dict[str, Any]], dict[str, float]]) -> dict[str, Any]:
        """The loop: step, log, save, evaluate; then the final evaluation.

        Step s reads examples s*B .. s*B+B-1 of `source`, so a resumed run sees
        exactly the data the uninterrupted run would have. A preemption (SIGTERM) saves
        the step reached and returns {..., "preempted": True} without evaluating.
        """
        state, step = self.restore_or_init()
        last: dict[str, Any] = {}
        with checkpoints.PreemptionSignal() as preemption:
            while step < num_steps:
                x = jax.device_put(load_batch(source, step * self.batch_size, self.batch_size,
                                              self.cfg.image_size), self.data_sharding)
                use_disc = self.disc_start is not None and step >= self.disc_start
                state, metrics = self.steps[use_disc](state, x)
                self.window.add(metrics)
                step += 1
                if step % log_every == 0 or step == num_steps:
                    last = self.window.take(self.batch_size)
                    self.writer.write(step, last)
                preempted = preemption.reached(step)
                if preempted or step == num_steps or self.ckpt.due(step):
                    self.save(step, state, force=preempted or step == num_steps)
                if preempted:
                    log.warning("preempted: saved step %d; rerun the same command to resume.",
                                step)
                    return {**last, "preempted": True}
                if eval_every and step % eval_every == 0 and step != num_steps:
                    evaluate(step, state)
        return {**last, **evaluate(num_steps, state)}

    def save(self, step: int, state: dict[str, Any], force: bool) -> None:
        # Host copies: the state is replicated, and saving device arrays would make
        # orbax compile a slice per parameter shape (minutes on a small CPU).
        host = jax.device_get(state)
        self.ckpt.save(step, host, self.record, force=force, extras=vqgan_checkpoint.items(
            self.cfg, self.trainer.inference_params(host)))

    def evaluate(self, source: ImageSource, num_examples: int, step: int,
                 state: dict[str, Any]) -> dict[str, float]:
        """PSNR, L1 and codebook use over the first `num_examples` images of `source`
        ({} when `num_examples` is 0)."""
        if not num_examples:
            return {}
        params = self.trainer.inference_params(state)
        counts = np.zeros(self.cfg.codebook_size, np.float32)
        psnr_sum = l1_sum = 0.0
        first = None
        for start in range(0, num_examples, self.batch_size):
            n = min(self.batch_size, num_examples - start)
            x = load_batch(source, start, n, self.cfg.image_size)
            out = self.eval_step(params, x)
            counts = counts + np.asarray(out["code_counts"])
            psnr_sum += float(out["psnr"]) * n
            l1_sum += float(out["l1"]) * n
            if first is None:
                first = (x[:8], np.asarray(out["recon"])[:8])
        stats = {k: float(v) for k, v in quantizer.codebook_stats(counts).items()}
        result = {"eval/psnr": psnr_sum / num_examples, "eval/l1": l1_sum / num_examples,
                  "eval/code_usage": stats["used_fraction"],
                  "eval/perplexity": stats["perplexity"]}
        self.writer.write(step, result)
        self.writer.write_images(step, {"originals_over_reconstructions": _grid(*first)[None]})
        return result

    def close(self) -> None:
        self.ckpt.close()
        self.writer.flush()
        self.writer.close()


class _Window:
    """The metrics of the steps since the last log line, summed on the device."""

    def __init__(self):
        self._add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))
        self._sum: dict[str, jax.Array] = {}
        self._steps, self._start = 0, time.perf_counter()

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._sum = metrics if not self._sum else self._add(self._sum, metrics)
        self._steps += 1

    def take(self, batch_size: int) -> dict[str, float]:
        """Means over the window, codebook use and speed; starts a new window."""
        w = jax.device_get(self._sum)
        counts = w.pop("code_counts")
        restarted = w.pop("codes_restarted", 0.0)
        out = {f"train/{k}": float(v) / self._steps for k, v in w.items()}
        stats = quantizer.codebook_stats(counts)
        seconds = time.perf_counter() - self._start
        out.update({"train/code_usage": float(stats["used_fraction"]),
                    "train/perplexity": float(stats["perplexity"]),
                    "train/codes_restarted": float(restarted),
                    "train/steps_per_s": self._steps / seconds,
                    "train/images_per_s": self._steps * batch_size / seconds})
        self._sum, self._steps, self._start = {}, 0, time.perf_counter()
        return out
