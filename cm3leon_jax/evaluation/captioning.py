"""Captioning metrics as the COCO caption evaluation computes them: BLEU-1..4, METEOR,
ROUGE-L and CIDEr-D, through pycocoevalcap and its Stanford PTB tokenizer.

    caption_metrics(["a red circle ."], [["A red circle.", "a circle that is red"]])
    # {"BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr-D": ..., "BLEU-1": ...}

Every caption (predictions and references) is first tokenized by the PTB tokenizer
(lower-cased, punctuation dropped), as on the COCO leaderboard. pycocoevalcap's `Cider`
is CIDEr-D (clipped n-gram counts, Gaussian length penalty with sigma 6, x10), with
document frequencies taken from the references of the evaluated set, so a score depends
on the whole set, as in the paper's COCO numbers (CIDEr 61.6 for CM3Leon 7B SFT).
Scores are on pycocoevalcap's scale (0-1 for BLEU/METEOR/ROUGE-L; CIDEr-D up to 10);
the paper's tables multiply by 100.

The tokenizer and METEOR are Java programs shipped inside pycocoevalcap: `java` must be
on PATH (a JRE 8 or newer).
"""

from __future__ import annotations

import functools
import importlib.resources
import shutil
import subprocess
from collections.abc import Sequence

from cm3leon_jax.errors import MissingInputError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def require_java() -> None:
    """Raises one clear error when the Java runtime pycocoevalcap needs is missing."""
    if shutil.which("java") is None:
        raise MissingInputError("captioning metrics need Java (pycocoevalcap runs the Stanford PTB "
                           "tokenizer and METEOR as Java programs) but `java` is not on PATH: "
                           "install a JRE, e.g. `apt-get install default-jre-headless`, or "
                           "leave them out (evaluate.caption_metrics=[]).")


def tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """{id: [caption, ...]} -> the same, PTB-tokenized, lower-cased, punctuation dropped.

    Every whitespace run becomes one space first: the Java tokenizer reads one caption a
    line and also ends lines at "\\r", U+2028 and the like, which would move every later
    caption onto another image.
    """
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
    ids = [k for k, v in captions.items() for _ in v]
    lines = _ptb_lines([" ".join(c.split()) for v in captions.values() for c in v])
    out: dict[int, list[str]] = {}
    for k, line in zip(ids, lines):
        out.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ")
                                              if w not in PUNCTUATIONS))
    return out


def _ptb_lines(lines: list[str]) -> list[str]:
    """pycocoevalcap's Stanford PTB tokenizer (its flags) on one caption a line, read from
    stdin; raises unless it gives back one line per caption."""
    if not lines:
        return []
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = str(importlib.resources.files("pycocoevalcap.tokenizer")
              / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)  # The jar the package ships.
    done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                           "-preserveLines", "-lowerCase"], input="\n".join(lines).encode(),
                          capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the PTB tokenizer (java) failed with status {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    out = done.stdout.decode().split("\n")
    if len(out) != len(lines):
        raise RuntimeError(f"the PTB tokenizer gave {len(out)} lines for {len(lines)} "
                           "captions; the captions would be scored against other images.")
    return out


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR Java process per Python process: it takes seconds to load its paraphrase
    table, and an eval run scores captions once per decoding strategy."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference "
                         "sets; give one prediction and its references per image.")
    if not predictions:
        raise ValueError("no captions to score.")
    for i, (p, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs or not all(r.strip() for r in refs):
            raise ValueError(f"image {i}: references must be a non-empty list of non-empty "
                             f"strings, got {refs!r}.")
        if not isinstance(p, str):
            raise TypeError(f"image {i}: the prediction is {p!r}, not a string.")


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Corpus-level scores of predictions[i] against references[i] (lists of strings).

    metrics: any of METRICS (METEOR starts a Java process; leave it out to save seconds).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; known: {METRICS}.")
    _check(predictions, references)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts = tokenize({i: list(r) for i, r in enumerate(references)})
    # An empty prediction stays one (empty) hypothesis: the scorers need one per image.
    res = tokenize({i: [p if p.strip() else "."] for i, p in enumerate(predictions)})
    out: dict[str, float] = {}
    if any(m.startswith("BLEU") for m in metrics):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)})
    if "METEOR" in metrics:
        out["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr-D" in metrics:
        out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return {m: out[m] for m in metrics}
