"""The vector quantizer: lookup, straight-through gradient, losses, dead-code restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.vocab import quantizer as q


def _apply(vq, params, z):
    return vq.apply({"params": params}, z)


@pytest.fixture
def vq_and_params():
    vq = q.VectorQuantizer(codebook_size=16, codebook_dim=4)
    codebook = jax.random.normal(jax.random.key(0), (16, 4))
    return vq, {"embedding": codebook}


def test_lookup_picks_the_nearest_entry(vq_and_params):
    vq, params = vq_and_params
    z = jax.random.normal(jax.random.key(1), (2, 3, 5, 4))
    out = _apply(vq, params, z)
    d = np.sum((np.asarray(z)[..., None, :] - np.asarray(params["embedding"])) ** 2, -1)
    np.testing.assert_array_equal(np.asarray(out.codes), d.argmin(-1))
    assert out.codes.dtype == jnp.int32 and out.codes.shape == (2, 3, 5)
    np.testing.assert_allclose(out.quantized, params["embedding"][out.codes], atol=1e-6)
    np.testing.assert_allclose(vq.apply({"params": params}, out.codes, method=vq.lookup),
                               out.quantized, atol=1e-6)


def test_straight_through_gradient_and_loss_split(vq_and_params):
    vq, params = vq_and_params
    z = jax.random.normal(jax.random.key(2), (8, 4))
    w = jax.random.normal(jax.random.key(3), (8, 4))

    # A downstream loss reaches the input unchanged (identity Jacobian) and never the codebook.
    g_z, g_p = jax.grad(lambda z, p: jnp.sum(w * _apply(vq, p, z).quantized), argnums=(0, 1))(
        z, params
    )
    np.testing.assert_allclose(g_z, w, atol=1e-6)
    assert float(jnp.abs(g_p["embedding"]).max()) == 0.0

    # The commitment loss trains only the encoder side, the codebook loss only the codebook.
    g_z, g_p = jax.grad(lambda z, p: _apply(vq, p, z).commitment_loss, argnums=(0, 1))(z, params)
    assert float(jnp.abs(g_p["embedding"]).max()) == 0.0
    e = params["embedding"][_apply(vq, params, z).codes]
    np.testing.assert_allclose(g_z, 2 * (z - e) / z.size, rtol=1e-5, atol=1e-7)
    g_z, g_p = jax.grad(lambda z, p: _apply(vq, p, z).codebook_loss, argnums=(0, 1))(z, params)
    assert float(jnp.abs(g_z).max()) == 0.0
    assert float(jnp.abs(g_p["embedding"]).max()) > 0.0


def test_l2_lookup_is_scale_invariant():
    vq = q.VectorQuantizer(codebook_size=16, codebook_dim=4, l2_normalize=True)
    params = {"embedding": jax.random.normal(jax.random.key(0), (16, 4))}
    z = jax.random.normal(jax.random.key(1), (32, 4))
    a, b = _apply(vq, params, z), _apply(vq, params, 7.0 * z)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(jnp.linalg.norm(a.quantized, axis=-1), 1.0, rtol=1e-5)


def test_wrong_latent_width_is_explained(vq_and_params):
    vq, params = vq_and_params
    with pytest.raises(ValueError, match="embed_dim"):
        _apply(vq, params, jnp.zeros((2, 5)))


def test_dead_codes_are_restarted_onto_encoder_outputs():
    k, d = 8, 3
    embedding = jnp.zeros((k, d)).at[:, 0].set(jnp.arange(k, dtype=jnp.float32))
    codes = jnp.array([0, 1, 1, 2, 0, 2])  # codes 3..7 never used
    usage = jnp.full((k,), 1.0 / k)
    update = jax.jit(lambda u: q.update_usage(u, codes, decay=0.98))  # one compile, not 300 eager
    for _ in range(300):
        usage = update(usage)
    candidates = 100.0 + jax.random.normal(jax.random.key(0), (50, d))
    new, new_usage, n = q.restart_dead_codes(embedding, usage, candidates, jax.random.key(1), 0.1)
    assert int(n) == 5
    np.testing.assert_array_equal(new[:3], embedding[:3])  # live codes untouched
    assert bool(jnp.all(new[3:, 0] > 90.0))  # dead ones now sit on the encoder outputs
    assert len({tuple(np.round(r, 4)) for r in np.asarray(new[3:])}) == 5  # and apart
    np.testing.assert_allclose(new_usage[3:], 1.0 / k)
    # A restarted code is now the nearest entry for latents like those it moved to.
    assert set(np.asarray(q.nearest_codes(candidates, new)).tolist()) <= set(range(3, 8))


def test_codebook_stats():
    s = q.codebook_stats(jnp.array([5.0, 5.0, 0.0, 0.0]))
    np.testing.assert_allclose(s["used_fraction"], 0.5)
    np.testing.assert_allclose(s["perplexity"], 2.0, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=60))
def test_histogram_and_perplexity_bounds(codes):
    counts = q.code_histogram(jnp.array(codes), 10)
    np.testing.assert_array_equal(counts, np.bincount(codes, minlength=10))
    p = float(q.codebook_stats(counts)["perplexity"])
    assert 1.0 - 1e-4 <= p <= len(set(codes)) + 1e-3
