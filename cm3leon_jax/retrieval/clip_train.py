"""The `train_retriever` run mode: contrastive training of a CLIP on image-caption pairs.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/train_retriever.gin \
        --gin.MODEL_DIR="'runs/clip_tiny'"

Pairs come from the caller (`train_pairs`, `test_pairs`: images and their captions);
the run file binds `data/synthetic.py`'s `synthetic_pairs`, the tokenized corpus's
own scenes (same seeding, no TensorFlow), so the encoder sees what the bank holds. Each step
pairs every image of the batch with one of its four captions at random and
minimizes the symmetric InfoNCE loss of CLIP (learnable temperature, clipped to at
most 100 after each update as in CLIP).

Checkpoints go to `MODEL_DIR/checkpoints/` through the decoder trainer's checkpointer
(`train/checkpoints.py`: checksums, a save on SIGTERM, corrupt ones set aside): the
weights, the optimizer state and the loop's random draws, so rerunning the same command
resumes where the run stopped and ends exactly as an uninterrupted run. The draws' record
also keeps the batch size (a resume with another is refused: it would change the draws)
and the learning-rate schedule's length (a resume with another is warned about: bind
`decay_steps` to extend a run in pieces).

Writes `MODEL_DIR/encoder/` (a HF-layout CLIP checkpoint + tokenizer, loadable by
`DocumentEncoder.load` and by `transformers.CLIPModel`) and
`MODEL_DIR/retriever_metrics.json`: text->image and image->text recall@1/5 on the
test split (each of the 4 captions of a test image is a query; an image-to-text
hit is any of its own captions).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder, preprocess_images
from cm3leon_jax.train import checkpoints, optimizer
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import step as step_lib

MAX_LOGIT_SCALE = float(np.log(100.0))
Pairs = tuple[np.ndarray, list[list[str]]]  # uint8[n, s, s, 3] images, captions per image


def bucketed_tokens(token_lists, context: int, bucket: int = 8):
    """Pads to the batch's longest list rounded up to `bucket` (few shapes, little waste)."""
    longest = min(context, max(len(t) for t in token_lists))
    width = min(context, -(-longest // bucket) * bucket)
    tokens, lengths = clip_tokenizer.batch_tokens(token_lists, context)
    return tokens[:, :width], lengths


def clip_loss(params, model: clip.CLIP, pixels, tokens, lengths, negatives_valid=None):
    """CLIP's symmetric InfoNCE loss and the image -> text in-batch accuracy. With
    `negatives_valid` (bool[b]), `tokens` holds 2b captions: the b true ones, then one
    hard negative per image (a caption of the image changed in one detail), which every
    image's row of the image -> text softmax also competes against where valid (NegCLIP's
    hard negatives, Yuksekgonul et al. 2023); the text -> image direction reads the true
    captions only."""
    img, txt, scale = model.apply({"params": params}, pixels, tokens, lengths)
    logits = jnp.exp(scale) * img @ txt.T  # `train_step` keeps scale <= MAX_LOGIT_SCALE.
    b = img.shape[0]
    labels = jnp.arange(b)
    if negatives_valid is not None:
        valid = jnp.concatenate([jnp.ones([b], bool), negatives_valid])
        logits = jnp.where(valid[None, :], logits, -1e9)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits[:, :b].T, labels).mean()) / 2
    return loss, (logits.argmax(1) == labels).mean()


def recall_at(sims: np.ndarray, relevant: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """sims f32[q, c], relevant bool[q, c] -> {k: fraction of queries with a hit in top k}."""
    top = np.argsort(-sims, axis=1)[:, :max(ks)]
    hits = np.take_along_axis(relevant, top, axis=1)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def evaluate(encoder: DocumentEncoder, images: np.ndarray, captions: list[list[str]]) -> dict:
    """Text->image and image->text recall@1/5 over a split's images and all their captions."""
    img = encoder.embed_images(images)
    texts = [c for caps in captions for c in caps]
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    txt = encoder.embed_texts(texts)
    t2i = recall_at(txt @ img.T, owner[:, None] == np.arange(len(images))[None])
    i2t = recall_at(img @ txt.T, np.arange(len(images))[:, None] == owner[None])
    return {"text_to_image_recall@1": t2i[1], "text_to_image_recall@5": t2i[5],
            "image_to_text_recall@1": i2t[1], "image_to_text_recall@5": i2t[5],
            "num_images": len(images), "num_captions": len(texts)}


def _decay_mask(params):
    """No weight decay on LayerNorm scales, biases, embeddings of positions or the temperature."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "position" not in jax.tree_util.keystr(path), params)


def make_optimizer(learning_rate: float, warmup_steps: int, decay_steps: int,
                   weight_decay: float) -> optax.GradientTransformation:
    """The shared builder (`train/optimizer.py`) with CLIP's settings: linear warm-up,
    cosine decay to 0 at `decay_steps`, AdamW(0.9, 0.98, eps 1e-6) behind global-norm
    clipping at 1."""
    schedule = optimizer.warmup_then_decay(learning_rate, warmup_steps, "cosine",
                                           final_lr_fraction=0.0, total_steps=decay_steps)
    return optimizer.adamw(schedule, 0.9, 0.98, 1e-6, weight_decay, 1.0, mask=_decay_mask)


@gin.configurable
def train_retriever(model_dir: str, clip_cfg: clip.ClipConfig | None = None, *,
                    train_pairs: Pairs = gin.REQUIRED, test_pairs: Pairs = gin.REQUIRED,
                    steps: int = 800, batch_size: int = 128, learning_rate: float = 1e-3,
                    warmup_steps: int = 50, decay_steps: int | None = None,
                    weight_decay: float = 0.1, seed: int = 0, log_every: int = 50,
                    checkpoint_every: int = 200, keep_checkpoints: int = 2,
                    write_tensorboard: bool = True, mirror: bool = False,
                    hard_negatives: Callable[[str], Sequence[str]] | None = None) -> dict:
    """Trains, evaluates and saves the encoder; returns the test metrics.

    train_pairs, test_pairs: (uint8[n, s, s, 3] images, a list of captions per image),
    e.g. `synthetic_pairs("train", 10_000, 64)`; at least 4 captions per train image.
    decay_steps: the step at which the cosine decay of the learning rate ends (None:
    `steps`). Bind it to extend a run in pieces (steps N, then 2N into the same MODEL_DIR)
    and end as a straight run would; a resume whose schedule length differs from the
    checkpoint's logs a warning. A resume with another batch_size is refused.
    Loss and in-batch accuracy go to MODEL_DIR/metrics.jsonl (and TensorBoard unless
    `write_tensorboard=False`) every `log_every` steps. A checkpoint is saved every
    `checkpoint_every` steps (the last `keep_checkpoints` kept), at the end, and on
    SIGTERM; a run that finds one resumes from it. A preempted run returns
    {"preempted": True, "step": ...} without evaluating. `mirror`: each pair mirrored
    left to right with probability 1/2, "left" and "right" swapped in its caption (every
    shape of the built-in corpus is its own mirror image). `hard_negatives`: caption ->
    captions that must not match its image (the same caption with one detail changed, e.g.
    `shapes_language.class_swaps` for the built-in corpus, which puts another class in one
    object's place); each image's row of the loss also competes against one of its
    caption's, drawn each step (`clip_loss`). None: in-batch negatives alone, as CLIP.
    """
    logging.set_verbosity(logging.INFO)
    decay = steps if decay_steps is None else decay_steps
    name = "steps" if decay_steps is None else "decay_steps"
    if not 0 <= warmup_steps < decay or steps < 1:
        raise UserInputError(f"train_retriever.warmup_steps={warmup_steps} must be in [0, {name}="
                             f"{decay}) and steps={steps} at least 1; lower it, or train for "
                             "more steps.")
    cfg = clip_cfg or clip.ClipConfig.tiny()
    tokenizer = clip_tokenizer.WordTokenizer(cfg.vocab_size)
    _check_pairs("train_pairs", train_pairs)
    _check_pairs("test_pairs", test_pairs)
    images, captions = train_pairs
    if len(images) < batch_size or min(len(c) for c in captions) < 4:
        raise UserInputError(f"train_retriever.train_pairs: {len(images)} images (need >= "
                             f"batch_size={batch_size}), each with at least 4 captions; pass more "
                             "pairs.")
    if images.shape[1] != cfg.image_size:
        logging.warning("corpus images are %dpx and the encoder reads %dpx: they are resized.",
                        images.shape[1], cfg.image_size)
    tokens, mirrored, negatives = caption_tokens(tokenizer, captions, mirror, hard_negatives)
    writer = metrics_lib.MetricsWriter(model_dir, tensorboard=write_tensorboard)
    ckpt = checkpoints.Checkpointer(fs.join(model_dir, "checkpoints"),
                                    save_every=checkpoint_every, keep=keep_checkpoints)
    t0 = time.time()
    try:
        params, history, reached = _fit(cfg, images, tokens, make_optimizer(
            learning_rate, warmup_steps, decay, weight_decay), steps, batch_size, seed,
            log_every, writer, ckpt, mirrored, decay, negatives)
    finally:
        ckpt.close()
        writer.close()
    if params is None:
        return {"preempted": True, "step": reached}
    train_seconds = time.time() - t0

    encoder = DocumentEncoder(cfg, params, tokenizer)
    encoder.save(os.path.join(model_dir, "encoder"))
    metrics = evaluate(encoder, *test_pairs)
    metrics.update({"train_seconds": round(train_seconds, 1), "steps": steps,
                    "batch_size": batch_size, "final_loss": history[-1]["loss"],
                    "history": history})
    with fs.open(os.path.join(model_dir, "retriever_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logging.info("test recall: %s", {k: v for k, v in metrics.items() if "recall" in k})
    return metrics


def caption_tokens(tokenizer: Any, captions: list[list[str]], mirror: bool,
                   hard_negatives: Callable[[str], Sequence[str]] | None):
    """(tokens, mirrored, negatives) of every caption of every image: its tokens; with
    `mirror`, those of its mirror image's caption (else None); with `hard_negatives`, the
    tokens of each caption's hard negatives and, with `mirror`, of its mirrored caption's
    (`pair_batch`'s `negatives`; else None)."""
    tokens = [[tokenizer.encode(c) for c in caps] for caps in captions]
    mirrored = ([[tokenizer.encode(mirror_caption(c)) for c in caps] for caps in captions]
                if mirror else None)
    if hard_negatives is None:
        return tokens, mirrored, None

    def pools(transform):
        return [[[tokenizer.encode(n) for n in hard_negatives(transform(c))] for c in caps]
                for caps in captions]
    return tokens, mirrored, (pools(lambda c: c), pools(mirror_caption) if mirror else None)


def _check_pairs(name: str, pairs: Pairs) -> None:
    """UserInputError unless `pairs` holds one list of captions per image."""
    images, captions = pairs
    if len(images) != len(captions):
        raise UserInputError(f"train_retriever.{name} holds {len(images)} images but "
                             f"{len(captions)} caption lists; give one list of captions per "
                             "image, in the images' order.")


_SIDES = {"left": "right", "right": "left"}


def mirror_caption(caption: str) -> str:
    """The caption of the image mirrored left to right: "left" and "right" swapped."""
    return re.sub(r"\b(left|right)\b", lambda m: _SIDES[m.group(1)], caption)


class PairDraws:
    """The loop's random draws (which images, which of their captions) and the history
    logged so far: the data position a checkpoint keeps beside the weights (saved and
    restored by the checkpointer's `DataIteratorHandler`). It also records the batch size
    (`layout_difference`: the checkpointer refuses a resume with another, whose draws
    would differ) and the learning-rate schedule's length (`saved_decay_steps` once
    restored; None from a checkpoint written before it was recorded)."""

    FILE = "pair_draws.json"

    def __init__(self, seed: int, history: list[dict] | None = None,
                 batch_size: int | None = None, decay_steps: int | None = None):
        self._seed, self.rng = seed, np.random.default_rng(seed)
        self.history = list(history or [])
        self.batch_size, self.decay_steps = batch_size, decay_steps
        self.saved_decay_steps: int | None = None

    def draw(self, num_images: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices int[b], caption choices int[b] in [0, 4))."""
        idx = self.rng.choice(num_images, size=batch_size, replace=False)
        return idx, self.rng.integers(0, 4, size=batch_size)

    def snapshot(self) -> "PairDraws":
        """A copy frozen now (an asynchronous save may write it after training goes on)."""
        copy = PairDraws(0, self.history, self.batch_size, self.decay_steps)
        copy.rng.bit_generator.state = self.rng.bit_generator.state
        return copy

    def save(self, directory: str) -> None:
        if jax.process_index() == 0:
            fs.makedirs(directory)
            fs.write_json(fs.join(directory, self.FILE), {
                "bit_generator": self.rng.bit_generator.state, "history": self.history,
                "batch_size": self.batch_size, "decay_steps": self.decay_steps})

    def layout_difference(self, directory: str) -> str | None:
        """How the batch size saved under `directory` differs from this run's (None: it
        fits, or the checkpoint predates the record)."""
        saved = fs.read_json(fs.join(directory, self.FILE)).get("batch_size")
        if saved is None or saved == self.batch_size:
            return None
        return f"batch_size {saved} in the checkpoint, {self.batch_size} now"

    def restore(self, directory: str) -> None:
        saved = fs.read_json(fs.join(directory, self.FILE))
        self.rng.bit_generator.state = saved["bit_generator"]
        self.history = saved["history"]
        self.saved_decay_steps = saved.get("decay_steps")

    def restart(self) -> None:
        """Back to before `restore` (the checkpointer calls it after a failed read)."""
        self.__init__(self._seed, None, self.batch_size, self.decay_steps)


def pair_batch(draws: PairDraws, images: np.ndarray, tokens: list[list[list[int]]],
               mirrored: list[list[list[int]]] | None, batch_size: int,
               negatives: tuple[list, list | None] | None = None
               ) -> tuple[np.ndarray, list]:
    """One step's pairs: `batch_size` images (uint8[b, s, s, 3]) and one caption's tokens
    each, drawn by `draws`; with `mirrored` (the captions' tokens, left and right
    swapped), each pair is mirrored left to right with probability 1/2. With `negatives`
    (the hard negatives' tokens of every caption, as `tokens`, and of every mirrored
    caption, as `mirrored`, each a list per caption), b more entries follow the b
    captions: one of each drawn caption's hard negatives, None where it has none."""
    idx, which = draws.draw(len(images), batch_size)
    batch = images[idx]
    flip = np.zeros(batch_size, bool)
    if mirrored is not None:
        flip = draws.rng.random(batch_size) < 0.5
        batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
    chosen = [(mirrored if f else tokens)[j][w] for j, w, f in zip(idx, which, flip)]
    if negatives is None:
        return batch, chosen
    pools = [negatives[int(f)][j][w] for j, w, f in zip(idx, which, flip)]
    return batch, chosen + [pool[draws.rng.integers(len(pool))] if pool else None
                            for pool in pools]


def train_step(model: clip.CLIP, opt: optax.GradientTransformation) -> Callable:
    """The jitted step: (params, opt_state, pixels, tokens, lengths[, negatives_valid]) ->
    (params, opt_state, loss, in-batch accuracy) (`clip_loss`). The log-temperature is
    clipped to MAX_LOGIT_SCALE after the update, as CLIP does: a cap inside the loss would
    leave it stuck above the cap (no gradient there)."""

    @jax.jit
    def step(params, opt_state, pixels, tokens, lengths, negatives_valid=None):
        (loss, acc), grads = jax.value_and_grad(clip_loss, has_aux=True)(
            params, model, pixels, tokens, lengths, negatives_valid)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)}
        return params, opt_state, loss, acc

    return step


def _fit(cfg: clip.ClipConfig, images: np.ndarray, tokens: list[list[list[int]]],
         opt: optax.GradientTransformation, steps: int, batch_size: int, seed: int,
         log_every: int, writer: metrics_lib.MetricsWriter, ckpt: checkpoints.Checkpointer,
         mirrored: list[list[list[int]]] | None = None, decay_steps: int | None = None,
         negatives: tuple[list, list | None] | None = None) -> tuple[Any, list[dict], int]:
    """The loop: each step pairs `batch_size` random images with one caption each
    (`mirrored`: the captions' tokens with left and right swapped; then each pair is
    mirrored with probability 1/2; `negatives`: hard negatives, `pair_batch`'s).
    `decay_steps`: the schedule's length `opt` was built with, recorded with each
    checkpoint (None: `steps`).

    Data-parallel on the shared mesh (`model/partitioning.py`): the batch is split by
    the `batch` rule, the weights replicated. Starts from `ckpt`'s newest checkpoint when
    there is one. Returns (host params, logged history, last step); params None if
preempted.
    """
    model = clip.CLIP(cfg)
    mesh = partitioning.make_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(clip.init_params(cfg, seed), replicated)
    state = {"step": np.int32(0), "params": params, "opt_state": opt.init(params)}
    decay_steps = steps if decay_steps is None else decay_steps
    draws = PairDraws(seed, batch_size=batch_size, decay_steps=decay_steps)
    restored = ckpt.restore(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), state), draws)
    if restored and draws.saved_decay_steps not in (None, decay_steps):
        logging.warning("the checkpoint's learning rate decays until step %d, this run's until "
                        "step %d: the learning-rate schedule changes mid-run; set "
                        "decay_steps=%d to keep it.", draws.saved_decay_steps, decay_steps,
                        draws.saved_decay_steps)
    state = restored or state
    start = int(state["step"])
    params, opt_state = state["params"], state["opt_state"]

    step = train_step(model, opt)

    def rows(x: np.ndarray) -> jax.Array:
        return jax.device_put(x, step_lib.batch_sharding(mesh, x.shape))

    t0 = time.time()
    with checkpoints.PreemptionSignal() as preemption:
        for i in range(start + 1, steps + 1):
            batch, chosen = pair_batch(draws, images, tokens, mirrored, batch_size, negatives)
            valid = None
            if negatives is not None:  # A caption with no hard negative: a masked column.
                valid = np.array([n is not None for n in chosen[batch_size:]])
                chosen = chosen[:batch_size] + [n if n is not None else chosen[i] for i, n
                                                in enumerate(chosen[batch_size:])]
            toks, lengths = bucketed_tokens(chosen, cfg.context_length)
            pixels = preprocess_images(batch, cfg.image_size)
            params, opt_state, loss, acc = step(
                params, opt_state, rows(pixels), rows(toks), rows(lengths),
                None if valid is None else rows(valid))
            if i % log_every == 0 or i == steps:
                values = {"loss": float(loss), "batch_accuracy": float(acc)}
                draws.history.append({"step": i, **values})
                writer.write(i, {**values, "seconds_per_step": (time.time() - t0) / (i - start)})
            preempted = preemption.reached(i)
            if preempted or i == steps or ckpt.due(i):
                # Host copies: orbax would compile a slice per shape of device arrays.
                host = jax.device_get({"step": np.int32(i), "params": params,
                                       "opt_state": opt_state})
                ckpt.save(i, host, draws.snapshot(), force=preempted or i == steps)
            if preempted:
                logging.warning("preempted: saved step %d; rerun the same command to resume.", i)
                return None, draws.history, i
    return jax.device_get(params), draws.history, steps
