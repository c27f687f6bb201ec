"""VQAv2 accuracy: the official normalization and leave-one-out scoring, worked by hand."""

import pytest

from cm3leon_jax.errors import UserInputError
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
        assert vqa.vqa_accuracy("yes", answers) == pytest.approx(want)
    # Disagreeing annotators: their answers are normalized fully ("t-shirt" -> "t shirt").
    assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert vqa.vqa_score(["yes", "2"], [["yes"] * 2 + ["no"] * 8, ["2"] * 10]) == \
        pytest.approx(100 * (0.6 + 1.0) / 2)


def test_the_current_official_script_normalizes_only_when_annotators_disagree():
    # vqaEval.py since 2021: with disagreeing annotators their answers lose articles and
    # number words too ("a dog" -> "dog": 7 annotators agree), and so does the prediction.
    assert vqa.vqa_accuracy("dog", ["a dog"] * 5 + ["dog"] * 2 + ["cat"] * 3) == 1.0
    assert vqa.vqa_accuracy("Two.", ["two"] * 3 + ["2"] * 2 + ["3"] * 5) == 1.0
    assert vqa.vqa_accuracy("white", ["white"] * 2 + ["a white"] * 4 + ["black"] * 4) == 1.0
    # With every annotator alike nothing is normalized but spaces: "Two" is not "2".
    assert vqa.vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert vqa.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert vqa.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # Its period rule stops after 32 periods (re.UNICODE passed as sub's count).
    assert vqa.normalize("." * 40 + "x") == "." * 8 + "x"


def test_bad_inputs():
    with pytest.raises(ValueError, match="list of annotator answers"):
        vqa.vqa_accuracy("yes", "yes")
    for answers in ([], ["red"]):
        with pytest.raises(UserInputError, match=rf"got {len(answers)} annotator answer.*"
                                                 r"VQAv2 has 10.*vqa_exact_match"):
            vqa.vqa_accuracy("red", answers)
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        vqa.vqa_score(["a", "b"], [["a"]])
