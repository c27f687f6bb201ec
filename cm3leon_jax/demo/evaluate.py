"""The demo's evaluate stage: the eval run's exact metrics on held-out scenes for the model
before SFT (pretrain/) and after it (sft/), side by side in one run.

    MODEL_DIR/eval/pretrain/   report.json, report.md, grids   (evaluation/eval_run.py)
    MODEL_DIR/eval/sft/        the same for the fine-tuned decoder
    MODEL_DIR/pictures/evaluated.npz   the edits and VQA answers the contact sheet shows

Each model goes through `eval_run.evaluate_generator` on the same `corpus_suite` (VQA,
instruction editing and captioning of the split's scenes, with the SFT templates for VQA
and editing), graded exactly:

    vqa_exact_match    the answer equals the scene's (VQA normalization)
    edit_right         the edited image parses as the edited scene: the edit happened, in
                       place, and nothing else changed
    edit_copy_prob     teacher-forced on the true edit, the probability the decoder gives
                       the source's code where the edit keeps it (grading.edit_copying):
                       whether it reads its source at all, long before edits come out right
    captioning         objects named right (class and color), as the generate stage

VQA is compared with the majority-answer baseline: the most frequent answer to the same
kind of questions on validation scenes, given to every test question (so the baseline
never sees the test answers).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.data import sft_examples, shapes, shapes_language
from cm3leon_jax.decode import restore
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.demo import sheet as demo_sheet
from cm3leon_jax.demo import stages as demo_stages
from cm3leon_jax.errors import check_count
from cm3leon_jax.evaluation import eval_run, shapes_scores
from cm3leon_jax.evaluation.grading import Strategy
from cm3leon_jax.evaluation.suites import corpus_suite
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

SHEET_ROWS = 8
# The targets for this stage, printed as reached / not reached.
VQA_TIMES_BASELINE = 3.0
EDIT_AFTER_SFT = 0.30


def check_settings() -> None:
    """`evaluate_stage`'s settings, checked when the demo starts (its preflight): a mistake
    here would otherwise show only after every earlier stage has run."""
    s = demo_stages.settings(evaluate_stage)
    check_count("evaluate_stage.num_examples", s["num_examples"], 2, " (a suite needs two)")
    for name in ("baseline_examples", "batch_size"):
        check_count(f"evaluate_stage.{name}", s[name])
    for name in ("num_retrieved", "seed"):
        check_count(f"evaluate_stage.{name}", s[name], 0)
    # The suite's own checks: the split and the tasks.
    corpus_suite(num_examples=s["num_examples"], split=s["split"], tasks=tuple(s["tasks"]))
    eval_run.check_caption_settings(s["caption_metrics"], s["caption_style"], "evaluate_stage")


@gin.configurable(denylist=["out_dir", "pictures_dir", "runs", "vocab_dir", "image_tokenizer",
                            "retrieval_dir"])
def evaluate_stage(out_dir: str, pictures_dir: str, runs: dict[str, str], vocab_dir: str,
                   image_tokenizer: Any, retrieval_dir: str | None = None, split: str = "test",
                   num_examples: int = 32, num_retrieved: int = 2,
                   tasks: Sequence[str] = ("vqa", "edit", "captioning"),
                   edit_sampling: SamplingConfig | None = None, baseline_examples: int = 200,
                   caption_metrics: Sequence[str] = (), caption_style: str = "infill",
                   batch_size: int = 32, seed: int = 0) -> dict:
    """Evaluates each of `runs` ({"pretrain": dir, "sft": dir}) on the same scenes.

    Args:
      out_dir: MODEL_DIR/eval (one sub-folder per run).
      pictures_dir: where evaluated.npz (for the contact sheet) goes.
      split, num_examples: the corpus scenes evaluated ("validation" while tuning).
      num_retrieved: retrieved documents for captioning.
      tasks: corpus_suite tasks (no text_to_image: the generate stage measures it).
      edit_sampling: how edited images are decoded (guidance "cfg": the paper's two-scale
        guidance, image 1.5 and text 7.5; "none": unguided).
      baseline_examples: validation scenes whose answers give the majority answer.
      caption_metrics: pycocoevalcap metrics (they need Java); () for the exact ones only.
      caption_style: the captioning prompt (the generate stage's, so both grade the same).
    """
    suite = corpus_suite(num_examples=num_examples, split=split, tasks=tuple(tasks))
    strategy = Strategy(name="two_scale", samplings=(edit_sampling or SamplingConfig(),))
    retriever = Retriever.open(retrieval_dir) if retrieval_dir else None
    vocab = MultimodalVocabulary(vocab_dir)
    result: dict[str, Any] = {"split": split, "examples": num_examples}
    shown: dict[str, Any] = {}
    for name, model_dir in runs.items():
        config, params, step = restore.restore_decoder(model_dir, vocab=vocab)
        gen = Generator(config, params, vocab, image_tokenizer, retriever,
                        batch_size=batch_size)
        outputs: dict = {}
        report = eval_run.evaluate_generator(
            gen, os.path.join(out_dir, name), suite=suite, strategies=[strategy],
            num_retrieved=[num_retrieved] if retriever is not None else [0],
            caption_metrics=caption_metrics, caption_style=caption_style, seed=seed,
            outputs=outputs, overwrite=True,  # The stage's own folder: nothing left stale.
            header={"checkpoint": model_dir, "step": step})
        result[name] = {"step": step, "report": os.path.join(out_dir, name, "report.md"),
                        **{row["task"]: _metrics(row) for row in report["rows"]}}
        shown[name] = outputs
    built = suite(image_tokenizer.image_size)
    if built.vqa is not None:
        answer, baseline = majority_baseline(built.vqa.references, baseline_examples,
                                             image_tokenizer.image_size)
        result["vqa_majority_answer"], result["vqa_majority_baseline"] = answer, baseline
        result["vqa_question_prior_baseline"] = question_prior_baseline(
            built.vqa.prompts, built.vqa.references, baseline_examples,
            image_tokenizer.image_size)
    _save(pictures_dir, built, shown)
    return result


def question_prior_baseline(test_questions: Sequence[str], test_answers: Sequence[Sequence[str]],
                            num_validation: int, image_size: int, seed: int = 0) -> float:
    """Exact match of an answerer that never looks at the image: for each test question,
    the most common answer to the same question over every question of `num_validation`
    validation scenes (the overall most common answer for a question never asked there).
    On this corpus it is far above the majority answer ("How many shapes?" is nearly
    always "one"), so it says what reading the image must add."""
    by_question: dict = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for i in range(max(num_validation, 1)):
        scene = sft_examples.corpus_scene(seed, "validation", i, image_size)
        for question, answer in shapes_language.vqa_pairs(scene, np.random.default_rng([seed, i])):
            by_question[question][answer] += 1
            overall[answer] += 1
    fallback = overall.most_common(1)[0][0]
    guesses = [by_question[q].most_common(1)[0][0] if q in by_question else fallback
               for q in test_questions]
    return shapes_scores.vqa_exact_match(guesses, [r[0] for r in test_answers])


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("task", "strategy", "retrieved")}


def majority_baseline(test_answers: Sequence[Sequence[str]], num_validation: int,
                      image_size: int) -> tuple[str, float]:
    """(the most frequent answer on validation scenes, its exact match on the test answers)."""
    validation = corpus_suite(num_examples=max(num_validation, 2), split="validation",
                              tasks=("vqa",))(image_size).vqa
    answer = collections.Counter(r[0] for r in validation.references).most_common(1)[0][0]
    return answer, shapes_scores.vqa_exact_match([answer] * len(test_answers),
                                                 [r[0] for r in test_answers])


def _first(outputs: dict, task: str) -> Any:
    return next((v for k, v in outputs.items() if k.startswith(task + "/")), None)


def _save(out_dir: str, suite, shown: dict[str, dict]) -> None:
    """evaluated.npz: inputs, truths and each run's edits and answers."""
    fs.makedirs(out_dir)
    arrays: dict[str, Any] = {"runs": np.array(list(shown))}
    if suite.vqa is not None:
        arrays.update(vqa_images=suite.vqa.images, vqa_questions=np.array(suite.vqa.prompts),
                      vqa_truths=np.array([r[0] for r in suite.vqa.references]))
        for name, outputs in shown.items():
            arrays[f"vqa_answers_{name}"] = np.array(_first(outputs, "vqa"))
    if suite.edit is not None:
        arrays.update(edit_images=suite.edit.images,
                      edit_instructions=np.array(suite.edit.prompts),
                      edit_targets=np.stack([shapes.render(s) for s in suite.edit.scenes]),
                      edit_scenes=np.array([s.to_json() for s in suite.edit.scenes]))
        for name, outputs in shown.items():
            arrays[f"edit_results_{name}"] = np.asarray(_first(outputs, "edit"))
    fs.np_savez(os.path.join(out_dir, "evaluated.npz"), **arrays)


def sheet_sections(out_dir: str) -> list:
    """The contact sheet's edits (before / after, per run) and VQA sections."""
    path = os.path.join(out_dir, "evaluated.npz")
    if not fs.exists(path):
        return []
    data = fs.np_load(path)
    runs = [str(r) for r in data["runs"]]
    sections = []
    if "edit_images" in data:
        n = min(SHEET_ROWS, len(data["edit_images"]))
        rows = []
        for i in range(n):
            scene = shapes.Scene.from_json(str(data["edit_scenes"][i]))
            row = [data["edit_images"][i], str(data["edit_instructions"][i])]
            for name in runs:
                after = data[f"edit_results_{name}"][i]
                ok = shapes_scores.edit_metrics(after[None], [scene])["edit_right"] > 0
                row += [after, (f"{name}: {'right' if ok else 'wrong'}", ok)]
            rows.append(row + [data["edit_targets"][i]])
        header = ["before", "instruction"] + [h for name in runs for h in (name, "")] + [
            "expected"]
        sections.append(demo_sheet.section("Instruction editing (held-out scenes), before and "
                                           "after SFT", header, rows, text_width=150))
    if "vqa_images" in data:
        n = min(SHEET_ROWS, len(data["vqa_images"]))
        rows = []
        for i in range(n):
            truth = str(data["vqa_truths"][i])
            row = [data["vqa_images"][i], str(data["vqa_questions"][i])]
            for name in runs:
                said = str(data[f"vqa_answers_{name}"][i])
                row.append((f"{name}: {said}", shapes_scores.vqa_exact_match([said], [truth]) > 0))
            rows.append(row + [truth])
        sections.append(demo_sheet.section(
            "Visual question answering (held-out scenes)",
            ["image", "question"] + [f"{name} answer" for name in runs] + ["truth"], rows,
            text_width=180))
    return sections


def summary(result: dict) -> str:
    """One line: VQA and edits before and after SFT."""
    parts = []
    for name in [k for k in result if isinstance(result[k], dict) and "step" in result[k]]:
        r = result[name]
        vqa = r.get("vqa", {}).get("vqa_exact_match")
        edit = r.get("edit", {}).get("edit_right")
        parts.append(f"{name}: VQA {_pct(vqa)}, edits {_pct(edit)}")
    if "vqa_majority_baseline" in result:
        parts.append(f"VQA majority baseline {_pct(result['vqa_majority_baseline'])} "
                     f"(always {result['vqa_majority_answer']!r})")
    return "; ".join(parts)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def targets_report(result: dict, after: str = "sft", before: str = "pretrain") -> list[str]:
    """A line per target of the issue for this stage, with the figure reached."""
    lines = []
    vqa = result.get(after, {}).get("vqa", {}).get("vqa_exact_match")
    base = result.get("vqa_majority_baseline")
    if vqa is not None and base is not None:
        # A zero is never "3x" a zero baseline (a small test set can have one).
        verdict = "reached" if vqa > 0 and vqa >= VQA_TIMES_BASELINE * base else "NOT reached"
        prior = result.get("vqa_question_prior_baseline")
        blind = "" if prior is None else f"; a blind question-only prior {prior:.0%}"
        lines.append(f"target VQA exact match >= {VQA_TIMES_BASELINE:g}x majority baseline "
                     f"({VQA_TIMES_BASELINE * base:.0%}) after SFT: {vqa:.0%} ({verdict}{blind})"
                     + _by_question_type(result[after]["vqa"]))
    edit = result.get(after, {}).get("edit", {}).get("edit_right")
    was = result.get(before, {}).get("edit", {}).get("edit_right")
    if edit is not None:
        verdict = "reached" if edit >= EDIT_AFTER_SFT else "NOT reached"
        lines.append(f"target edits right >= {EDIT_AFTER_SFT:.0%} after SFT: {edit:.0%} "
                     f"({verdict}; before SFT {_pct(was)})" + _copying(result, before, after))
    return lines


def _copying(result: dict, before: str, after: str) -> str:
    """'; the source's code where the edit keeps it, teacher-forced: p 0.37 before SFT, 0.45
    after (the first code 0.06, 0.46)', or '' for reports without it."""
    rows = [result.get(r, {}).get("edit", {}) for r in (before, after)]
    if not all("edit_copy_prob" in r for r in rows):
        return ""
    return ("; the source's code where the edit keeps it, teacher-forced: p "
            f"{_p(rows[0]['edit_copy_prob'])} before SFT, {_p(rows[1]['edit_copy_prob'])} after "
            f"(the first code {_p(rows[0].get('edit_first_copy_prob'))}, "
            f"{_p(rows[1].get('edit_first_copy_prob'))})")


def _p(value: float | None) -> str:
    """A probability to two places; "n/a" for none (a mean over no edits: null in JSON)."""
    return "n/a" if value is None else f"{value:.2f}"


def _by_question_type(row: dict) -> str:
    """'; right by question type: color 12/14, count 8/11, ...' from a VQA row's
    `vqa_exact_match/<type>` and `vqa_questions/<type>` (empty when it has none)."""
    parts = []
    for kind in shapes_language.VQA_TYPES:
        asked = row.get(f"vqa_questions/{kind}")
        if asked:
            right = round(row[f"vqa_exact_match/{kind}"] * asked)
            parts.append(f"{kind} {right}/{asked}")
    return f"; right by question type: {', '.join(parts)}" if parts else ""
