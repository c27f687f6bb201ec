"""Best-of-N text-to-image: draw N samples per prompt, keep the one CLIP scores best.

    ranker = ClipRanker(DocumentEncoder.load("runs/demo/retriever/encoder"))
    best = best_of(gen, captions, num_samples=8, ranker=ranker,
                   samplings=(SamplingConfig(top_p=0.9), SamplingConfig(guidance="cdk")))
    best.images.images        # uint8[n_prompts, s, s, 3], the kept sample of each prompt
    best.scores, best.kept    # f32[n_prompts, N] every sample's score, int[n_prompts] its arg-max

The paper draws 8 samples per prompt, keeps the best by CLIP score, and finds that
mixing top-p and CD-K samples helps: sample j of a prompt uses `samplings[j % K]`.
The ranker is any `scores(images uint8[n, h, w, 3], captions) -> f32[n]`; `ClipRanker`
is the CLIP score 100 * max(cos, 0) of a retrieval `DocumentEncoder` (the project's
trained retrieval encoder, or OpenAI CLIP weights through `retrieval/clip_weights.py`).
With N = 1 nothing is dropped: the result is exactly the plain sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from cm3leon_jax.errors import UserInputError

Ranker = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def clip_scores_from_vectors(image_vectors: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    """f32[n, d] unit image vectors, f32[n, d] unit text vectors -> f32[n] 100 * max(cos, 0)."""
    cos = np.sum(np.asarray(image_vectors) * np.asarray(text_vectors), axis=-1)
    return 100.0 * np.maximum(cos, 0.0)


class ClipRanker:
    """CLIP score of image i against caption i with a retrieval `DocumentEncoder`."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    def scores(self, images: Any, captions: Sequence[str]) -> np.ndarray:
        """uint8[n, h, w, 3] and n captions -> f32[n]."""
        if isinstance(captions, str):
            raise UserInputError(f"captions is one string ({captions[:40]!r}); give a list, "
                                 "one caption per image.")
        if len(images) != len(captions):
            raise ValueError(f"CLIP score needs one caption per image: {len(images)} images, "
                             f"{len(captions)} captions.")
        if not len(captions):
            return np.zeros([0], np.float32)
        return clip_scores_from_vectors(self.encoder.embed_images(list(images)),
                                        self.encoder.embed_texts(list(captions)))

    __call__ = scores


class Reranked(NamedTuple):
    """images: the generator's `Images` with one (kept) row per prompt; scores:
    f32[n_prompts, N] of every sample; kept: int[n_prompts], the arg-max sample index."""

    images: Any
    scores: np.ndarray
    kept: np.ndarray


def keep_best(out: Any, num_samples: int, ranker: Ranker) -> Reranked:
    """`Images` with `num_samples` prompt-major rows per prompt -> the best row of each."""
    if out.images is None:
        raise ValueError("re-ranking scores pixels: give the Generator an image_tokenizer.")
    n = len(out.codes) // num_samples
    scores = np.asarray(ranker(out.images, out.captions), np.float32).reshape(n, num_samples)
    kept = scores.argmax(axis=1)  # Ties go to the earliest sample.
    rows = np.arange(n) * num_samples + kept
    best = out._replace(codes=out.codes[rows], images=out.images[rows],
                        captions=[out.captions[r] for r in rows])
    return Reranked(best, scores, kept)


def best_of(gen: Any, captions: Sequence[str], *, num_samples: int, ranker: Ranker,
            samplings: Sequence[Any] = (None,), num_retrieved: int = 2,
            seed: int = 0, negative_captions: Sequence[str] | None = None,
            chunk: int = 256) -> Reranked:
    """`num_samples` samples per caption from `gen.text_to_image`, sample j drawn with
    `samplings[j % len(samplings)]` (None: the generator's default), the best kept;
    `negative_captions` go to every draw; the samples of `samplings[i]` are drawn with
    `part_seed(seed, i)`.

    Captions are drawn `chunk` at a time, only each one's best kept between chunks (FID-30K
    with 8 samples would otherwise hold 240,000 images); each chunk's rows continue the
    random streams where the last chunk's ended (`first_row`), so the samples are those of
    one call, whatever `chunk` is.
    """
    if num_samples < 1 or not samplings or chunk < 1:
        raise ValueError(f"best_of needs num_samples >= 1, at least one sampling config and "
                         f"chunk >= 1, got {num_samples}, {len(samplings)} and {chunk}.")
    if isinstance(captions, str) or not len(captions):
        raise UserInputError(f"best_of needs a non-empty list of captions, got {captions!r}.")
    kept = []
    for start in range(0, len(captions), chunk):
        negatives = (None if negative_captions is None
                     else negative_captions[start:start + chunk])
        kept.append(_best_of_chunk(gen, captions[start:start + chunk], num_samples, ranker,
                                   samplings, num_retrieved, seed, negatives, start))
    if len(kept) == 1:
        return kept[0]
    first = kept[0].images
    best = first._replace(
        codes=np.concatenate([r.images.codes for r in kept]),
        images=None if first.images is None else np.concatenate([r.images.images for r in kept]),
        captions=[c for r in kept for c in r.images.captions])
    return Reranked(best, np.concatenate([r.scores for r in kept]),
                    np.concatenate([r.kept for r in kept]))


def part_seed(seed: int, part: int) -> int:
    """The seed part `part` (the samples of `samplings[part]`) of `best_of` draws with: part
    0 `seed` itself (one sampling draws what a plain `text_to_image` would), every other part
    a 32-bit seed that np.random.SeedSequence derives from (seed, part), so that parts of
    different seeds do not repeat each other's samples (with seed + part, seed s's part 1
    was seed s + 1's part 0)."""
    if part == 0:
        return seed
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def _best_of_chunk(gen: Any, captions: Sequence[str], num_samples: int, ranker: Ranker,
                   samplings: Sequence[Any], num_retrieved: int, seed: int,
                   negative_captions: Sequence[str] | None, first_caption: int) -> Reranked:
    """`best_of` for the captions from index `first_caption` of the whole list on."""
    k = min(len(samplings), num_samples)
    parts = []
    for i in range(k):
        count = len(range(i, num_samples, k))
        parts.append(gen.text_to_image(captions, num_samples=count, num_retrieved=num_retrieved,
                                       sampling=samplings[i], seed=part_seed(seed, i),
                                       negative_captions=negative_captions,
                                       first_row=first_caption * count))
    # Interleave into prompt-major order: prompt p, sample j = part j % k, its (j // k)-th.
    order = [(j % k, p * len(range(j % k, num_samples, k)) + j // k)
             for p in range(len(captions)) for j in range(num_samples)]
    codes = np.stack([parts[i].codes[r] for i, r in order])
    images = (None if parts[0].images is None
              else np.stack([parts[i].images[r] for i, r in order]))
    merged = parts[0]._replace(codes=codes, images=images,
                               captions=[c for c in captions for _ in range(num_samples)])
    return keep_best(merged, num_samples, ranker)
