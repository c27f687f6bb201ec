"""The `train_retriever` run mode: contrastive training of the tiny CLIP on the built-in corpus.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/train_retriever.gin \
        --gin.MODEL_DIR="'runs/clip_tiny'"

Scenes come straight from `cm3leon_jax.data.shapes` with the corpus's own
per-example seeding (`example_rng(seed, split, index)`), so the encoder sees the
same images and captions as the tokenized corpus, without TensorFlow. Each step
pairs every image of the batch with one of its four captions at random and
minimises the symmetric InfoNCE loss of CLIP (learnable temperature, capped at
100 as in CLIP).

Writes `MODEL_DIR/encoder/` (a HF-layout CLIP checkpoint + tokenizer, loadable by
`DocumentEncoder.load` and by `transformers.CLIPModel`) and
`MODEL_DIR/retriever_metrics.json`: text->image and image->text recall@1/5 on the
test split (each of the 4 captions of a test image is a query; an image-to-text
hit is any of its own captions).
"""

from __future__ import annotations

import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.data import shapes, shapes_tasks
from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder, preprocess_images

MAX_LOGIT_SCALE = float(np.log(100.0))


def synthetic_pairs(split: str, num: int, image_size: int, seed: int = 0
                    ) -> tuple[np.ndarray, list[list[str]]]:
    """(uint8[num, s, s, 3] images, 4 captions each) of the built-in corpus's `split`."""
    images = np.empty((num, image_size, image_size, 3), np.uint8)
    captions = []
    for i in range(num):
        rng = shapes.example_rng(seed, split, i)
        scene = shapes.sample_scene(rng, image_size)
        images[i] = shapes.render(scene)
        captions.append(shapes_tasks.captions(scene, rng))
    return images, captions


def bucketed_tokens(token_lists, context: int, bucket: int = 8):
    """Pads to the batch's longest list rounded up to `bucket` (few shapes, little waste)."""
    longest = min(context, max(len(t) for t in token_lists))
    width = min(context, -(-longest // bucket) * bucket)
    tokens, lengths = clip_tokenizer.batch_tokens(token_lists, context)
    return tokens[:, :width], lengths


def clip_loss(params, model: clip.CLIP, pixels, tokens, lengths):
    img, txt, scale = model.apply({"params": params}, pixels, tokens, lengths)
    logits = jnp.exp(jnp.minimum(scale, MAX_LOGIT_SCALE)) * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
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


@gin.configurable
def train_retriever(model_dir: str, clip_cfg: clip.ClipConfig | None = None,
                    steps: int = 800, batch_size: int = 128, learning_rate: float = 1e-3,
                    warmup_steps: int = 50, weight_decay: float = 0.1,
                    num_train: int = 10_000, num_test: int = 500, image_size: int = 64,
                    corpus_seed: int = 0, seed: int = 0, log_every: int = 50) -> dict:
    """Trains, evaluates and saves the encoder; returns the test metrics."""
    logging.set_verbosity(logging.INFO)
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"train_retriever.warmup_steps={warmup_steps} must be in [0, steps="
                         f"{steps}); lower it, or train for more steps.")
    cfg = clip_cfg or clip.ClipConfig.tiny()
    tokenizer = clip_tokenizer.WordTokenizer(cfg.vocab_size)
    if cfg.image_size != image_size:
        logging.warning("corpus images are %dpx and the encoder reads %dpx: they are resized.",
                        image_size, cfg.image_size)
    start = time.time()
    images, captions = synthetic_pairs("train", num_train, image_size, corpus_seed)
    test_images, test_captions = synthetic_pairs("test", num_test, image_size, corpus_seed)
    token_cache = [[tokenizer.encode(c) for c in caps] for caps in captions]
    logging.info("corpus ready in %.1fs", time.time() - start)

    model = clip.CLIP(cfg)
    params = clip.init_params(cfg, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps)
    # No weight decay on LayerNorm scales, biases, embeddings of positions or the temperature.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "position" not in jax.tree_util.keystr(path), params)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                                  weight_decay=weight_decay, mask=decay_mask))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, pixels, tokens, lengths):
        (loss, acc), grads = jax.value_and_grad(clip_loss, has_aux=True)(
            params, model, pixels, tokens, lengths)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng = np.random.default_rng(seed)
    history = []
    t0 = time.time()
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, size=batch_size, replace=False)
        which = rng.integers(0, 4, size=batch_size)
        tokens, lengths = bucketed_tokens([token_cache[j][w] for j, w in zip(idx, which)],
                                          cfg.context_length)
        pixels = preprocess_images(images[idx], cfg.image_size)
        params, opt_state, loss, acc = step(params, opt_state, pixels, tokens, lengths)
        if i % log_every == 0 or i == steps:
            loss, acc = float(loss), float(acc)
            history.append({"step": i, "loss": loss, "batch_accuracy": acc})
            logging.info("step %d/%d loss %.4f in-batch acc %.3f (%.2fs/step)", i, steps,
                         loss, acc, (time.time() - t0) / i)
    train_seconds = time.time() - t0

    encoder = DocumentEncoder(cfg, jax.device_get(params), tokenizer)
    encoder.save(os.path.join(model_dir, "encoder"))
    metrics = evaluate(encoder, test_images, test_captions)
    metrics.update({"train_seconds": round(train_seconds, 1), "steps": steps,
                    "batch_size": batch_size, "final_loss": history[-1]["loss"],
                    "history": history})
    with fs.open(os.path.join(model_dir, "retriever_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logging.info("test recall: %s", {k: v for k, v in metrics.items() if "recall" in k})
    return metrics
