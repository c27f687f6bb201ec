"""The "chunked" attention kernel: values and gradients equal autodiff of the "xla" kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testlib import forward, packed_batch, random_params, tiny_chameleon, tiny_config

from cm3leon_jax.model import attention, attention_chunked
from cm3leon_jax.model.decoder import Decoder, init_cache

CASES = {  # name: (batch, q_len, kv_len, heads, kv_heads, head_dim, segments, offset, chunk)
    "causal": (2, 48, 48, 4, 4, 16, False, 0, 16),
    "packed_gqa": (2, 48, 48, 4, 2, 16, True, 0, 16),
    "uneven_chunks_mqa": (3, 37, 37, 4, 1, 8, True, 0, 8),
    "one_chunk": (2, 32, 32, 2, 2, 8, True, 0, 128),
    "offset_into_longer_kv": (2, 12, 40, 4, 2, 16, True, 20, 5),
}


def _inputs(b, t, s, n, kvh, h, segments, offset, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v, d_out = (
        normal(b, t, n, h),
        normal(b, s, kvh, h),
        normal(b, s, kvh, h),
        normal(b, t, n, h),
    )
    kv_seg = q_seg = None
    if segments:  # Sorted ids with zeros (padding) at the end of some rows.
        kv_seg = np.sort(rng.integers(1, 4, (b, s)), axis=1)
        kv_seg[0, s - 3:] = 0
        q_seg = kv_seg[:, offset:offset + t]
        kv_seg, q_seg = jnp.asarray(kv_seg, jnp.int32), jnp.asarray(q_seg, jnp.int32)
    return q, k, v, q_seg, kv_seg, d_out


def _value_and_grads(kernel, q, k, v, q_seg, kv_seg, d_out, offset, traced_offset=False):
    def loss(q, k, v, offset):
        return jnp.sum(kernel(q, k, v, q_seg, kv_seg, offset) * d_out)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    if traced_offset:
        return jax.jit(grad)(q, k, v, jnp.int32(offset))
    return jax.jit(grad, static_argnums=3)(q, k, v, offset)


def _assert_same(got, want, tol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("traced_offset", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_grads_equal_the_xla_kernel(name, traced_offset):
    b, t, s, n, kvh, h, segments, offset, chunk = CASES[name]
    args = _inputs(b, t, s, n, kvh, h, segments, offset)
    chunked = functools.partial(attention_chunked.chunked_attention, chunk=chunk)
    want = _value_and_grads(attention.KERNELS["xla"], *args, offset, traced_offset)
    got = _value_and_grads(chunked, *args, offset, traced_offset)
    _assert_same(got, want)
    assert float(jnp.max(jnp.abs(got[1][1]))) > 0  # The key gradient is not trivially zero.


@pytest.mark.parametrize("traced_offset", [False, True])
def test_rows_that_see_nothing_match_too(traced_offset):
    """Queries whose segment has no visible kv slot: the mean of all values, as jax.nn gives."""
    q, k, v, _, _, d_out = _inputs(2, 8, 24, 4, 2, 8, False, 0, seed=3)
    kv_seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 12], 2, axis=0), jnp.int32)
    q_seg = jnp.asarray([[1, 1, 2, 2, 3, 3, 1, 2]] * 2, jnp.int32)  # Segment 3 sees nothing.
    chunked = functools.partial(attention_chunked.chunked_attention, chunk=3)
    args = (q, k, v, q_seg, kv_seg, d_out)
    want = _value_and_grads(attention.KERNELS["xla"], *args, 10, traced_offset)
    _assert_same(_value_and_grads(chunked, *args, 10, traced_offset), want)


def test_bfloat16_stays_close():
    q, k, v, q_seg, kv_seg, d_out = _inputs(2, 32, 32, 4, 2, 16, True, 0)
    bf = lambda x: x.astype(jnp.bfloat16)
    args = (bf(q), bf(k), bf(v), q_seg, kv_seg, bf(d_out))
    chunked = functools.partial(attention_chunked.chunked_attention, chunk=8)
    got = _value_and_grads(chunked, *args, 0)
    want = _value_and_grads(attention.KERNELS["xla"], *args, 0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.float32(g), np.float32(w), atol=0.05, rtol=0.05)


def test_decoder_packed_forward_and_kv_cache_match_xla():
    """Chameleon switches (GQA, RoPE, QK-norm), unrolled layers: packed logits and cached
    decoding (a traced query offset: one chunk over the cache) agree with the "xla" kernel."""
    config = tiny_chameleon(attention_impl="chunked", scan_unroll=2)
    reference = tiny_chameleon()
    params = random_params(config)
    batch = packed_batch(2, 40, config.vocab_size, seed=4)
    tokens, seg, pos = (batch[k] for k in ("decoder_input_tokens", "decoder_segment_ids",
                                           "decoder_positions"))
    np.testing.assert_allclose(forward(config)(params, tokens, seg, pos),
                               forward(reference)(params, tokens, seg, pos), atol=1e-5, rtol=1e-5)

    model, length, prompt = Decoder(config), 10, 6
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    step = jax.jit(lambda c, t, p: model.apply({"params": params, "cache": c}, t, None, p,
                                               decode=True, mutable=["cache"]))
    logits, new = step(init_cache(model, 2, 12), tokens[:, :prompt], positions[:, :prompt])
    steps = [logits]
    for i in range(prompt, length):
        logits, new = step(new["cache"], tokens[:, i:i + 1], positions[:, i:i + 1])
        steps.append(logits)
    full = forward(reference)(params, tokens[:, :length])
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_registered_and_selectable_by_name():
    assert attention.get_kernel("chunked") is attention_chunked.chunked_attention
    assert tiny_config(attention_impl="chunked").attention_impl == "chunked"
