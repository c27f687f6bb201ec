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
