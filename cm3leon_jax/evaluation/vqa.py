"""VQAv2 accuracy with the official answer normalization (Antol et al. 2015; the VQA
evaluation script's rules).

    vqa_accuracy("two", ["2"] * 6 + ["3"] * 4)   # 1.0
    vqa_score(predictions, answer_lists)         # mean accuracy over questions, x100

Accuracy of one answer against the 10 annotators' answers: for each annotator, the
answer is compared with the other nine, scoring min(#matches / 3, 1); the ten scores
are averaged: an answer given by 4 or more annotators scores 1; by 3, 0.9; by 2, 0.6;
by 1, 0.3. The formula assumes VQAv2's 10 answers; with one true answer, use
`shapes_scores.vqa_exact_match`.

Normalization, as the official script does it:
- punctuation: each of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when it
  touches a space (or when the text has a digit-comma-digit), otherwise becomes a space;
  a period not followed by a digit is deleted ("2.5" stays, "yes." -> "yes"), the first
  32 of them;
- lower case; number words "none", "zero" .. "ten" -> digits; articles a/an/the dropped;
- contractions without their apostrophe are restored ("dont" -> "don't").
Scoring reproduces the current official script (GT-Vision-Lab/VQA, vqaEval.py at a013f00,
"Fixed processing answers bug", 2021), so scores match the evaluation server:
answers and prediction lose only line breaks, tabs and outer spaces; when the annotators
disagree, both the annotators' answers and the prediction are normalized fully, and when
they all agree nothing more is done ("Two" against ten "2" scores 0, "2" scores 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cm3leon_jax.errors import UserInputError

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a misspelt look-behind,
# so in effect a period is stripped whenever no digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# It also passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
_PERIOD_COUNT = 32

# The official table: answers typed without an apostrophe -> the contraction.
CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't
itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's
shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've
whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've
y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've""".split())


def strip_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_words(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _spaces(answer: str) -> str:
    """Line breaks and tabs -> spaces, outer spaces stripped (all the official script does
    to answers that every annotator gave alike)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize(answer: str) -> str:
    """An answer as the official script compares it when the annotators disagree."""
    return normalize_words(strip_punctuation(_spaces(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotators' answers (10 in
    VQAv2): the mean over leave-one-out subsets of min(#matches / 3, 1), normalized as the
    current official script does (module docstring)."""
    if isinstance(answers, str):
        raise UserInputError(f"answers must be the list of annotator answers, got {answers!r}.")
    if len(answers) < 2:
        raise UserInputError(
            f"vqa_accuracy got {len(answers)} annotator answer(s) {list(answers)!r}; its "
            "leave-one-out formula needs several (VQAv2 has 10): score one true answer with "
            "shapes_scores.vqa_exact_match.")
    answers = [_spaces(a) for a in answers]
    pred = _spaces(prediction)
    if len(set(answers)) > 1:
        answers = [normalize(a) for a in answers]
        pred = normalize(pred)
    scores = []
    for i in range(len(answers)):
        matches = sum(a == pred for j, a in enumerate(answers) if j != i)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean accuracy over questions, x100 (the number VQAv2 tables report)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
    if not predictions:
        raise ValueError("no VQA predictions to score.")
    return 100.0 * sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(
        predictions)
