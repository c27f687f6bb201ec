r"""What kind of word a demo decoder answers each VQA question with, and whether it reads
the answer.

    python benchmarks/vqa_kinds.py --run=runs/demo [--decoder=sft] [--json=OUT.json]

For each VQA question of the run's evaluate stage (`MODEL_DIR/pictures/evaluated.npz`: the
test scenes' images, questions and true answers), the decoder scores every one-word answer
the corpus uses (`ANSWER_KINDS`: colors, shapes, background textures, counts, yes / no)
after the SFT prompt (`data/sft_prompts.py`: `image <break> Question: q <break>`), by its
own likelihood (`evaluation/likelihood.py`). Per question type (`shapes_language.VQA_TYPES`)
it reports how often

  * its likeliest word is the true answer (what greedy decoding answers, for a one-word
    answer),
  * that word is of the true answer's kind (a color for a color question, ...),
  * the true answer is the likeliest word of its kind: whether the decoder reads the image
    for the question, whatever kind of word it would say; beside it, how many of the type's
    questions its commonest true answer would get (a decoder that always picks "plain" for
    the background has read nothing).

The evaluate stage's exact match cannot tell a decoder that does not read the image from
one that reads it and answers from the wrong list (benchmarks/RESULTS_sft.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm3leon_jax.data import shapes, shapes_language  # noqa: E402

ANSWER_KINDS: dict[str, tuple[str, ...]] = {
    "color": tuple(shapes.COLORS),
    "shape": tuple(shapes.KINDS),
    "texture": tuple(shapes_language.TEXTURE_WORDS.values()),
    "count": shapes_language.NUMBER_WORDS[1:],
    "yes/no": ("yes", "no"),
}
CANDIDATES: tuple[str, ...] = tuple(w for words in ANSWER_KINDS.values() for w in words)
KIND_OF: dict[str, str] = {w: kind for kind, words in ANSWER_KINDS.items() for w in words}


def kind_table(questions: Sequence[str], truths: Sequence[str], log_likelihoods: np.ndarray
               ) -> dict[str, dict]:
    """Per question type: `questions`, `top_right`, `top_of_right_kind`,
    `right_within_kind`, `commonest_answer` (how many its most frequent true answer would
    get: the prior to read `right_within_kind` against) and `top_kinds` ({kind: count} of the
    likeliest words).

    log_likelihoods: f32[len(questions), len(CANDIDATES)], log p(word | image, question).
    Raises ValueError for a true answer that is not one of `CANDIDATES`.
    """
    log_likelihoods = np.asarray(log_likelihoods)
    if log_likelihoods.shape != (len(questions), len(CANDIDATES)) or len(truths) != len(questions):
        raise ValueError(f"vqa_kinds: {len(questions)} questions and {len(truths)} answers "
                         f"need log-likelihoods [{len(questions)}, {len(CANDIDATES)}], got "
                         f"{log_likelihoods.shape}.")
    out: dict[str, dict] = {}
    for question, truth, row in zip(questions, truths, log_likelihoods):
        if truth not in KIND_OF:
            raise ValueError(f"vqa_kinds: the answer {truth!r} to {question!r} is not a "
                             f"candidate word; the candidates are {CANDIDATES}.")
        entry = out.setdefault(shapes_language.vqa_question_type(question), {
            "questions": 0, "top_right": 0, "top_of_right_kind": 0, "right_within_kind": 0,
            "answers": collections.Counter(), "top_kinds": collections.Counter()})
        top = CANDIDATES[int(np.argmax(row))]
        same = [i for i, w in enumerate(CANDIDATES) if KIND_OF[w] == KIND_OF[truth]]
        entry["questions"] += 1
        entry["top_right"] += top == truth
        entry["top_of_right_kind"] += KIND_OF[top] == KIND_OF[truth]
        entry["right_within_kind"] += CANDIDATES[same[int(np.argmax(row[same]))]] == truth
        entry["top_kinds"][KIND_OF[top]] += 1
        entry["answers"][truth] += 1
    for entry in out.values():
        entry["commonest_answer"] = max(entry.pop("answers").values())
        entry["top_kinds"] = dict(entry["top_kinds"])
    return out


def table(result: dict[str, dict]) -> str:
    """`kind_table`'s counts as a markdown table, in `shapes_language.VQA_TYPES`' order."""
    lines = ["| question type | asked | likeliest word right | of the right kind | "
             "right among its kind | its commonest answer | kinds of the likeliest word |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for kind in shapes_language.VQA_TYPES:
        if kind in result:
            e = result[kind]
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(e["top_kinds"].items()))
            lines.append(f"| {kind} | {e['questions']} | {e['top_right']} | "
                         f"{e['top_of_right_kind']} | {e['right_within_kind']} | "
                         f"{e['commonest_answer']} | {kinds} |")
    return "\n".join(lines)


def measure(run: str, decoder: str) -> dict[str, dict]:
    """`kind_table` of `run`'s `decoder` ("sft" or "pretrain") on its evaluated questions."""
    from cm3leon_jax.data import sft_prompts
    from cm3leon_jax.decode import restore
    from cm3leon_jax.evaluation import likelihood
    from cm3leon_jax.vocab import image_tokenizer
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

    path = os.path.join(run, "pictures", "evaluated.npz")
    if not os.path.exists(path):
        raise SystemExit(f"vqa_kinds: no {path}; run the demo (make demo) into {run} first.")
    saved = np.load(path, allow_pickle=True)
    questions = [str(q) for q in saved["vqa_questions"]]
    truths = [str(t) for t in saved["vqa_truths"]]
    tokenizer = image_tokenizer.load_image_tokenizer(
        checkpoint=os.path.join(run, "image_tokenizer"))
    vocab = MultimodalVocabulary(os.path.join(run, "data", "vocab"))
    config, params, _ = restore.restore_decoder(os.path.join(run, decoder))
    codes = tokenizer.encode(tokenizer.preprocess(np.asarray(saved["vqa_images"])))
    prompts, targets = [], []
    for image_codes, question in zip(codes, questions):
        prompt = sft_prompts.vqa(image_codes, question)
        ids = sft_prompts.prompt_ids(prompt, vocab)
        for word in CANDIDATES:
            prompts.append(ids)
            targets.append(sft_prompts.output_ids(prompt, word, vocab))
    scores = likelihood.sequence_log_likelihoods(config, params, prompts, targets)
    return kind_table(questions, truths, scores.reshape(len(questions), len(CANDIDATES)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a demo MODEL_DIR")
    parser.add_argument("--decoder", default="sft", choices=("sft", "pretrain"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = measure(args.run, args.decoder)
    print(f"{args.run} ({args.decoder}):\n{table(result)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
