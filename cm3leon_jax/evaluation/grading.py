"""Each evaluation task decoded with one strategy and graded: rows of the eval report.

A row is `{"task", "strategy", "retrieved", <metric>: value, ...}`; `Context` holds what
every task shares (the generator, the CLIP ranker, the FID feature extractors and their
reference statistics, computed once per suite).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np

from cm3leon_jax.data import sft_prompts, shapes
from cm3leon_jax.decode import rerank
from cm3leon_jax.decode.generate import CAPTION_SAMPLING, Generator, SamplingConfig
from cm3leon_jax.errors import UserInputError, check_count
from cm3leon_jax.evaluation import captioning, fid, likelihood, shapes_scores, vqa
from cm3leon_jax.evaluation.suites import Task


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Strategy:
    """How images are decoded: `samplings` (sample j uses samplings[j % K]: mixing top-p
    and CD-K as the paper does) and `num_samples` N (N > 1: the best by CLIP score kept)."""

    name: str = "cfg3"
    samplings: tuple = (SamplingConfig(),)
    num_samples: int = 1

    def __post_init__(self):
        check_count(f"Strategy {self.name!r}: num_samples", self.num_samples)
        if not self.samplings:
            raise UserInputError(f"Strategy {self.name!r}: samplings is empty; give at least "
                                 "one SamplingConfig.")


@dataclasses.dataclass
class Context:
    gen: Generator
    ranker: Any = None                       # rerank.ClipRanker or None
    features: dict[str, Callable] = dataclasses.field(default_factory=dict)  # FID name -> fn
    references: dict = dataclasses.field(default_factory=dict)  # FID name -> Statistics
    caption_metrics: tuple = captioning.METRICS  # pycocoevalcap's (java); () for none
    max_answer_tokens: int = 8
    caption_style: str = "infill"            # image_to_text's prompt (decode/prompts.py)
    seed: int = 0


def _row(task: str, strategy: str, k: int | str, metrics: dict) -> dict:
    return {"task": task, "strategy": strategy, "retrieved": k, **metrics}


def draw(ctx: Context, captions: list[str], strategy: Strategy, k: int):
    """The strategy's images for the captions (one per caption) -> generate.Images."""
    if strategy.num_samples == 1:
        return ctx.gen.text_to_image(captions, num_retrieved=k, sampling=strategy.samplings[0],
                                     seed=ctx.seed)
    if ctx.ranker is None:
        raise ValueError(f"strategy {strategy.name!r} re-ranks {strategy.num_samples} samples "
                         "by CLIP score: give eval.clip_encoder_dir or a retrieval_dir whose "
                         "encoder can score.")
    return rerank.best_of(ctx.gen, captions, num_samples=strategy.num_samples, ranker=ctx.ranker,
                          samplings=strategy.samplings, num_retrieved=k, seed=ctx.seed).images


def image_metrics(ctx: Context, images: np.ndarray, task: Task) -> dict:
    """Exact metrics (scenes), CLIP score (ranker) and FID (reference images) of images."""
    out = {}
    if task.scenes is not None:
        out.update(shapes_scores.text_to_image_metrics(images, task.scenes))
    if ctx.ranker is not None and task.prompts is not None:
        out["clip_score"] = float(np.mean(ctx.ranker(images, task.prompts)))
    for name, extract in ctx.features.items():
        if name in ctx.references:
            out[name] = fid.fid(extract(images), ctx.references[name])
            out["fid_n"] = len(images)  # FID depends on the count: say what it is of.
    return out


def text_to_image(ctx: Context, task: Task, strategy: Strategy, k: int) -> tuple[dict, Any]:
    out = draw(ctx, task.prompts, strategy, k)
    return _row("text_to_image", strategy.name, k, image_metrics(ctx, out.images, task)), out


def reference_rows(ctx: Context, task: Task) -> list[dict]:
    """Text-to-image rows of real images, graded like samples (retrieved "-"):
    "real:vq_reconstruction" (the image tokenizer's round trip of the reference images: the
    best a decoder of its codes can score) and "real:other_scenes" (`task.other_images`,
    real scenes the prompts do not describe: exact metrics and CLIP score at chance, FID
    the floor of two real samples of this size)."""
    rows = []
    if task.reference_images is not None and ctx.gen.image_tokenizer is not None:
        recon = ctx.gen.image_tokenizer.reconstruct(task.reference_images)
        rows.append(_row("text_to_image", "real:vq_reconstruction", "-",
                         image_metrics(ctx, recon, task)))
    if task.other_images is not None:
        rows.append(_row("text_to_image", "real:other_scenes", "-",
                         image_metrics(ctx, task.other_images, task)))
    return rows


def caption(ctx: Context, task: Task, k: int, sampling: SamplingConfig | None = None
            ) -> tuple[dict, list[str]]:
    texts = ctx.gen.image_to_text(task.images, num_retrieved=k, seed=ctx.seed,
                                  sampling=sampling or CAPTION_SAMPLING,
                                  style=ctx.caption_style)
    metrics = {}
    if task.scenes is not None:
        metrics.update(shapes_scores.caption_metrics(texts, task.scenes))
    if task.references is not None and ctx.caption_metrics:
        metrics.update(captioning.caption_metrics(texts, task.references, ctx.caption_metrics))
    return _row("captioning", "greedy", k, metrics), texts


def answer(ctx: Context, task: Task) -> tuple[dict, list[str]]:
    """VQA with the SFT template (`image <break> Question: q <break>` -> answer)."""
    texts = ctx.gen.vqa(task.images, task.prompts, max_tokens=ctx.max_answer_tokens,
                        seed=ctx.seed)
    if task.scenes is not None:  # The corpus: one true answer, not ten annotators.
        truths = [r[0] for r in task.references]
        metrics = {"vqa_exact_match": shapes_scores.vqa_exact_match(texts, truths),
                   **shapes_scores.vqa_exact_match_by_type(task.prompts, texts, truths)}
    else:
        metrics = {"vqa_accuracy": vqa.vqa_score(texts, task.references)}
    return _row("vqa", "greedy", 0, metrics), texts


def edit_strategies(strategies: Sequence[Strategy]) -> list[Strategy]:
    """The distinct ways `Generator.edit` decodes among the single-sample `strategies` (the
    re-ranking ones when there are no others: edits are not re-ranked), one each, named for
    what runs. An edit is guided with two scales (image 1.5, text 7.5)
    whatever its sampling's guidance ("cfg" at any scale, or "cdk") and unguided only when
    that is "none": eval.gin's cfg3, cfg5 and cdk are one edit decoding ("two_scale"), top-p
    another ("unguided"). A second decoding of either kind (another top-p, say) is named
    after its strategy too ("two_scale_<name>")."""
    out, seen = [], set()
    for strategy in strategies:
        sampling = strategy.samplings[0]
        guided = sampling.guidance != "none"
        # The sampling with the fields an edit ignores (which guidance, its scale) set alike.
        key = dataclasses.replace(sampling, guidance="cfg" if guided else "none",
                                  guidance_scale=0.0, cdk_alpha=0.0, cdk_k=0)
        # Re-ranking strategies count only when no other gives the edits a decoding (then
        # the first sample of the first: edits are not re-ranked).
        if key in seen or (strategy.num_samples != 1
                           and any(s.num_samples == 1 for s in strategies)):
            continue
        seen.add(key)
        name = "two_scale" if guided else "unguided"
        if any(s.name == name for s in out):
            name = f"{name}_{strategy.name}"
        out.append(Strategy(name=name, samplings=(sampling,)))
    return out


def edit(ctx: Context, task: Task, strategy: Strategy) -> tuple[dict, np.ndarray]:
    """Instruction editing with the SFT template (two-scale guidance unless the strategy's
    first sampling is unguided), graded against the edited scenes, with `edit_copying`."""
    out = ctx.gen.edit(task.images, task.prompts, sampling=strategy.samplings[0], seed=ctx.seed)
    metrics = shapes_scores.edit_metrics(out.images, task.scenes)
    targets = np.stack([shapes.render(s) for s in task.scenes])
    metrics.update(edit_copying(ctx.gen, task.images, task.prompts, targets))
    return _row("edit", strategy.name, 0, metrics), out.images


def edit_copying(gen: Generator, sources: Any, instructions: Sequence[str], targets: Any
                 ) -> dict[str, float]:
    """What the decoder takes from an edit's source, teacher-forced on the true edit.

    Most of an edit is a copy: where the tokenizer gives the target the source's code
    (`edit_kept_codes` of the places), a decoder that reads its source should give that
    code a high probability, with the true target's earlier codes fed in. One that ignores
    the source gives it only what the target's own earlier codes suggest. Two figures:
    `edit_copy_prob` over every kept place, and `edit_first_copy_prob` over the first
    code, before any of the target's own codes exist (for the edits that keep it).
    These move long before `edit_right` does (benchmarks/RESULTS_image_tokenizer.md).
    """
    codes = gen.image_tokenizer.encode(sources)
    wanted = gen.image_tokenizer.encode(targets)
    prompts = [sft_prompts.prompt_ids(sft_prompts.edit(c, t), gen.vocab)
               for c, t in zip(codes, instructions)]
    _, copy = likelihood.token_log_probs(
        gen.config, gen.params, prompts, [gen.layout.codes_to_ids(c) for c in wanted],
        [gen.layout.codes_to_ids(c) for c in codes], start=gen.vocab.prompt_start_id)
    kept, copy = codes == wanted, np.exp(np.stack(copy))
    mean = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    return {"edit_kept_codes": mean(kept), "edit_copy_prob": mean(copy[kept]),
            "edit_first_copy_prob": mean(copy[kept[:, 0], 0])}
