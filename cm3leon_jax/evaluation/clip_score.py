"""CLIP score: how well an image matches its caption, 100 * max(cos(image, text), 0).

    scorer = ClipScorer.load("runs/demo/retriever/encoder")   # or an OpenAI CLIP HF folder
    s = scorer.scores(images, captions)                       # f32[n], one per pair
    scorer.score(images, captions)                            # their mean (the usual report)

The score of Hessel et al. 2021 without its w = 2.5 rescaling (as torchmetrics and most
text-to-image papers report it). Any `retrieval.encoder.DocumentEncoder` works: the
project's trained retrieval encoder, or OpenAI's CLIP ViT-B/32 weights in the Hugging
Face layout, read by the same importer (`retrieval/clip_weights.py`). Scores from
different encoders are not comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cm3leon_jax.decode import rerank
from cm3leon_jax.decode.rerank import clip_scores_from_vectors
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval.encoder import DocumentEncoder

__all__ = ["ClipScorer", "clip_scores_from_vectors"]


class ClipScorer(rerank.ClipRanker):
    """An encoder's image-caption agreement (the same score re-ranking keeps the best by)."""

    @classmethod
    def load(cls, directory: str) -> ClipScorer:
        """A HF-layout CLIP folder (config.json, *.safetensors, a tokenizer)."""
        return cls(DocumentEncoder.load(directory))

    def score(self, images: Any, captions: Sequence[str]) -> float:
        """The mean CLIP score over the pairs (at least one)."""
        scores = self.scores(images, captions)
        if not scores.size:
            raise UserInputError("ClipScorer.score got no image-caption pairs; the mean of "
                                 "none is undefined: give at least one.")
        return float(np.mean(scores))
