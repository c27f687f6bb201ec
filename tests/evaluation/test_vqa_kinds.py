"""benchmarks/vqa_kinds.py: what kind of word the decoder's likeliest answer is, and whether
the true answer leads the words of its own kind."""

import numpy as np
import pytest

from benchmarks import vqa_kinds


def _scores(favourites: list[dict[str, float]]) -> np.ndarray:
    """One row per question: every candidate at -10 except the words given."""
    rows = np.full((len(favourites), len(vqa_kinds.CANDIDATES)), -10.0, np.float32)
    for row, words in zip(rows, favourites):
        for word, score in words.items():
            row[vqa_kinds.CANDIDATES.index(word)] = score
    return rows


def test_a_decoder_that_reads_the_texture_but_answers_a_color():
    questions = ["What is the background like?"] * 2 + ["What color is the circle?"]
    truths = ["striped", "plain", "red"]
    scores = _scores([{"blue": -1.0, "striped": -2.0, "plain": -3.0},  # Reads it, says blue.
                      {"red": -1.0, "striped": -2.0, "plain": -3.0},   # Reads it wrong.
                      {"red": -0.5}])
    result = vqa_kinds.kind_table(questions, truths, scores)
    assert result["background"] == {"questions": 2, "top_right": 0, "top_of_right_kind": 0,
                                    "right_within_kind": 1, "commonest_answer": 1,
                                    "top_kinds": {"color": 2}}
    assert result["color"] == {"questions": 1, "top_right": 1, "top_of_right_kind": 1,
                               "right_within_kind": 1, "commonest_answer": 1,
                               "top_kinds": {"color": 1}}
    lines = vqa_kinds.table(result).splitlines()
    assert lines[2] == "| color | 1 | 1 | 1 | 1 | 1 | color 1 |"  # VQA_TYPES' order.
    assert lines[3] == "| background | 2 | 0 | 0 | 1 | 1 | color 2 |"


def test_the_commonest_answer_is_the_prior_to_read_against():
    questions = ["How many shapes are there?"] * 3
    result = vqa_kinds.kind_table(questions, ["one", "one", "two"],
                                  _scores([{"one": -1.0}] * 3))
    assert result["count"]["right_within_kind"] == result["count"]["commonest_answer"] == 2


def test_the_candidates_cover_every_answer_the_corpus_gives():
    from cm3leon_jax.data import shapes, shapes_language
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for _, answer in shapes_language.vqa_pairs(shapes.sample_scene(rng, 32), rng):
            assert answer in vqa_kinds.KIND_OF


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"need log-likelihoods \[1, "):
        vqa_kinds.kind_table(["How many shapes are there?"], ["two"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="'seven' to 'How many shapes are there\\?' is not"):
        vqa_kinds.kind_table(["How many shapes are there?"], ["seven"],
                             np.zeros((1, len(vqa_kinds.CANDIDATES))))
