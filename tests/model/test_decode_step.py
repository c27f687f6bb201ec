"""The decode path (`DecoderStep`) computes what the `Decoder`'s full forward computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.model.decode_step import DecoderStep
from tests.model.model_testlib import forward, random_params, tiny_chameleon, tiny_config

CONFIGS = {"cm3leon": tiny_config(), "chameleon_gqa": tiny_chameleon(),
           "chameleon_swin": tiny_chameleon(block_order="swin"),
           "cm3leon_image_places": tiny_config(image_grid=2, image_code_ids=(200, 500),
                                               sentinel_ids=(5, 40)),
           "cm3leon_image_next_place": tiny_config(image_grid=2, image_next_place=True,
                                                   image_code_ids=(200, 500),
                                                   sentinel_ids=(5, 40))}


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["xla_dot", "cpu_kernels"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_steps_equal_the_full_forward(name, cpu_kernels):
    config = CONFIGS[name]
    params = random_params(config, seed=1)
    step = DecoderStep(config, cpu_kernels=cpu_kernels)
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


def test_image_code_places_count_each_image_from_its_first_code():
    from cm3leon_jax.model import layers

    config = tiny_config(image_grid=2, image_code_ids=(200, 500), sentinel_ids=(5, 40))
    # text, <break>, 5 codes (the 5th is past the 2 x 2 grid), <eos>, 2 codes (an
    # image-first document), a sentinel and 2 codes (an infilled span: no place).
    ids = [[60, 2, 201, 202, 203, 204, 205, 1, 300, 301, 7, 302, 303]]
    want = [[4, 4, 0, 1, 2, 3, 4, 4, 0, 1, 4, 4, 4]]
    ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.arange(ids.shape[1])[None]
    places, carry = layers.image_code_places(ids, positions, config)
    np.testing.assert_array_equal(places, want)
    assert int(carry[0]) == -1
    # Fed in pieces with the carry between them, the places are those of the whole.
    pieces, carry = [], None
    for start, stop in ((0, 3), (3, 4), (4, 9), (9, 13)):
        got, carry = layers.image_code_places(ids[:, start:stop], positions[:, start:stop],
                                              config, carry)
        pieces.append(got)
    np.testing.assert_array_equal(jnp.concatenate(pieces, axis=1), want)
    # A code that starts a packed segment (position 0) starts an image.
    restarted = positions.at[0, 11:].set(jnp.arange(2))
    np.testing.assert_array_equal(layers.image_code_places(ids, restarted, config)[0],
                                  [[4, 4, 0, 1, 2, 3, 4, 4, 0, 1, 4, 0, 1]])
    with pytest.raises(ValueError, match="image_code_ids"):
        tiny_config(image_grid=8)
    # Read back from JSON (an export's manifest): lists become tuples, the config hashes.
    assert hash(config.replace(image_code_ids=[200, 500])) == hash(config)
    from cm3leon_jax.model import hf_weights  # No HF model has them: refused, not dropped.
    with pytest.raises(ValueError, match="image_grid"):
        hf_weights.hf_config_kwargs(config, "opt")


def test_the_next_place_embedding_marks_the_code_each_position_predicts():
    """With image_next_place, a placed code gets its own place's row and column and those of
    the place after it; an image's last code only its own; every other token nothing."""
    from flax import linen as nn

    from cm3leon_jax.model import layers

    config = tiny_config(image_grid=2, image_next_place=True, image_code_ids=(200, 500),
                         sentinel_ids=(5, 40))
    module = layers.ImagePlaces(config)
    places = jnp.asarray([[4, 0, 1, 2, 3, 4]], jnp.int32)  # text, a 2 x 2 image, text
    variables = module.init(jax.random.key(0), places)
    out = np.asarray(module.apply(variables, places))
    p = {k: np.asarray(v) for k, v in nn.unbox(variables["params"]).items()}

    def at(table, place):
        return p[table][place // 2] if table.endswith("rows") else p[table][place % 2]

    for i, place in enumerate([0, 1, 2]):
        want = (at("rows", place) + at("cols", place) + at("next_rows", place + 1)
                + at("next_cols", place + 1))
        np.testing.assert_allclose(out[0, i + 1], want, atol=1e-8)
    np.testing.assert_allclose(out[0, 4], at("rows", 3) + at("cols", 3), atol=1e-8)
    assert not out[0, 0].any() and not out[0, 5].any()
    with pytest.raises(ValueError, match="image_next_place=True needs image_grid"):
        tiny_config(image_next_place=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_writes_put_the_same_bits_as_an_update_slice(dtype):
    from cm3leon_jax.model.decode_step import _write_slots

    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((2, 3, 10, 4)), dtype)
    new = jnp.asarray(rng.standard_normal((2, 3, 2, 4)), jnp.float32)
    got = jax.jit(_write_slots)(cache, new, jnp.int32(7))
    want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (0, 0, 7, 0))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
