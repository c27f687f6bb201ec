"""Which retrieved candidates a query keeps: the CM3Leon / RA-CM3 rules, pure numpy.

Given a query's candidates from maximum inner product search (most relevant
first), `select` keeps up to k of them:

  1. never the query document itself (`exclude`);
  2. relevance (inner product with the query) above `max_relevance` (0.9 in the
     paper) means a near-duplicate of the query: skipped;
  3. multimodal documents go before unimodal ones (`prefer_multimodal`); within
     each group the order stays by relevance;
  4. a candidate whose inner product with one already chosen exceeds
     `max_redundancy` is skipped, so the k documents say different things.

Query dropout (the fourth rule of the paper: hide 20% of the query's tokens
before encoding it, in training only) is `dropout_keep_mask`; the encoder
applies it to text tokens and image patches.

With `by_modality` (the paper's "one by image, one by text"), a query that has both a
text and an image is searched twice, by its image's vector and by its text's, each
search selected by the rules above (rule 2 judged against the query's document vector,
the mean of the two, as without it), and `interleave` merges the two: the image search's
best, the text search's best, its next, and so on, skipping a document already picked or
redundant with one (rule 4). A query of one modality is searched by it alone.

Rows may come back with fewer than k picks; missing slots hold id -1 and score
-inf. The search over-fetches (`SelectionConfig.num_candidates`) and searches
short rows again deeper (`max_overfetch`, see retriever.py) so that this is rare.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from cm3leon_jax.errors import UserInputError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """The selection rules. Paper values by default; `k` = 2 at inference, 3 in training."""

    k: int = 3
    max_relevance: float = 0.9
    max_redundancy: float = 0.9
    prefer_multimodal: bool = True
    # Candidates searched per query: k * overfetch + 1 (the +1 is the query itself).
    overfetch: int = 4
    # Queries left with fewer than k picks are searched again, 4x deeper each time,
    # up to k * max_overfetch + 1 candidates: a corpus full of near-duplicates (the
    # synthetic one has dozens per document above 0.9) still yields k neighbors.
    max_overfetch: int = 128
    query_dropout: float = 0.2
    # Search a multimodal query by its image and by its text and interleave the picks (the
    # paper's "one by image, one by text"), instead of by the mean of the two.
    by_modality: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise UserInputError(f"SelectionConfig.k={self.k}; retrieve at least one document.")
        if not 1 <= self.overfetch <= self.max_overfetch:
            raise UserInputError(f"SelectionConfig needs 1 <= overfetch <= max_overfetch, got "
                                 f"{self.overfetch} and {self.max_overfetch}.")
        if not 0.0 <= self.query_dropout < 1.0:
            raise UserInputError(f"SelectionConfig.query_dropout={self.query_dropout} must be "
                                 "in [0, 1).")

    @property
    def num_candidates(self) -> int:
        return self.k * self.overfetch + 1


def select(cand_ids: np.ndarray, cand_scores: np.ndarray, cand_vectors: np.ndarray,
           cand_multimodal: np.ndarray, config: SelectionConfig,
           exclude: np.ndarray | None = None,
           relevance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Applies the rules to a batch of candidate lists.

    Args:
      cand_ids: int64[b, c] bank row ids, most relevant first; -1 = no candidate.
      cand_scores: f32[b, c] inner products with the query.
      cand_vectors: f32[b, c, d] the candidates' document vectors (for rule 4).
      cand_multimodal: bool[b, c] whether each candidate has text and image.
      config: the rules.
      exclude: int64[b] the query's own row id in the bank, or -1 (or None).
      relevance: f32[b, c] what rule 2 compares with `max_relevance` (None: `cand_scores`).
        A search by one modality of a query passes the candidates' inner products with the
        query's document vector, so that a copy of the query document, which one
        modality's vector alone may score below the bound, is still skipped.

    Returns:
      (ids int64[b, k], scores f32[b, k]) in the order chosen; -1 / -inf pad.
    """
    cand_ids = np.asarray(cand_ids, np.int64)
    b, c = cand_ids.shape
    for name, a, shape in (("cand_scores", cand_scores, (b, c)),
                           ("cand_multimodal", cand_multimodal, (b, c))):
        if np.shape(a) != shape:
            raise ValueError(f"select: {name} has shape {np.shape(a)}, expected {shape} "
                             "like cand_ids.")
    if np.shape(cand_vectors)[:2] != (b, c):
        raise ValueError(f"select: cand_vectors has shape {np.shape(cand_vectors)}, expected "
                         f"({b}, {c}, dim).")
    scores = np.asarray(cand_scores, np.float32)
    multimodal = np.asarray(cand_multimodal, bool)
    exclude = np.full([b], -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)

    if relevance is not None and np.shape(relevance) != (b, c):
        raise ValueError(f"select: relevance has shape {np.shape(relevance)}, expected "
                         f"{(b, c)} like cand_ids.")
    near = scores if relevance is None else np.asarray(relevance, np.float32)
    ok = (cand_ids >= 0) & (cand_ids != exclude[:, None]) & (near <= config.max_relevance)
    # Rule 3 as a stable sort: multimodal first, relevance order kept inside groups.
    key = (~multimodal).astype(np.int8) if config.prefer_multimodal else np.zeros((b, c), np.int8)
    order = np.argsort(key, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=1)
    ids, scores, ok = take(cand_ids), take(scores), take(ok)
    vectors = np.take_along_axis(np.asarray(cand_vectors, np.float32), order[..., None], axis=1)

    k = config.k
    out_ids = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    picked = np.zeros((b, k, vectors.shape[-1]), np.float32)
    count = np.zeros([b], np.int64)
    rows = np.arange(b)
    # ok_after[:, j]: usable candidates from column j on; lets the loop stop early.
    ok_after = np.concatenate([np.cumsum(ok[:, ::-1], axis=1)[:, ::-1], np.zeros((b, 1), int)], 1)
    for j in range(c):  # greedy, vectorized over the batch; O(c * k * d)
        open_rows = count < k
        if not (open_rows & (ok_after[:, j] > 0)).any():
            break
        sim = np.einsum("bkd,bd->bk", picked, vectors[:, j])
        redundant = ((sim > config.max_redundancy) & (np.arange(k)[None] < count[:, None])).any(1)
        pick = ok[:, j] & open_rows & ~redundant
        r, slot = rows[pick], count[pick]
        out_ids[r, slot], out_scores[r, slot] = ids[r, j], scores[r, j]
        picked[r, slot] = vectors[r, j]
        count += pick
    return out_ids, out_scores


def interleave(first: tuple[np.ndarray, np.ndarray, np.ndarray],
               second: tuple[np.ndarray, np.ndarray, np.ndarray], k: int,
               max_redundancy: float) -> tuple[np.ndarray, np.ndarray]:
    """Merges two selections of the same queries, alternately: the first's best, the
    second's best, the first's next, ...; a document already picked, or whose inner
    product with a picked one exceeds `max_redundancy`, is passed over; a selection that
    runs out leaves the rest to the other.

    Args:
      first, second: (rows int64[b, j], scores f32[b, j], vectors f32[b, j, d]) as `select`
        returns them (-1 / -inf pad) with the picks' document vectors.
      k: picks per query.
    Returns:
      (rows int64[b, k], scores f32[b, k]); -1 / -inf pad.
    """
    b = len(first[0])
    out_rows = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    for i in range(b):
        queues = [[(int(r), float(s), v) for r, s, v in zip(*(a[i] for a in part)) if r >= 0]
                  for part in (first, second)]
        picked: list = []
        turn = 0
        while len(picked) < k and any(queues):
            queue = queues[turn] if queues[turn] else queues[1 - turn]
            row, score, vector = queue.pop(0)
            if all(row != p[0] and float(vector @ p[2]) <= max_redundancy for p in picked):
                picked.append((row, score, vector))
                turn = 1 - turn
        for j, (row, score, _) in enumerate(picked):
            out_rows[i, j], out_scores[i, j] = row, score
    return out_rows, out_scores


def dropout_keep_mask(rng: np.random.Generator, lengths: np.ndarray, width: int,
                      rate: float) -> np.ndarray:
    """bool[b, width]: which of each row's first `lengths[i]` items survive query dropout.

    Exactly round(rate * length) items are dropped from each row (at least one
    item always stays), chosen uniformly by `rng`; positions past a row's length
    are False.
    """
    lengths = np.asarray(lengths, np.int64)
    keep = np.arange(width)[None, :] < lengths[:, None]
    if rate <= 0:
        return keep
    for i, n in enumerate(lengths):
        drop = min(int(round(rate * n)), max(int(n) - 1, 0))
        if drop:
            keep[i, rng.choice(int(n), size=drop, replace=False)] = False
    return keep
