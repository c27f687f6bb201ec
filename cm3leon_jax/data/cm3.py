"""The CM3 objective: move a few spans to the end so the model learns to infill.

    before:  a red circle <break> c0 c1 c2 c3 ... c1023
    after:   a <sentinel:0> circle <break> c0 c1 <sentinel:1> ... c1023
             <sentinel:0> red <eoss> <sentinel:1> c2 c3 <eoss>

The number of spans is drawn from Poisson(mean_spans); zero spans (about 37% of
examples for a mean of 1) leave the plain causal sequence. A span lies inside
one segment: it never contains or crosses `<break>` (so an image is never cut
across the modality change), `<eos>` (a document boundary) or padding. Each
span costs three tokens: its sentinel in place, and the sentinel and `<eoss>`
around the moved copy.

Loss weights are 1 on every token except sentinels and padding: a sentinel's
position is decided by the transform, not by the data, so predicting it teaches
nothing. `<eoss>` is learned (the model must say where an infill ends).

Everything here is a pure numpy function of (ids, rng) and `uncm3` inverts
`cm3` exactly.
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.layout import IdLayout

# Tokens a span may never contain or cross.
_BOUNDARIES = (layout_lib.PAD_ID, layout_lib.EOS_ID, layout_lib.BREAK_ID)


def segments(ids: np.ndarray) -> list[tuple[int, int]]:
    """int32[n] -> [(start, stop), ...]: the maximal runs free of boundaries."""
    free = ~np.isin(ids, _BOUNDARIES)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], free, [False]])
                                   .astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def sample_spans(ids: np.ndarray, rng: np.random.Generator, *,
                 mean_spans: float = 1.0,
                 max_spans: int = 512) -> list[tuple[int, int]]:
    """Picks non-overlapping spans [start, stop), sorted by position.

    n ~ Poisson(mean_spans) candidates are drawn, each inside one segment
    (chosen with probability proportional to its length) between two sorted
    uniform cut points; candidates that overlap an earlier one are dropped.
    """
    n = min(int(rng.poisson(mean_spans)), max_spans)
    segs = segments(ids)
    if n == 0 or not segs:
        return []
    lengths = np.array([b - a for a, b in segs], np.float64)
    chosen: list[tuple[int, int]] = []
    for _ in range(n):
        a, b = segs[rng.choice(len(segs), p=lengths / lengths.sum())]
        cut = np.sort(rng.choice(b - a + 1, size=2, replace=False))
        span = (a + int(cut[0]), a + int(cut[1]))
        if all(span[1] <= s or span[0] >= e for s, e in chosen):
            chosen.append(span)
    return sorted(chosen)


def apply_spans(ids: np.ndarray, spans: list[tuple[int, int]],
                layout: IdLayout) -> np.ndarray:
    """Replaces each span by `<sentinel:i>` and appends `<sentinel:i> span <eoss>`."""
    if len(spans) > layout.num_sentinels:
        raise ValueError(
            f"{len(spans)} spans need as many sentinels; the layout has "
            f"{layout.num_sentinels}. Lower max_spans or raise num_sentinels.")
    head, tail, cursor = [], [], 0
    for i, (start, stop) in enumerate(spans):
        sentinel = np.array([layout.sentinel_id(i)], np.int32)
        head += [ids[cursor:start], sentinel]
        tail += [sentinel, ids[start:stop], np.array([layout_lib.EOSS_ID], np.int32)]
        cursor = stop
    head.append(ids[cursor:])
    return np.concatenate(head + tail).astype(np.int32)


def loss_weights(ids: np.ndarray, layout: IdLayout) -> np.ndarray:
    """float32[n]: 0 on sentinels and padding, 1 elsewhere."""
    zero = layout.is_sentinel(ids) | (ids == layout_lib.PAD_ID)
    return np.where(zero, 0.0, 1.0).astype(np.float32)


def cm3(ids, rng: np.random.Generator, layout: IdLayout, *,
        mean_spans: float = 1.0,
        max_spans: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CM3 transform of one example.

    Args:
      ids: int32[n], one or more documents joined by `<eos>` (retrieved
        documents first, the query last), unpadded (packing pads after the
        transform). Must not already hold sentinels or `<eoss>`.
      rng: the only source of randomness; the same state gives the same output.
      layout: the vocabulary's id layout.
      mean_spans: mean of the Poisson number of spans (CM3Leon: 1).
      max_spans: cap on spans (default: the layout's number of sentinels).

    Returns:
      (tokens int32[n + 3k], loss_weights float32[n + 3k]) for k kept spans.
    """
    ids = layout.check_ids(ids, "cm3 input")
    if ids.ndim != 1:
        raise ValueError(f"cm3 takes one example int32[n], got shape {ids.shape}.")
    if (layout.is_sentinel(ids) | (ids == layout_lib.EOSS_ID)).any():
        raise ValueError(
            "cm3 input already holds sentinels or <eoss>; apply the transform "
            "once, to raw documents.")
    if (ids == layout_lib.PAD_ID).any():
        raise ValueError(
            "cm3 input holds <pad>; transform unpadded examples and pad after "
            "(the moved spans must stay inside the example).")
    spans = sample_spans(
        ids, rng, mean_spans=mean_spans,
        max_spans=layout.num_sentinels if max_spans is None else max_spans)
    out = apply_spans(ids, spans, layout)
    return out, loss_weights(out, layout)


def uncm3(ids, layout: IdLayout) -> np.ndarray:
    """Inverse of `cm3`: puts every moved span back in place of its sentinel."""
    ids = np.asarray(ids, np.int32)
    first = layout.sentinel_id(0) if layout.num_sentinels else -1
    where = np.flatnonzero(ids == first)
    if where.size == 0:
        return ids.copy()  # No spans: the sequence was left causal.
    if where.size != 2:
        raise ValueError(
            f"expected <sentinel:0> exactly twice (in place and moved), found "
            f"{where.size} times.")
    head, tail = ids[:where[1]], ids[where[1]:]
    moved, i = {}, 0
    while i < tail.size:
        sentinel = int(tail[i])
        ends = np.flatnonzero(tail[i + 1:] == layout_lib.EOSS_ID)
        if not layout.is_sentinel(sentinel) or ends.size == 0:
            raise ValueError(
                f"malformed CM3 tail at position {where[1] + i}: expected "
                "<sentinel:i> span <eoss>.")
        stop = i + 1 + int(ends[0])
        moved[sentinel] = tail[i + 1:stop]
        i = stop + 1
    out = []
    for token in head:
        out.append(moved.pop(int(token)) if int(token) in moved else [token])
    if moved:
        raise ValueError(
            f"moved spans {sorted(moved)} have no sentinel in the sequence.")
    return np.concatenate([np.asarray(o, np.int32) for o in out])
