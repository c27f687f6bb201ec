"""CLIP score: how well an image matches its caption, 100 * max(cos(image, text), 0).

    scorer = ClipScorer.load("runs/demo/retrieval_encoder")   # or an OpenAI CLIP HF folder
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

from cm3leon_jax.retrieval.encoder import DocumentEncoder


def clip_scores_from_vectors(image_vectors: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    """f32[n, d] unit image vectors, f32[n, d] unit text vectors -> f32[n] pair scores."""
    cos = np.sum(np.asarray(image_vectors) * np.asarray(text_vectors), axis=-1)
    return 100.0 * np.maximum(cos, 0.0)


class ClipScorer:
    """An encoder's image-caption agreement; also the ranking function of re-ranking."""

    def __init__(self, encoder: DocumentEncoder):
        self.encoder = encoder

    @classmethod
    def load(cls, directory: str) -> ClipScorer:
        """A HF-layout CLIP folder (config.json, *.safetensors, a tokenizer)."""
        return cls(DocumentEncoder.load(directory))

    def scores(self, images: Any, captions: Sequence[str]) -> np.ndarray:
        """uint8[n, h, w, 3] images and n captions -> f32[n], image i against caption i."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score needs one caption per image: {len(images)} images, "
                             f"{len(captions)} captions.")
        if not len(captions):
            return np.zeros([0], np.float32)
        return clip_scores_from_vectors(self.encoder.embed_images(list(images)),
                                        self.encoder.embed_texts(list(captions)))

    def score(self, images: Any, captions: Sequence[str]) -> float:
        """The mean CLIP score over the pairs."""
        return float(np.mean(self.scores(images, captions)))
