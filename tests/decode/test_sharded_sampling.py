"""Sampling on a (data, fsdp, tensor) mesh of 8 fake CPU devices gives the unsharded tokens.

The parameters are placed by the training rules (`partitioning.py`); the decode path
constrains its weights and KV cache by the same logical names, batch over data/fsdp.
"""

import jax
import numpy as np
import pytest

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import sampler
from cm3leon_jax.decode.sampler import left_pad, sample
from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decode_step import DecoderStep
from cm3leon_jax.model.decoder import abstract_variables
from tests.model.model_testlib import random_params, tiny_chameleon, tiny_config

PROMPTS = [np.random.default_rng(i).integers(5, 500, n) for i, n in enumerate((7, 3, 5, 6))]


@pytest.mark.parametrize("variant", ["cm3leon", "chameleon"])
def test_sharded_sampling_gives_the_unsharded_tokens(variant):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    config = tiny_config() if variant == "cm3leon" else tiny_chameleon()
    params = random_params(config, seed=2)
    model = DecoderStep(config)
    kwargs = dict(max_new_tokens=6, processors=(proc.Temperature(1.0), proc.TopK(40)))
    want = sample(model, params, left_pad(PROMPTS), jax.random.key(4), **kwargs)

    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    logical = partitioning.logical_axes(abstract_variables(config)["params"])
    shardings = partitioning.logical_to_sharding(logical, mesh, shapes=params)
    sharded = jax.device_put(params, shardings)
    assert sharded["layers"]["mlp"]["wo" if "wo" in params["layers"]["mlp"] else
                                    "wi"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    with jax.set_mesh(mesh):
        got = sample(model, sharded, left_pad(PROMPTS), jax.random.key(4), **kwargs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)


def test_sharded_rows_that_share_a_prompt_give_the_unshared_tokens():
    """16 rows of 4 prompts on 8 devices: the prefill runs on 8 rows (4 rounded up to the
    devices), gathered over the sharded batch."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    config = tiny_config()
    params = random_params(config, seed=3)
    prompts = left_pad([p for p in PROMPTS for _ in range(4)])
    kwargs = dict(max_new_tokens=5, processors=(proc.Temperature(1.0), proc.TopK(40)))
    want = sample(DecoderStep(config), params, prompts, jax.random.key(1), share_prefill=False,
                  **kwargs)
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    logical = partitioning.logical_axes(abstract_variables(config)["params"])
    sharded = jax.device_put(params, partitioning.logical_to_sharding(logical, mesh,
                                                                      shapes=params))
    with jax.set_mesh(mesh):
        assert sampler.distinct_prompts(prompts)[0].shape[0] == 8
        got = sample(DecoderStep(config), sharded, prompts, jax.random.key(1), **kwargs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
