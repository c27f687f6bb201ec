"""Captioning metrics through pycocoevalcap on fixtures worked out by hand."""

import math
import shutil

import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import captioning

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")


def test_ptb_tokenizer_lowercases_and_drops_punctuation():
    out = captioning.tokenize({0: ["A red circle, on a table."], 1: ["Two stars!"]})
    assert out == {0: ["a red circle on a table"], 1: ["two stars"]}


def test_line_breaks_inside_a_caption_keep_every_caption_on_its_image():
    # Java's tokenizer ends a line at each of these; one caption must stay one line.
    breaks = ["\r", "\r\n", "\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x85"]
    captions = {i: [f"a red{b}circle", "a  blue\tsquare"] for i, b in enumerate(breaks)}
    captions[len(breaks)] = ["two green triangles"]
    out = captioning.tokenize(captions)
    assert out == {**{i: ["a red circle", "a blue square"] for i in range(len(breaks))},
                   len(breaks): ["two green triangles"]}
    assert captioning.tokenize({}) == {}
    refs = [["a red circle"], ["a blue square"], ["two green triangles"]]
    clean = captioning.caption_metrics(["a red circle", "a blue square", "two green triangles"],
                                       refs, ("CIDEr-D",))
    broken = captioning.caption_metrics(["a red circle\r", "a blue\u2028square",
                                         "two green triangles"], refs, ("CIDEr-D",))
    assert broken == clean


def test_bleu_and_rouge_by_hand():
    # hyp  "a red circle on a table" vs ref "a red circle on the table" (6 tokens each):
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty, so
    # BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4).
    # ROUGE-L: LCS "a red circle on table" = 5, P = R = 5/6, so F(beta=1.2) = 5/6.
    got = captioning.caption_metrics(["A red circle on a table."],
                                     [["a red circle on the table"]],
                                     metrics=("BLEU-1", "BLEU-4", "ROUGE-L"))
    assert got["BLEU-1"] == pytest.approx(5 / 6, rel=1e-6)
    assert got["BLEU-4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
    assert got["ROUGE-L"] == pytest.approx(5 / 6, rel=1e-6)


def test_cider_d_by_hand_and_meteor_bounds():
    # Two images whose references share only "a" (document frequency 2: idf 0) and "the".
    # CIDEr-D weighs each n-gram by log(2 / df); a hypothesis equal to its reference has
    # cosine 1 for n = 1..4 and no length penalty -> 10 * mean(1, 1, 1, 1) = 10; one with
    # no n-gram of its reference scores 0. The corpus score is the mean over images.
    refs = [["a red circle on the table"], ["a blue star in the sky"]]
    exact = captioning.caption_metrics(["a red circle on the table", "a blue star in the sky"],
                                       refs)
    assert exact["CIDEr-D"] == pytest.approx(10.0, rel=1e-6)
    half = captioning.caption_metrics(["a red circle on the table", "green squares everywhere"],
                                      refs, metrics=("CIDEr-D", "METEOR"))
    assert half["CIDEr-D"] == pytest.approx(5.0, rel=1e-6)
    # METEOR: an exact match loses only its fragmentation penalty (1 chunk of 6 words).
    assert 0.9 < exact["METEOR"] <= 1.0 and half["METEOR"] < exact["METEOR"]
    assert exact["BLEU-4"] == pytest.approx(1.0, rel=1e-6) and math.isfinite(half["METEOR"])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2 predictions for 1 reference sets"):
        captioning.caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 0: references must be a non-empty list"):
        captioning.caption_metrics(["a"], ["a red circle"])
    with pytest.raises(ValueError, match="unknown caption metrics"):
        captioning.caption_metrics(["a"], [["a"]], metrics=("SPICE",))


def test_missing_java_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    # A user's setup to fix (exit status 2, one line), not a bug: UserInputError.
    with pytest.raises(UserInputError, match="install a JRE.*caption_metrics=\\[\\]"):
        captioning.caption_metrics(["a"], [["a"]])
