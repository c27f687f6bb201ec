"""Exact SFT family scores: every ground-truth output scores 1, wrong outputs score 0."""

import numpy as np
import pytest

from cm3leon_jax.data import sft_examples, sft_prompts
from cm3leon_jax.evaluation import sft_families


@pytest.mark.parametrize("family", sft_prompts.FAMILIES)
def test_the_true_output_is_exact_and_a_wrong_one_is_not(family):
    examples = [sft_examples.corpus_example(0, "test", i, 32, family) for i in range(6)]
    scorer = (sft_families.score_text if family in sft_prompts.TEXT_FAMILIES
              else sft_families.score_image)
    for ex in examples:
        assert scorer(family, ex.output, ex)["exact"] == 1.0, ex.doc_id
    # Another example's output (a different scene, word or answer) fails at least once.
    wrong = [scorer(family, b.output, a)["exact"] for a, b in zip(examples, examples[1:])]
    assert min(wrong) == 0.0
    if family in sft_prompts.IMAGE_FAMILIES:
        blank = np.full_like(examples[0].output, 128)
        assert scorer(family, blank, examples[0])["exact"] == 0.0


def test_vqa_answers_are_normalized_as_the_eval_runs_are():
    """The per-family VQA score and the eval run's `vqa_exact_match` read answers alike:
    "1" is "one", articles and a final period do not count."""
    count = next(ex for i in range(40)
                 for ex in [sft_examples.corpus_example(0, "test", i, 32, "vqa")]
                 if ex.truth["answer"] == "one")
    shape = next(ex for i in range(40)
                 for ex in [sft_examples.corpus_example(0, "test", i, 32, "vqa")]
                 if ex.truth["answer"] == "circle")
    for answer in ("1", "One.", "one"):
        assert sft_families.score_text("vqa", answer, count)["exact"] == 1.0, answer
    assert sft_families.score_text("vqa", "a circle", shape)["exact"] == 1.0
    assert sft_families.score_text("vqa", "two", count)["exact"] == 0.0
