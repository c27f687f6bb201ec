"""Two-scale guidance for editing and the image-span constraint, checked against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.vocab.layout import IdLayout

LAYOUT = IdLayout(text_size=290, image_codes=64, num_sentinels=8, image_length=16)
STATE0 = proc.DecodeState(step=jnp.int32(0), tokens=jnp.zeros((4, 4), jnp.int32),
                          done=jnp.zeros(4, bool))


def _streams(seed=0):
    full, image, neither = np.random.default_rng(seed).normal(0, 2, (3, 4, 20)).astype(np.float32)
    return full, image, neither, jnp.asarray(np.stack([full, image, neither]))


def test_scales_one_one_are_the_full_stream():
    full, _, _, streams = _streams()
    np.testing.assert_array_equal(proc.TwoScaleGuidance(1.0, 1.0)(streams, STATE0), full)


@pytest.mark.parametrize("image_scale,text_scale", [(1.5, 7.5), (0.0, 1.0), (3.0, 0.5)])
def test_each_scale_moves_the_scores_as_its_formula_says(image_scale, text_scale):
    full, image, neither, streams = _streams(1)
    got = np.asarray(proc.TwoScaleGuidance(image_scale, text_scale)(streams, STATE0))
    want = neither + image_scale * (image - neither) + text_scale * (full - image)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Raising the text scale by d adds d * (full - image); the image scale, d * (image - neither).
    more_text = np.asarray(proc.TwoScaleGuidance(image_scale, text_scale + 1)(streams, STATE0))
    np.testing.assert_allclose(more_text - got, full - image, rtol=1e-4, atol=1e-4)
    more_image = np.asarray(proc.TwoScaleGuidance(image_scale + 1, text_scale)(streams, STATE0))
    np.testing.assert_allclose(more_image - got, image - neither, rtol=1e-4, atol=1e-4)


def test_excluded_tokens_stay_excluded_and_two_streams_are_refused():
    full, image, neither, _ = _streams(2)
    image[:, 3] = -np.inf
    got = np.asarray(proc.TwoScaleGuidance()(jnp.asarray(np.stack([full, image, neither])),
                                             STATE0))
    assert np.isneginf(got[:, 3]).all() and np.isfinite(np.delete(got, 3, axis=1)).all()
    with pytest.raises(ValueError, match="num_streams=3"):
        proc.TwoScaleGuidance()(jnp.asarray(np.stack([full, image])), STATE0)


def test_image_span_allows_only_codes_and_stops_after_length():
    span = proc.ImageSpan(LAYOUT, 5)
    kept = np.isfinite(np.asarray(span(jnp.zeros((4, LAYOUT.vocab_size)), STATE0)))
    ids = np.arange(LAYOUT.vocab_size)
    np.testing.assert_array_equal(kept[0], (ids >= LAYOUT.image_start) & (ids < LAYOUT.used_size))
    token = jnp.zeros(4, jnp.int32)
    assert not np.asarray(span.stop(token, STATE0._replace(step=jnp.int32(3)))).any()
    assert np.asarray(span.stop(token, STATE0._replace(step=jnp.int32(4)))).all()
    assert span.max_new_tokens == 5
    with pytest.raises(ValueError, match="length"):
        proc.ImageSpan(LAYOUT, 0)
