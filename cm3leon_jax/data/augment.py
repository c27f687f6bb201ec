"""Retrieval-augmented training examples: `retrieved_1 <eos> ... retrieved_k <eos> query`.

For each query document the memory bank supplies a short, relevance-ordered
list of neighbor documents (three in the paper). Per example we draw how many
to use, k, from a configurable distribution, pick k of the candidates at
random, put them in front of the query, and then apply the CM3 transform to the
whole sequence. The loss is uniform over every token, retrieved documents
included; only sentinels and padding get weight 0 (see `cm3.py`).

Truncation is by whole documents: when the sequence would not fit, the last
chosen neighbors are dropped first; no document, and so no image span, is ever
cut. A query that cannot fit on its own is skipped, and the caller counts it.
Room is kept for the CM3 transform's overhead (3 tokens per span, at most
`max_spans` spans), so the transformed sequence always fits.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import gin
import numpy as np

from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.layout import IdLayout


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How examples are assembled.

    Attributes:
      seq_len: the packed length (4096 for the paper's configs).
      k_probs: P(k = 0), P(k = 1), ...: how many neighbors an example uses.
        The default always uses 2, drawn among the stored candidates (3 in the
        paper), which is also what inference uses.
      mean_spans: Poisson mean of CM3 spans (1 in the paper; 0 = causal LM).
      max_spans: cap on CM3 spans; 3 * max_spans tokens are held back so the
        transform never overflows. P(Poisson(1) > 8) is about 1e-6.
      neighbors_in_query_order: lay each caption-and-image neighbor out in the query's
        order (`document.in_order_of`) instead of its stored one; the model must then be
        served the same way (`Generator(neighbors_in_query_order=True)`). Our option; the
        paper does not say how it lays neighbors out.
    """

    seq_len: int = 4096
    k_probs: tuple[float, ...] = (0.0, 0.0, 1.0)
    mean_spans: float = 1.0
    max_spans: int = 8
    neighbors_in_query_order: bool = False

    def __post_init__(self):
        p = np.asarray(self.k_probs, np.float64)
        if p.ndim != 1 or p.size == 0 or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise UserInputError(
                f"AugmentConfig.k_probs must be probabilities of k = 0, 1, ... "
                f"summing to 1, got {self.k_probs}.")
        if self.seq_len <= 3 * self.max_spans:
            raise UserInputError(
                f"AugmentConfig.seq_len={self.seq_len} leaves no room after the "
                f"CM3 reserve of 3 * max_spans = {3 * self.max_spans} tokens.")

    @property
    def budget(self) -> int:
        """Tokens available to documents before the CM3 transform."""
        return self.seq_len - 3 * self.max_spans


def check_sentinels(config: AugmentConfig, vocabulary) -> None:
    """Raises UserInputError when `config.max_spans` spans could need more sentinels than the
    vocabulary has for CM3 (`MultimodalVocabulary.cm3_sentinels`; a layout's own count for
    another vocabulary): the example that draws them would fail mid-training instead of up
    front, or, in an imported Chameleon vocabulary, mask spans with its `<s>`."""
    if config.mean_spans <= 0:
        return
    layout_count = vocabulary.layout.num_sentinels
    available = getattr(vocabulary, "cm3_sentinels", layout_count)
    if available == 0 < layout_count:  # Its sentinels are there, and not CM3's.
        raise UserInputError(
            f"the vocabulary in {vocabulary.directory!r} has no CM3 sentinels (an imported "
            "Chameleon's: its one sentinel holds <s>, and Chameleon trained left to right), "
            f"so CM3's masked spans (mean {config.mean_spans}) cannot be written. Train left "
            "to right: bind retrieval_augment.mean_spans=0.0 (SFT: sft_cm3.mean_spans=0.0, "
            "with sft_cm3.loss_on='output' for the loss on the outputs only).")
    if config.max_spans > available:
        raise UserInputError(
            f"retrieval_augment.max_spans={config.max_spans} is more than the vocabulary's "
            f"{available} sentinels (preprocess.num_sentinels, in the data folder's "
            f"vocab/layout.json): each CM3 span needs its own. Bind retrieval_augment.max_spans "
            f"<= {available}, or preprocess into a new folder with more sentinels.")


def choose_neighbors(num_candidates: int, rng: np.random.Generator,
                      config: AugmentConfig) -> list[int]:
    """Indices of the neighbors to use, in their stored (relevance) order."""
    k = int(rng.choice(len(config.k_probs), p=np.asarray(config.k_probs)))
    k = min(k, num_candidates)
    return sorted(rng.choice(num_candidates, size=k, replace=False).tolist())


def assemble(query: np.ndarray, neighbors: Sequence[np.ndarray],
             budget: int) -> np.ndarray | None:
    """Joins neighbors and query with `<eos>`, dropping neighbors to fit.

    Args:
      query: int32[n] ids of the query document.
      neighbors: the chosen neighbors' ids, most relevant first.
      budget: the most tokens the result may have.

    Returns:
      int32[m] with m <= budget, or None when the query alone does not fit.
    """
    if query.size > budget:
        return None
    return document_lib.join_documents([*neighbors_that_fit(query.size, neighbors, budget),
                                        query])


def neighbors_that_fit(query_size: int, neighbors: Sequence[np.ndarray],
                       budget: int) -> list[np.ndarray]:
    """The most relevant neighbors (a prefix of `neighbors`) that fit `budget` tokens
    beside a query of `query_size`, each with its `<eos>`."""
    kept = list(neighbors)
    while kept and sum(n.size + 1 for n in kept) + query_size > budget:
        kept.pop()  # The least relevant goes first.
    return kept


def make_example(query: np.ndarray, candidates: Sequence[np.ndarray],
                 rng: np.random.Generator, layout: IdLayout,
                 config: AugmentConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """One training example: (tokens int32[m], loss_weights float32[m]), m <= seq_len.

    Returns None when the query cannot fit in `config.budget` tokens.
    """
    chosen = [np.asarray(candidates[i], np.int32)
              for i in choose_neighbors(len(candidates), rng, config)]
    if config.neighbors_in_query_order:
        chosen = [document_lib.in_order_of(n, query, layout) for n in chosen]
    ids = assemble(np.asarray(query, np.int32), chosen, config.budget)
    if ids is None:
        return None
    return cm3_lib.cm3(ids, rng, layout, mean_spans=config.mean_spans,
                       max_spans=config.max_spans)
