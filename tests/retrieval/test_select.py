"""Selection rules: self, near-duplicates, modality preference, redundancy, query dropout."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.retrieval.select import SelectionConfig, dropout_keep_mask, interleave, select


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_paper_rules_on_a_handmade_list():
    e = np.eye(4, dtype=np.float32)
    # candidates: 0 = the query itself, 1 = near-duplicate (0.95), 2 = text-only,
    # 3 = multimodal, 4 = copy of 3 (redundant), 5 = multimodal, different.
    vectors = np.stack([e[0], e[0], e[1], e[2], e[2], e[3]])[None]
    ids = np.array([[7, 8, 9, 10, 11, 12]])
    scores = np.array([[1.0, 0.95, 0.8, 0.7, 0.69, 0.5]])
    multimodal = np.array([[True, True, False, True, True, True]])
    cfg = SelectionConfig(k=3)
    out, out_scores = select(ids, scores, vectors, multimodal, cfg, exclude=np.array([7]))
    # multimodal first (10, then 12; 11 is redundant with 10), then text-only 9.
    assert out.tolist() == [[10, 12, 9]]
    np.testing.assert_allclose(out_scores, [[0.7, 0.5, 0.8]])
    out, _ = select(ids, scores, vectors, multimodal,
                    SelectionConfig(k=3, prefer_multimodal=False), exclude=np.array([7]))
    assert out.tolist() == [[9, 10, 12]]


def test_short_lists_pad_with_minus_one():
    vectors = _unit(np.random.default_rng(0).normal(size=(1, 3, 8)))
    ids = np.array([[4, -1, -1]])
    out, scores = select(ids, np.array([[0.5, 0, 0]]), vectors, np.ones((1, 3), bool),
                         SelectionConfig(k=2))
    assert out.tolist() == [[4, -1]] and scores[0, 1] == -np.inf


def test_shape_mistakes_name_the_argument():
    with pytest.raises(ValueError, match="cand_scores"):
        select(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3, 4)), np.zeros((2, 3)),
               SelectionConfig())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.floats(0.3, 1.0))
def test_invariants_hold_for_random_lists(seed, k, thr):
    rng = np.random.default_rng(seed)
    b, c, d = 4, 12, 6
    vectors = _unit(rng.normal(size=(b, c, d)))
    query = _unit(rng.normal(size=(b, d)))
    scores = np.einsum("bcd,bd->bc", vectors, query)
    order = np.argsort(-scores, axis=1)
    scores = np.take_along_axis(scores, order, 1)
    vectors = np.take_along_axis(vectors, order[..., None], 1)
    ids = rng.permutation(1000)[:b * c].reshape(b, c)
    mm = rng.random((b, c)) < 0.5
    exclude = ids[:, 0]
    cfg = SelectionConfig(k=k, max_relevance=thr, max_redundancy=thr)
    out, out_scores = select(ids, scores, vectors, mm, cfg, exclude=exclude)
    for i in range(b):
        got = [x for x in out[i] if x >= 0]
        pos = [int(np.flatnonzero(ids[i] == x)[0]) for x in got]
        assert exclude[i] not in got and len(set(got)) == len(got) <= k
        assert all(scores[i, p] <= thr for p in pos)
        for a in range(len(pos)):
            for z in range(a):
                assert vectors[i, pos[a]] @ vectors[i, pos[z]] <= thr + 1e-6
        # multimodal picks all precede unimodal ones
        kinds = [mm[i, p] for p in pos]
        assert kinds == sorted(kinds, reverse=True)


def test_dropout_mask_drops_exactly_the_rate():
    rng = np.random.default_rng(0)
    keep = dropout_keep_mask(rng, np.array([10, 5, 1, 0]), 12, 0.2)
    assert keep.sum(axis=1).tolist() == [8, 4, 1, 0]
    assert not keep[:, 10:].any() and not keep[1, 5:].any()
    again = dropout_keep_mask(np.random.default_rng(0), np.array([10, 5, 1, 0]), 12, 0.2)
    np.testing.assert_array_equal(keep, again)


def _picks(rows, vectors):
    rows = np.asarray(rows, np.int64)
    scores = np.where(rows >= 0, 0.5, -np.inf).astype(np.float32)
    return rows, scores, np.asarray(vectors, np.float32)


def test_interleave_alternates_and_passes_over_what_is_picked_or_redundant():
    e = np.eye(5, dtype=np.float32)
    # By image: 1, 2, 3; by text: 1 (the image search's too), 4 (a copy of 2), 5.
    first = _picks([[1, 2, 3]], [[e[0], e[1], e[2]]])
    second = _picks([[1, 4, 5]], [[e[0], e[1], e[3]]])
    rows, scores = interleave(first, second, k=3, max_redundancy=0.9)
    assert rows.tolist() == [[1, 4, 3]]  # 1 by image; 1 again passed over, 4; 2 (= 4) over, 3.
    assert np.isfinite(scores).all()
    # A selection that runs out leaves the rest to the other; short rows pad with -1.
    rows, scores = interleave(_picks([[7, -1]], [[e[0], e[0] * 0]]),
                              _picks([[-1, -1]], [[e[0] * 0, e[0] * 0]]), k=2,
                              max_redundancy=0.9)
    assert rows.tolist() == [[7, -1]] and scores[0, 1] == -np.inf
    rows, _ = interleave(_picks([[-1, -1]], [[e[0] * 0, e[0] * 0]]),
                         _picks([[8, 9]], [[e[0], e[1]]]), k=2, max_redundancy=0.9)
    assert rows.tolist() == [[8, 9]]
