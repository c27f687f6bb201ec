"""The `demo` run mode: the whole flow, end to end, on the built-in corpus.

Each stage is an ordinary run mode of its own, called here with a sub-folder of
MODEL_DIR; gin binds their settings (gin_configs/runs/demo.gin). Stages that
are finished are reused: rerunning the demo resumes where it stopped.

    MODEL_DIR/tfds/              the synthetic corpus (TFDS)
    MODEL_DIR/image_tokenizer/   the VQGAN, trained on the corpus' train split
    MODEL_DIR/retriever/         the CLIP retrieval encoder, trained on the same scenes
    MODEL_DIR/data/              vocab/ + tokenized shards with every document's
                                 neighbours + retrieval/ (bank, ScaNN index) +
                                 manifest.json (Beam, two passes)
    MODEL_DIR/pretrain/          the tiny decoder: checkpoints, metrics.jsonl, TensorBoard
    MODEL_DIR/pictures/          generated.png + captioned.png + captions.json (the
                                 decoder's text->image and image->text on test scenes,
                                 scored exactly), corpus.png, reconstructions.png
    MODEL_DIR/metrics.json       what each stage measured

Stages of the flow that are not built yet are listed in metrics.json under
`not_yet` and printed at the end, so the demo never claims more than it did.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Sequence

import gin
import numpy as np
from absl import logging

from cm3leon_jax.data import parse, preprocess, retrieval_pass, shards, synthetic_tfds
from cm3leon_jax.decode import generate_run, pictures, restore
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.evaluation import shapes_scores
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.retrieval import clip_train
from cm3leon_jax.train import trainer
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab import image_tokenizer as image_tokenizer_lib
from cm3leon_jax.vocab import vqgan_train
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

NOT_YET = (
    "evaluation (FID, CLIP score, CIDEr), CLIP re-ranking of samples, and export",
)


@gin.configurable(denylist=["model_dir"])
def demo(model_dir: str,
         image_size: int = 32,
         split_sizes: dict | None = None,
         num_pictures: int = 16,
         parse_examples: int = 200) -> dict:
    """Runs every stage that exists, in order; returns (and writes) the metrics.

    Args:
      model_dir: where everything goes (see the module docstring).
      image_size: side of the corpus images (the image tokenizer's size).
      split_sizes: corpus split sizes, e.g. {"train": 2000, ...}.
      num_pictures: images shown in each picture grid.
      parse_examples: test images scored by the exact parser.
    """
    metrics: dict = {}
    timings: dict = {}
    tfds_dir = os.path.join(model_dir, "tfds")
    builder_fn = functools.partial(preprocess.synthetic_builder, image_size=image_size,
                                   data_dir=tfds_dir, split_sizes=split_sizes)

    def stage(name, fn):
        start = time.time()
        print(f"[demo] {name} ...", flush=True)
        metrics[name] = fn()
        timings[name] = round(time.time() - start, 1)
        print(f"[demo] {name}: done in {timings[name]} s", flush=True)

    stage("corpus", lambda: corpus_stage(builder_fn, parse_examples))
    vq_dir = os.path.join(model_dir, "image_tokenizer")
    stage("image_tokenizer", lambda: vqgan_train.train_image_tokenizer(model_dir=vq_dir))
    tokenizer_fn = functools.partial(image_tokenizer_lib.load_image_tokenizer,
                                     checkpoint=vq_dir)
    retriever_dir = os.path.join(model_dir, "retriever")
    stage("retriever", lambda: retriever_stage(retriever_dir))
    data_dir = os.path.join(model_dir, "data")
    retrieval = retrieval_pass.RetrievalConfig(
        encoder_dir=os.path.join(retriever_dir, "encoder"))
    stage("preprocess", lambda: preprocess.preprocess(
        data_dir, source=preprocess.TfdsSource(builder_fn),
        image_tokenizer_fn=tokenizer_fn, retrieval=retrieval))
    pretrain_dir = os.path.join(model_dir, "pretrain")
    stage("pretrain", lambda: pretrain_stage(pretrain_dir, data_dir))
    stage("generate", lambda: generate_stage(
        os.path.join(model_dir, "pictures"), pretrain_dir, data_dir, builder_fn(),
        tokenizer_fn()))
    stage("pictures", lambda: pictures_stage(
        builder_fn(), tokenizer_fn(), data_dir, os.path.join(model_dir, "pictures"),
        num_pictures))
    metrics["seconds"] = timings
    metrics["not_yet"] = list(NOT_YET)
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable(metrics), f, indent=2, sort_keys=True)
    print(f"[demo] wrote {model_dir}/metrics.json and {model_dir}/pictures/")
    print("[demo] not built yet:\n  - " + "\n  - ".join(NOT_YET))
    return metrics


def corpus_stage(builder_fn, parse_examples: int) -> dict:
    """Builds the corpus; scores the exact parser on test images."""
    builder = builder_fn()
    ds = builder.as_dataset(split=f"test[:{parse_examples}]")
    correct = 0
    n = 0
    for ex in ds.as_numpy_iterator():
        scene = synthetic_tfds.shapes.Scene.from_json(ex["scene"].decode())
        correct += parse.match(parse.parse_image(ex["image"]), scene, exact=True)["all_correct"]
        n += 1
    return {"splits": {k: v.num_examples for k, v in builder.info.splits.items()},
            "parser_exact_accuracy": correct / max(n, 1), "parser_examples": n}


def retriever_stage(out_dir: str) -> dict:
    """Trains the CLIP encoder (train_retriever's settings and pairs come from gin) unless it
    exists."""
    metrics_path = os.path.join(out_dir, "retriever_metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            return json.load(f)
    return clip_train.train_retriever(out_dir)


def pretrain_stage(out_dir: str, data_dir: str) -> dict:
    """Pretrains the decoder (settings: gin_configs/train/tiny.gin) on the demo's data.

    Resumes from the newest checkpoint, so a finished run only reloads and evaluates.
    """
    with gin.unlock_config():  # The tasks read the demo's own data folder.
        gin.bind_parameter("data_dirs.synthetic", data_dir)
    result = trainer.train(out_dir)
    # A resumed run logs again the steps after its checkpoint: the latest entry counts.
    train_log, eval_log = {}, {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "loss" in entry:
                train_log[entry["step"]] = entry["loss"]
            if "eval/loss" in entry:
                eval_log[entry["step"]] = entry["eval/loss"]
    losses, evals = sorted(train_log.items()), sorted(eval_log.items())
    return {"steps": result["step"], "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "eval_loss": evals, "final_eval": result["eval"]}


@gin.configurable(denylist=["out_dir", "pretrain_dir", "data_dir", "builder", "image_tokenizer"])
def generate_stage(out_dir: str, pretrain_dir: str, data_dir: str, builder, image_tokenizer,
                   num_examples: int = 32, num_retrieved: int = 2,
                   image_sampling: SamplingConfig | None = None,
                   caption_sampling: SamplingConfig | None = None,
                   max_caption_tokens: int = 24, seed: int = 0) -> dict:
    """The trained decoder draws the first `num_examples` test captions and captions the
    first test images; both are scored exactly against the scenes (shapes_scores.py).

    For scale, the same scores of the VQ reconstructions of the true images (what the
    image tokenizer lets a perfect decoder reach) and of the top retrieved document
    (what copying the retrieval would give).
    """
    test = list(builder.as_dataset(split=f"test[:{num_examples}]").as_numpy_iterator())
    images = np.stack([ex["image"] for ex in test])
    captions = [ex["captions"][0].decode() for ex in test]
    scenes = [synthetic_tfds.shapes.Scene.from_json(ex["scene"].decode()) for ex in test]
    config, params, step = restore.restore_decoder(pretrain_dir)
    vocab = MultimodalVocabulary(os.path.join(data_dir, "vocab"))
    retriever = Retriever.open(os.path.join(data_dir, "retrieval")) if num_retrieved else None
    gen = Generator(config, params, vocab, image_tokenizer, retriever)
    drawn = gen.text_to_image(captions, num_retrieved=num_retrieved, sampling=image_sampling,
                              seed=seed)
    written = gen.image_to_text(images, num_retrieved=num_retrieved, sampling=caption_sampling,
                                max_tokens=max_caption_tokens, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    pictures.grid(drawn.images, captions, os.path.join(out_dir, "generated.png"))
    pictures.grid(images, written, os.path.join(out_dir, "captioned.png"))
    generate_run.write_captions(os.path.join(out_dir, "captions.json"),
                                [f"test[{i}]" for i in range(len(test))], written, 1,
                                [{"true_caption": c} for c in captions])
    metrics = {"checkpoint_step": step, "examples": len(test), "num_retrieved": num_retrieved,
               "text_to_image": shapes_scores.image_scores(drawn.images, scenes),
               "image_to_text": shapes_scores.caption_scores(written, scenes),
               "vq_reconstruction_reference": shapes_scores.image_scores(
                   image_tokenizer.reconstruct(images), scenes)}
    if retriever is not None:
        metrics["top_retrieved_reference"] = _retrieval_reference(
            retriever, vocab, image_tokenizer, captions, images, scenes)
    metrics["example_captions"] = [{"true": c, "generated": w}
                                   for c, w in zip(captions[:4], written[:4])]
    return metrics


def _retrieval_reference(retriever, vocab, image_tokenizer, captions, images, scenes) -> dict:
    """Scores of the best retrieved document's image (for a caption) and caption (for an image)."""
    def top_document(result):
        return document_lib.decode(result.token_ids[0], vocab)
    by_text = [top_document(r) for r in retriever.search_texts(captions, k=1)]
    by_image = [top_document(r) for r in retriever.search_images(list(images), k=1)]
    codes = np.stack([d.images[0] for d in by_text])
    return {"text_to_image": shapes_scores.image_scores(image_tokenizer.decode(codes), scenes),
            "image_to_text": shapes_scores.caption_scores([d.texts[0] for d in by_image],
                                                          scenes)}


def pictures_stage(builder, image_tokenizer, data_dir: str, out_dir: str,
                   num_pictures: int) -> dict:
    """Corpus samples with captions, originals over VQ reconstructions."""
    os.makedirs(out_dir, exist_ok=True)
    test = list(builder.as_dataset(split=f"test[:{num_pictures}]").as_numpy_iterator())
    images = np.stack([ex["image"] for ex in test])
    captions = [ex["captions"][0].decode() for ex in test]
    pictures.grid(images, captions, os.path.join(out_dir, "corpus.png"))
    recon = image_tokenizer.reconstruct(images)
    pictures.grid(np.concatenate([images, recon]), None,
                  os.path.join(out_dir, "reconstructions.png"), columns=num_pictures)
    psnr = float(vqgan_train.psnr(image_tokenizer_lib.images_to_model(images),
                                  image_tokenizer_lib.images_to_model(recon)))
    # A document from the tokenized shards, decoded back, proves the id layout.
    vocab = MultimodalVocabulary(os.path.join(data_dir, "vocab"))
    record = next(shards.read_split(data_dir, "test").as_numpy_iterator())
    doc = document_lib.decode(record["ids"], vocab)
    lengths = [r["ids"].size for r in shards.read_split(data_dir, "train")
               .take(500).as_numpy_iterator()]
    return {"reconstruction_psnr_db": psnr,
            "vocab_size": vocab.vocab_size,
            "tokens_per_document_mean": float(np.mean(lengths)),
            "example_document": vocab.render(record["ids"]),
            "example_document_texts": doc.texts}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
