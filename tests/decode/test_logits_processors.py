"""Each logits processor keeps exactly the tokens it promises, checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, IdLayout

LAYOUT = IdLayout(text_size=290, image_codes=64, num_sentinels=8, image_length=16)
STATE0 = proc.DecodeState(step=jnp.int32(0), tokens=jnp.zeros((3, 4), jnp.int32),
                          done=jnp.zeros(3, bool))
STATE1 = STATE0._replace(step=jnp.int32(1))


def _logits(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 2, shape).astype(np.float32)


def _kept(scores):
    return np.isfinite(np.asarray(scores))


def test_top_k_keeps_exactly_the_k_highest():
    logits = _logits((2, 3, 50))
    for k in (1, 7, 50, 80):
        got = _kept(proc.TopK(k)(jnp.asarray(logits), STATE0))
        want = np.zeros_like(got)
        np.put_along_axis(want, np.argsort(-logits, axis=-1)[..., :min(k, 50)], True, axis=-1)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(proc.TopK(k)(jnp.asarray(logits), STATE0))[got],
                                      logits[got])


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = _logits((3, 40), seed=1)
    got = _kept(proc.TopP(p)(jnp.asarray(logits), STATE0))
    for row, kept in zip(logits, got):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n = int(np.searchsorted(np.cumsum(probs), p - 1e-6) + 1)  # first prefix with mass >= p
        want = np.zeros(40, bool)
        want[order[:min(n, 40)]] = True
        np.testing.assert_array_equal(kept, want)


def test_top_p_of_one_keeps_tokens_below_float_resolution():
    """At p = 1 every allowed token is kept, also those whose probability (1e-9 and
    less here) vanishes in a float32 sum with 1; p given as a number or traced."""
    logits = np.array([[0.0, -20.0, -30.0, -40.0, 1.0, 2.0],
                       [0.0, -np.inf, -50.0, 1.0, 1.0, 1.0]], np.float32)
    want = np.isfinite(logits)
    np.testing.assert_array_equal(_kept(proc.TopP(1.0)(jnp.asarray(logits), STATE0)), want)
    np.testing.assert_array_equal(_kept(_top_p_jit(jnp.asarray(logits), 1.0)), want)
    # Below 1 the bisection decides: at 0.999 the tokens far below the rest go.
    assert not _kept(_top_p_jit(jnp.asarray(logits), 0.999))[0, 1:4].any()


def _top_p_by_sort(scores, p):
    """The sort-based nucleus TopP replaced: sort, softmax, cumulative mass, keep up to p."""
    ranked = -jnp.sort(-scores, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = jnp.where(jnp.cumsum(probs, axis=-1) - probs < p, ranked, jnp.inf)
    return jnp.where(scores >= kept.min(axis=-1, keepdims=True), scores, -jnp.inf)


_top_p_jit = jax.jit(lambda scores, p: proc.TopP(p)(scores, STATE0))
_by_sort_jit = jax.jit(_top_p_by_sort)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31), vocab=st.sampled_from([1, 2, 7, 64, 300]),
       scale=st.sampled_from([0.01, 1.0, 4.0, 30.0]), levels=st.sampled_from([0, 3, 50]),
       excluded=st.floats(0.0, 0.9), p=st.floats(1e-4, 1.0), edge=st.booleans())
def test_top_p_bisection_keeps_the_sort_versions_set(seed, vocab, scale, levels, excluded, p,
                                                     edge):
    """Random logits (ties when rounded to a few levels, -inf from a constraint): the
    bisection keeps exactly the sort-based version's tokens, with their scores unchanged,
    so both sample the same distribution. With `edge`, p sits 3e-5 above the mass above
    some token (which is then just kept). Tokens whose mass above sits within float32
    rounding of p (the two sum in different orders) are left out of the comparison."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (3, vocab)).astype(np.float32)
    if levels:
        logits = np.round(logits * levels / (scale * 3)).astype(np.float32)
    logits[rng.random((3, vocab)) < excluded] = -np.inf
    logits[:, 0] = np.where(np.isinf(logits).all(1), 0.0, logits[:, 0])  # One token allowed.
    probs = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    above = np.stack([[probs[r][logits[r] > s].sum() for s in logits[r]] for r in range(3)])
    if edge:
        p = min(float(above[0, seed % vocab]) + 3e-5, 1.0)
    got = np.asarray(_top_p_jit(jnp.asarray(logits), p))
    want = np.asarray(_by_sort_jit(jnp.asarray(logits), p))
    clear = np.abs(above - p) > 1e-5
    np.testing.assert_array_equal(got[clear], want[clear])
    np.testing.assert_array_equal(np.isfinite(got[clear]), (above < p)[clear] & np.isfinite(
            logits[clear]))
    assert np.isfinite(got).any(axis=1).all()


def test_top_p_threshold_order_keys_are_monotone():
    values = np.array([-np.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.0, 3e38,
                       np.inf], np.float32)
    keys = np.asarray(proc._order_keys(jnp.asarray(values)))
    assert (np.diff(keys[[0, 1, 2, 3, 4, 5]]) > 0).all() and keys[5] == keys[6]
    assert (np.diff(keys[6:]) > 0).all()


def test_top_p_after_a_constraint_ignores_excluded_tokens():
    logits = _logits((2, 30), seed=2)
    logits[:, ::2] = -np.inf
    got = _kept(proc.TopP(0.5)(jnp.asarray(logits), STATE0))
    assert not got[:, ::2].any() and got.any(axis=1).all()


def test_classifier_free_guidance_scales():
    cond, uncond = _logits((4, 20), 3), _logits((4, 20), 4)
    streams = jnp.asarray(np.stack([cond, uncond]))
    np.testing.assert_array_equal(proc.ClassifierFreeGuidance(1.0)(streams, STATE0), cond)
    np.testing.assert_array_equal(proc.ClassifierFreeGuidance(0.0)(streams, STATE0), uncond)
    np.testing.assert_allclose(proc.ClassifierFreeGuidance(3.0)(streams, STATE0),
                               uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_keeps_excluded_tokens_excluded_without_nans():
    streams = np.stack([_logits((2, 20), 5), _logits((2, 20), 6)])
    streams[..., :5] = -np.inf
    for guide in (proc.ClassifierFreeGuidance(3.0), proc.ContrastiveDecoding(0.0, 1)):
        out = np.asarray(guide(jnp.asarray(streams), STATE0))
        assert not np.isnan(out).any() and np.isneginf(out[:, :5]).all()


@pytest.mark.parametrize("alpha,k", [(0.5, 1), (0.1, 1), (0.3, 3), (1.0, 2)])
def test_contrastive_decoding_masks_as_specified(alpha, k):
    cond, uncond = _logits((3, 25), 7), _logits((3, 25), 8)
    out = np.asarray(proc.ContrastiveDecoding(alpha, k)(jnp.asarray(np.stack([cond, uncond])),
                                                        STATE0))
    log_softmax = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                      keepdims=True)) - x.max(-1, keepdims=True)
    p_cond = np.exp(log_softmax(cond))
    kth = np.sort(p_cond, axis=-1)[:, -k][:, None]
    keep = p_cond >= alpha * kth * (1 - 1e-6)
    np.testing.assert_array_equal(np.isfinite(out), keep)
    np.testing.assert_allclose(out[keep], (log_softmax(cond) - log_softmax(uncond))[keep],
                               rtol=1e-5, atol=1e-5)


def test_guidance_refuses_a_single_stream():
    with pytest.raises(ValueError, match=r"float32\[2, batch, vocab\]"):
        proc.ClassifierFreeGuidance(3.0)(jnp.zeros((1, 2, 8)), STATE0)


def test_image_constraint_allows_image_codes_only_and_stops_after_image_length():
    c = proc.ImageCodesOnly(LAYOUT)
    kept = _kept(c(jnp.zeros((2, 3, 384)), STATE0))
    ids = np.arange(384)
    np.testing.assert_array_equal(kept, np.broadcast_to(LAYOUT.is_image(ids), kept.shape))
    token = jnp.zeros(3, jnp.int32)
    assert not np.asarray(c.stop(token, STATE0._replace(step=jnp.int32(14)))).any()
    assert np.asarray(c.stop(token, STATE0._replace(step=jnp.int32(15)))).all()


def test_text_constraint_needs_one_text_token_before_a_stop_token():
    c = proc.TextOnly(LAYOUT, max_tokens=5, stop_ids=(EOS_ID, BREAK_ID))
    ids = np.arange(384)
    first, later = _kept(c(jnp.zeros((3, 384)), STATE0)), _kept(c(jnp.zeros((3, 384)), STATE1))
    np.testing.assert_array_equal(first[0], LAYOUT.is_text(ids))
    np.testing.assert_array_equal(later[0], LAYOUT.is_text(ids) | np.isin(ids, [EOS_ID, BREAK_ID]))
    tokens = jnp.asarray([EOS_ID, EOSS_ID, LAYOUT.text_start], jnp.int32)
    np.testing.assert_array_equal(c.stop(tokens, STATE1), [True, False, False])
    assert np.asarray(c.stop(tokens, STATE0._replace(step=jnp.int32(4)))).all()


def test_bad_settings_are_refused_by_name():
    for make, match in ((lambda: proc.Temperature(0.0), "Temperature"),
                        (lambda: proc.TopK(0), "TopK.k"), (lambda: proc.TopP(0.0), "TopP.p"),
                        (lambda: proc.ContrastiveDecoding(1.5), "alpha"),
                        (lambda: proc.TextOnly(LAYOUT, max_tokens=0), "max_tokens")):
        with pytest.raises(ValueError, match=match):
            make()
