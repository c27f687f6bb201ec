"""Property tests of the CM3 transform."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, PAD_ID, IdLayout

LAYOUT = IdLayout(text_size=100, image_codes=50, num_sentinels=16, image_length=4)


@st.composite
def sequences(draw):
    """Documents joined by <eos>, each segments joined by <break>."""
    docs = []
    for _ in range(draw(st.integers(1, 3))):
        segs = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                segs.append(LAYOUT.text_to_ids(draw(st.lists(
                    st.integers(0, 99), min_size=1, max_size=12))).tolist())
            else:
                segs.append(LAYOUT.codes_to_ids(draw(st.lists(
                    st.integers(0, 49), min_size=4, max_size=4))).tolist())
        doc = segs[0]
        for s in segs[1:]:
            doc = doc + [BREAK_ID] + s
        docs.append(doc)
    ids = docs[0]
    for d in docs[1:]:
        ids = ids + [EOS_ID] + d
    return np.array(ids, np.int32)


def _run(ids, seed, mean=1.0):
    return cm3_lib.cm3(ids, np.random.default_rng(seed), LAYOUT, mean_spans=mean)


@settings(max_examples=200, deadline=None)
@given(ids=sequences(), seed=st.integers(0, 2**32 - 1), mean=st.sampled_from([0.5, 1.0, 3.0]))
def test_uncm3_restores_the_input(ids, seed, mean):
    out, _ = _run(ids, seed, mean)
    np.testing.assert_array_equal(cm3_lib.uncm3(out, LAYOUT), ids)


@settings(max_examples=200, deadline=None)
@given(ids=sequences(), seed=st.integers(0, 2**32 - 1), mean=st.sampled_from([1.0, 3.0]))
def test_spans_never_cross_boundaries(ids, seed, mean):
    spans = cm3_lib.sample_spans(ids, np.random.default_rng(seed), mean_spans=mean)
    for start, stop in spans:
        assert stop > start
        assert not np.isin(ids[start:stop], [BREAK_ID, EOS_ID, PAD_ID]).any()
        # Inside one segment: no boundary between start and stop.
        assert any(a <= start and stop <= b for a, b in cm3_lib.segments(ids))
    for (_, e1), (s2, _) in zip(spans, spans[1:]):
        assert e1 <= s2  # sorted, non-overlapping


@settings(max_examples=200, deadline=None)
@given(ids=sequences(), seed=st.integers(0, 2**32 - 1))
def test_layout_and_loss_weights(ids, seed):
    out, w = _run(ids, seed, 2.0)
    k = int(LAYOUT.is_sentinel(out).sum()) // 2
    assert out.size == ids.size + 3 * k
    assert (out == EOSS_ID).sum() == k
    np.testing.assert_array_equal(w == 0, LAYOUT.is_sentinel(out))
    # Boundaries are never moved: the same <break> and <eos> counts survive.
    for t in (BREAK_ID, EOS_ID):
        assert (out == t).sum() == (ids == t).sum()


@settings(max_examples=50, deadline=None)
@given(ids=sequences(), seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_output(ids, seed):
    a, wa = _run(ids, seed)
    b, wb = _run(ids, seed)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(wa, wb)


@given(ids=sequences(), seed=st.integers(0, 2**32 - 1))
def test_zero_spans_is_the_identity(ids, seed):
    out, w = _run(ids, seed, mean=0.0)
    np.testing.assert_array_equal(out, ids)
    assert (w == 1).all()


def test_poisson_one_leaves_about_37_percent_causal():
    ids = LAYOUT.text_to_ids(np.arange(60) % 100)
    rng = np.random.default_rng(0)
    causal = np.mean([len(cm3_lib.sample_spans(ids, rng)) == 0 for _ in range(4000)])
    assert abs(causal - np.exp(-1)) < 0.03


def test_loss_weights_zero_on_padding():
    ids = np.array([*LAYOUT.text_to_ids([1, 2]), LAYOUT.sentinel_id(0), PAD_ID, PAD_ID])
    np.testing.assert_array_equal(cm3_lib.loss_weights(ids, LAYOUT), [1, 1, 0, 0, 0])


def test_bad_inputs_are_clear_errors():
    ids = LAYOUT.text_to_ids([1, 2, 3])
    with pytest.raises(ValueError, match="already holds sentinels"):
        _run(np.concatenate([ids, [LAYOUT.sentinel_id(0)]]), 0)
    with pytest.raises(ValueError, match="holds <pad>"):
        _run(np.concatenate([ids, [PAD_ID]]), 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _run(np.array([LAYOUT.vocab_size + 5]), 0)
    with pytest.raises(ValueError, match="malformed CM3 tail"):
        cm3_lib.uncm3([LAYOUT.sentinel_id(0), 7, LAYOUT.sentinel_id(0), 9], LAYOUT)
