"""The decode path (`DecoderStep`) computes what the `Decoder`'s full forward computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.model.decoding import DecoderStep
from tests.model.model_testlib import forward, random_params, tiny_chameleon, tiny_config

CONFIGS = {"cm3leon": tiny_config(), "chameleon_gqa": tiny_chameleon(),
           "chameleon_swin": tiny_chameleon(block_order="swin")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_steps_equal_the_full_forward(name):
    config = CONFIGS[name]
    params = random_params(config, seed=1)
    step = DecoderStep(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 9)), jnp.int32)
    segments = jnp.ones_like(tokens).at[0, :3].set(0)  # Row 0 left-padded by 3.
    positions = jnp.maximum(jnp.arange(9)[None] - jnp.array([[3], [0]]), 0).astype(jnp.int32)
    want = forward(config)(params, tokens, segments, positions)
    weights, cache = step.prepare(params), step.init_cache(2, 12)
    call = jax.jit(step)
    logits, cache = call(weights, cache, tokens[:, :6], segments[:, :6], positions[:, :6])
    np.testing.assert_allclose(logits, want[:, 5], atol=2e-5 * float(jnp.abs(want).max()))
    for t in range(6, 9):
        logits, cache = call(weights, cache, tokens[:, t:t + 1], segments[:, t:t + 1],
                             positions[:, t:t + 1])
        np.testing.assert_allclose(logits, want[:, t], atol=2e-5 * float(jnp.abs(want).max()))
    assert int(cache["index"]) == 9


def test_the_cache_refuses_more_than_the_position_table():
    with pytest.raises(ValueError, match="max_length=128"):
        DecoderStep(tiny_config()).init_cache(1, 129)
