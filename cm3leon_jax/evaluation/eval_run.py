"""The `eval` run mode: a checkpoint decoded on a suite with several strategies, graded.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/eval.gin --gin.MODEL_DIR="'runs/eval'"

Writes
    MODEL_DIR/eval/report.json     {"suite", "checkpoint", "step", "rows": [...]}: one row per
                                   (task, strategy, retrieved documents) with its metrics
    MODEL_DIR/eval/report.md       the rows as one table
    MODEL_DIR/eval/*.png           grids: each prompt under its sample; edits as source/result

Text-to-image runs every strategy (`Strategy`: top-p, CFG scales, CD-K, N samples re-ranked
by CLIP score, mixed samplings) with each number of retrieved documents in
`num_retrieved` (the paper: 0 / 1 / 2); captioning runs with each number of retrieved
documents; VQA and editing (SFT templates) run without retrieval, editing once per distinct
way the single-sample strategies decode an edit (`grading.edit_strategies`: "two_scale",
"unguided"). `run_suite` is the same evaluation for a Generator already in
memory (the demo calls it).

FID: with `inception_weights` (pytorch-fid's pt_inception-2015-12-05 file) the standard
Inception FID (`fid_inception`); with a retrieval encoder also FID on its image features
(`fid_retrieval_encoder`: this project's own measure, not comparable with papers).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np
from tqdm import tqdm

from cm3leon_jax import fs
from cm3leon_jax.data import shards, user_data
from cm3leon_jax.decode import pictures, prompts, rerank, restore
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import captioning, fid, grading, inception_weights
from cm3leon_jax.evaluation.grading import Context, Strategy
from cm3leon_jax.evaluation.suites import Suite, corpus_suite
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.train import run_config
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

GRID_IMAGES = 16


def _grid(out_dir: str, name: str, images: np.ndarray, captions: Sequence[str]) -> str:
    n = min(GRID_IMAGES, len(images))
    return pictures.grid(np.asarray(images[:n]), list(captions[:n]),
                         os.path.join(out_dir, f"{name}.png"), columns=min(8, n))


def _references(ctx: Context, suite: Suite, cache: dict[str, str | None]) -> None:
    """Reference FID statistics of the suite's real images, per feature extractor."""
    task = suite.text_to_image
    if task is None or task.reference_images is None:
        return
    images = task.reference_images
    content = fid.content_digest(images) if set(ctx.features) - set(ctx.references) else None
    for name, extract in ctx.features.items():
        if name in ctx.references:  # Read already (evaluate_generator, before an overwrite).
            continue
        key = {"suite": suite.name, "images": len(images), "image_size": list(images.shape[1:3]),
               "features": name, "resize": getattr(extract, "resize", None),
               "content": content, "extractor": getattr(extract, "fingerprint", None)}
        ctx.references[name] = fid.reference_statistics(
            cache.get(name), lambda: images, extract, key)


def _jobs(suite: Suite, strategies: Sequence[Strategy], num_retrieved: Sequence[int]):
    jobs = []
    if suite.text_to_image is not None:
        jobs += [("text_to_image", s, k) for k in num_retrieved for s in strategies]
    if suite.captioning is not None:
        jobs += [("captioning", None, k) for k in num_retrieved]
    if suite.vqa is not None:
        jobs.append(("vqa", None, 0))
    if suite.edit is not None:
        jobs += [("edit", s, 0) for s in grading.edit_strategies(strategies)]
    return jobs


def run_suite(ctx: Context, suite: Suite, out_dir: str, strategies: Sequence[Strategy],
              num_retrieved: Sequence[int] = (0,), fid_cache: dict | None = None,
              outputs: dict | None = None, reference_rows: bool = False,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every (task, strategy, k) of the suite -> report rows; grids written to out_dir.
    `outputs`, when given, receives each job's images or texts under "task/strategy/kK"
    (the demo's contact sheet shows them). `reference_rows`: first, real images graded
    like samples (`grading.reference_rows`: the VQ round trip and other real scenes).
    `on_row(rows)` runs after each job (the eval run writes its report there, so that a
    failure late in a long run keeps the rows already done)."""
    fs.makedirs(out_dir)
    _references(ctx, suite, fid_cache or {})
    rows = []
    if reference_rows and suite.text_to_image is not None:
        rows += grading.reference_rows(ctx, suite.text_to_image)
    for task, strategy, k in tqdm(_jobs(suite, strategies, num_retrieved), desc="eval"):
        if task == "text_to_image":
            row, out = grading.text_to_image(ctx, suite.text_to_image, strategy, k)
            _grid(out_dir, f"text_to_image_{strategy.name}_k{k}", out.images, out.captions)
        elif task == "captioning":
            row, texts = grading.caption(ctx, suite.captioning, k)
            _grid(out_dir, f"captioning_k{k}", suite.captioning.images, texts)
        elif task == "vqa":
            row, texts = grading.answer(ctx, suite.vqa)
            _grid(out_dir, "vqa", suite.vqa.images, [f"{q} -> {a}" for q, a in
                                                     zip(suite.vqa.prompts, texts)])
        else:
            row, images = grading.edit(ctx, suite.edit, strategy)
            pairs = np.stack([x for pair in zip(suite.edit.images, images) for x in pair])
            labels = [t for i in suite.edit.prompts for t in (i, "(result)")]
            _grid(out_dir, f"edit_{strategy.name}", pairs, labels)
        if outputs is not None:
            outputs[f"{task}/{row['strategy']}/k{k}"] = (
                out.images if task == "text_to_image" else images if task == "edit" else texts)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as one markdown table; metrics a row lacks are blank."""
    keys = ["task", "strategy", "retrieved"]
    metrics = sorted({k for r in rows for k in r if k not in keys})
    lines = ["| " + " | ".join(keys + metrics) + " |", "|" + "---|" * (len(keys) + len(metrics))]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else ""

    for r in rows:
        cells = [str(r[k]) for k in keys] + [cell(r.get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, header: dict, rows: list[dict]) -> dict:
    """report.json and report.md, each written whole or not at all."""
    report = {**header, "rows": rows}
    fs.write_json(os.path.join(out_dir, "report.json"), report, indent=2)
    fs.write_text(os.path.join(out_dir, "report.md"),
                  f"# Evaluation of {header.get('checkpoint')} (step {header.get('step')}) on "
                  f"{header.get('suite')}\n\n" + markdown_table(rows))
    return report


def _features(encoder: Any, weights: str | None, resize: str) -> dict[str, Callable]:
    out = {}
    if weights:
        out["fid_inception"] = fid.InceptionFeatures(inception_weights.load(weights),
                                                     resize=resize)
    if encoder is not None:
        out["fid_retrieval_encoder"] = fid.EncoderFeatures(encoder)
    return out


@gin.configurable(denylist=["model_dir"])
def evaluate(model_dir: str, *, checkpoint: str = gin.REQUIRED, vocab_dir: str | None = None,
             image_tokenizer: Callable = gin.REQUIRED, suite: Callable | None = None,
             strategies: Sequence[Strategy] = (Strategy(),), num_retrieved: Sequence[int] = (0,),
             retrieval_dir: str | None = None, data_dir: str | None = None,
             clip_encoder_dir: str | None = None, inception_weights_path: str | None = None,
             fid_resize: str = "pytorch_fid", fid_reference: str | None = None,
             caption_metrics: Sequence[str] = captioning.METRICS,
             max_answer_tokens: int = 8, caption_style: str = "infill", batch_size: int = 8,
             step: int | None = None, seed: int = 0, reference_rows: bool = False,
             overwrite: bool = False) -> dict:
    """Evaluates `checkpoint` on `suite` (default: the built-in corpus); returns the report.

    Args:
      checkpoint, vocab_dir, image_tokenizer, step: as the generate run.
      data_dir: the preprocess MODEL_DIR the model was trained on; vocab_dir and
        retrieval_dir default to its vocab/ and retrieval/ (gin_configs/runs/eval_user.gin).
      suite: a suite builder (suites.py; default `corpus_suite()`).
      strategies: image decoding strategies; num_retrieved: retrieved documents per prompt
        (k > 0 needs retrieval_dir).
      clip_encoder_dir: a CLIP folder for CLIP score and re-ranking (OpenAI ViT-B/32 in the
        HF layout, or a trained retrieval encoder); default: the retrieval folder's encoder.
      inception_weights_path: pytorch-fid's Inception weights, for the standard FID;
        fid_resize: "pytorch_fid" or "clean"; fid_reference: .npz cache of the reference
        statistics of the standard FID (computed once per dataset).
      caption_metrics: which of CIDEr-D, BLEU-n, METEOR, ROUGE-L (Java); () for none.
      caption_style: the captioning prompt, "infill" or "image_first" (decode/prompts.py;
        "image_first" for models pretrained with image-first documents, as the demo's).
      reference_rows: also grade real images like samples (VQ round trip of the references,
        real images of other scenes: the ceiling and the chance/FID floor of each metric).
      overwrite: replace an earlier run's MODEL_DIR/eval (otherwise refused: its grids of
        other strategies would sit beside this run's report); it is removed just before
        decoding, after the checks, the restore, the suite and the FID reference statistics.
    """
    out_dir = _refuse_earlier_eval(model_dir, overwrite)
    vocab_dir, retrieval_dir = restore.data_folders(checkpoint, data_dir, vocab_dir,
                                                    retrieval_dir, "evaluate", "eval")
    _check_settings(strategies, num_retrieved, caption_style, retrieval_dir,
                    can_rank=bool(clip_encoder_dir or retrieval_dir),
                    caption_metrics=caption_metrics)
    vocab = MultimodalVocabulary(vocab_dir)
    restore.check_vocabulary(checkpoint, vocab,  # Before the restore.
                             names=("evaluate.vocab_dir", "evaluate.checkpoint"))
    if retrieval_dir:
        restore.check_retrieval_vocabulary(
            retrieval_dir, vocab, names=("evaluate.retrieval_dir", "evaluate.vocab_dir"))
    config, params, restored_step = restore.restore_decoder(checkpoint, step)
    tokenizer = image_tokenizer()
    shards.check_image_tokenizer(vocab_dir, tokenizer, "evaluate.image_tokenizer")
    retriever = Retriever.open(retrieval_dir) if retrieval_dir else None
    gen = Generator(config, params, vocab, tokenizer, retriever, batch_size=batch_size)
    encoder = (DocumentEncoder.load(clip_encoder_dir) if clip_encoder_dir
               else getattr(retriever, "encoder", None))
    _check_settings(strategies, num_retrieved, caption_style, retrieval_dir,
                    can_rank=encoder is not None)  # A retrieval folder that names no encoder.
    return evaluate_generator(
        gen, out_dir, suite=suite, strategies=strategies,
        num_retrieved=num_retrieved, encoder=encoder, caption_metrics=caption_metrics,
        inception_weights_path=inception_weights_path, fid_resize=fid_resize,
        fid_reference=fid_reference, max_answer_tokens=max_answer_tokens,
        caption_style=caption_style, seed=seed,
        header={"checkpoint": checkpoint, "step": restored_step, "seed": seed},
        reference_rows=reference_rows, overwrite=overwrite)


def _refuse_earlier_eval(model_dir: str, overwrite: bool) -> str:
    """MODEL_DIR/eval; refused when an earlier run left one and `overwrite` is not set (its
    grids of other strategies would sit beside this run's report)."""
    out_dir = os.path.join(model_dir, "eval")
    if fs.exists(out_dir) and not overwrite:
        raise UserInputError(f"eval MODEL_DIR {model_dir!r} holds an earlier run's eval/: "
                             "give another MODEL_DIR, or --gin.evaluate.overwrite=True to "
                             "replace it.")
    return out_dir


def _check_settings(strategies: Sequence[Strategy], num_retrieved: Sequence[int],
                    caption_style: str, retrieval_dir: str | None, can_rank: bool,
                    caption_metrics: Sequence[str] = ()) -> None:
    """Refuses settings a job would fail on only when it reached them, hours in."""
    if (isinstance(num_retrieved, (str, bytes)) or not isinstance(num_retrieved, Sequence)
            or not num_retrieved or not all(isinstance(k, int) and not isinstance(k, bool)
                                            and k >= 0 for k in num_retrieved)):
        raise UserInputError(f"evaluate.num_retrieved={num_retrieved!r}: give a list of "
                             "document counts, one job each, e.g. [0] or [0, 2].")
    check_caption_settings(caption_metrics, caption_style)
    names = [s.name for s in strategies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserInputError(f"evaluate.strategies name {twice} more than once: their rows and "
                             "grids would overwrite each other; give each a name of its own.")
    if any(k > 0 for k in num_retrieved) and not retrieval_dir:
        raise UserInputError(f"evaluate.num_retrieved={list(num_retrieved)} retrieves documents: "
                             "bind evaluate.retrieval_dir (a built retrieval folder), or use [0].")
    reranked = [s.name for s in strategies if s.num_samples > 1]
    if reranked and not can_rank:
        raise UserInputError(
            f"evaluate.strategies {reranked} re-rank samples by CLIP score, which needs an "
            "encoder: bind evaluate.clip_encoder_dir (a CLIP folder), or evaluate.retrieval_dir "
            "to a retrieval folder that names its encoder, or leave those strategies out.")


def check_caption_settings(caption_metrics: Sequence[str], caption_style: str,
                           where: str = "evaluate") -> None:
    """The captioning settings (`where`: the configurable that binds them, for the message)."""
    unknown = sorted(set(caption_metrics) - set(captioning.METRICS))
    if isinstance(caption_metrics, str) or unknown:
        raise UserInputError(f"{where}.caption_metrics={caption_metrics!r}: "
                             f"{'unknown ' + str(unknown) if unknown else 'give a list'}; "
                             f"choose among {list(captioning.METRICS)} (the names are "
                             "case-sensitive), or [] for none.")
    prompts.check_style(caption_style, f"{where}.caption_style")


def evaluate_generator(gen: Generator, out_dir: str, *, suite: Callable | None = None,
                       strategies: Sequence[Strategy] = (Strategy(),),
                       num_retrieved: Sequence[int] = (0,), encoder: Any = None,
                       caption_metrics: Sequence[str] = captioning.METRICS,
                       inception_weights_path: str | None = None,
                       fid_resize: str = "pytorch_fid", fid_reference: str | None = None,
                       max_answer_tokens: int = 8, caption_style: str = "infill",
                       seed: int = 0, header: dict | None = None, outputs: dict | None = None,
                       reference_rows: bool = False, overwrite: bool = False) -> dict:
    """The eval run for a Generator already in memory (what the demo calls): decodes the
    suite, writes out_dir/report.json, report.md and the grids, returns the report.
    `encoder` (a retrieval DocumentEncoder) gives CLIP score, re-ranking and encoder FID;
    `outputs` as in `run_suite`. `overwrite`: an earlier out_dir is removed once the suite
    is built, just before decoding (not before, so that a mistake found on the way keeps
    the earlier results)."""
    ctx = Context(gen, rerank.ClipRanker(encoder) if encoder is not None else None,
                  _features(encoder, inception_weights_path, fid_resize),
                  caption_metrics=tuple(caption_metrics), max_answer_tokens=max_answer_tokens,
                  caption_style=caption_style, seed=seed)
    built = (suite or corpus_suite())(gen.image_tokenizer.image_size)
    if built.captioning is not None and getattr(gen.vocab, "directory", None):
        shards.check_caption_style(gen.vocab.directory, caption_style, "evaluate.caption_style")
    if caption_metrics and built.captioning is not None:
        captioning.require_java()  # Now, not after hours of decoding.
    cache = {"fid_inception": fid_reference}
    _references(ctx, built, cache)  # Cached statistics refused before an overwrite, not after.
    if overwrite and fs.exists(out_dir):
        fs.rmtree(out_dir)
    header = {"suite": built.name, **(header or {}),
              "strategies": [_describe(s) for s in strategies]}
    rows = run_suite(ctx, built, out_dir, strategies, num_retrieved,
                     cache, outputs, reference_rows,
                     on_row=lambda done: write_report(out_dir, {**header, "complete": False},
                                                      done))
    report = write_report(out_dir, {**header, "complete": True}, rows)
    print(f"[eval] wrote {out_dir}/report.md ({len(rows)} rows)", flush=True)
    return report


def _describe(s: Strategy) -> dict:
    return {"name": s.name, "num_samples": s.num_samples,
            "samplings": [dataclasses.asdict(c) if isinstance(c, SamplingConfig) else str(c)
                          for c in s.samplings]}


def _preflight(model_dir: str) -> None:
    """Refuses, before `main.run` writes config.gin there, a MODEL_DIR that is, holds or lies
    inside a folder the run reads, or that holds an earlier run's eval/ without
    evaluate.overwrite; and the plain settings `_check_settings` would refuse (the
    strategies and the suite, gin references the run builds, are checked by the run)."""
    user_data.check_outside(model_dir, "eval")  # eval_user.gin reads the user's pairs.
    # Each setting is resolved where it is read (a deep copy resolves a gin reference or
    # macro): resolving every binding would also call the suite builder (`@user_suite()`
    # lists the user's source to check it), which the run does.
    raw = gin.get_bindings(evaluate, resolve_references=False)

    def bound(name: str, default: Any = None) -> Any:
        return copy.deepcopy(raw[name]) if name in raw else default

    run_config.check_apart(model_dir, "eval", {
        f"evaluate.{name}": bound(name)
        for name in ("checkpoint", "data_dir", "vocab_dir", "retrieval_dir")})
    _refuse_earlier_eval(model_dir, bool(bound("overwrite", False)))
    defaults = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()}
    value = {k: bound(k, defaults[k]) for k in ("num_retrieved", "caption_style",
                                                 "retrieval_dir", "caption_metrics",
                                                 "data_dir", "vocab_dir")}
    retrieval_dir = restore.data_folders(bound("checkpoint"), value["data_dir"],
                                         value["vocab_dir"], value["retrieval_dir"],
                                         "evaluate", "eval")[1]
    _check_settings((), value["num_retrieved"], value["caption_style"],
                    retrieval_dir, can_rank=True,
                    caption_metrics=value["caption_metrics"])


evaluate.preflight = _preflight
