"""VQAv2 accuracy: the official normalization and leave-one-out scoring, worked by hand."""

import pytest

from cm3leon_jax.evaluation import vqa


@pytest.mark.parametrize("raw, want", [
    ("a dog.", "dog"),                     # period stripped, article dropped
    ("Dont know", "don't know"),           # lower case, contraction restored
    ("2,000", "2000"),                     # digit-comma-digit: punctuation deleted
    ("black-and-white", "black and white"),  # '-' touching no space becomes a space
    ("yes, definitely", "yes definitely"),   # ',' touching a space is deleted
    ("2.5", "2.5"), ("3.", "3"),           # only periods not followed by a digit go
    ("None", "0"), ("the Two  cats", "2 cats"),
    ("what is (this)?", "what is this"),
])
def test_normalization(raw, want):
    assert vqa.normalize(raw) == want


def test_leave_one_out_accuracy_by_hand():
    # k annotators agree with the answer: leaving one of them out leaves k - 1 matches,
    # leaving out one of the 10 - k others leaves k; each subset scores min(m / 3, 1).
    # k = 1: (1*0 + 9*(1/3)) / 10 = 0.3;  k = 2: (2/3 + 8*2/3) / 10 = 0.6;
    # k = 3: (3*2/3 + 7*1) / 10 = 0.9;    k = 4: 1.0.
    for k, want in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        answers = ["yes"] * k + ["no"] * (10 - k)
        assert vqa.vqa_accuracy("Yes", answers) == pytest.approx(want)
    assert vqa.vqa_accuracy("Two", ["2"] * 10) == 1.0
    # Disagreeing annotators: their punctuation is cleaned ("t-shirt" -> "t shirt").
    assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert vqa.vqa_score(["yes", "Two"], [["yes"] * 2 + ["no"] * 8, ["2"] * 10]) == \
        pytest.approx(100 * (0.6 + 1.0) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="list of annotator answers"):
        vqa.vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        vqa.vqa_score(["a", "b"], [["a"]])
