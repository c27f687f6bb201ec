"""The train step: exact gradient accumulation, non-finite handling, sharding-invariance.

Steps use plain SGD with learning rate 1 so that params move by exactly the gradient
(AdamW would blow float32 noise in near-zero gradients up to full-size updates).
Compiling dominates the runtime, so each mesh's state and step functions are built once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_testlib import random_batch, tiny_config

from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.train import state as state_lib
from cm3leon_jax.train import step as step_lib

CONFIG = tiny_config()
BATCH = random_batch(8, 32, CONFIG.vocab_size, seed=1)
TX = optax.sgd(1.0)


@functools.lru_cache(maxsize=None)
def _setup(mesh_shape: tuple[int, ...]):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
    model = Decoder(CONFIG)
    with jax.set_mesh(mesh):
        state = state_lib.create_train_state(model, TX, mesh, seed=0)
    return mesh, model, state


@functools.lru_cache(maxsize=None)
def _step_fn(mesh_shape: tuple[int, ...], **kwargs):
    mesh, model, _ = _setup(mesh_shape)
    sharding = step_lib.batch_sharding(mesh, BATCH["decoder_input_tokens"].shape)
    fn = step_lib.jit_train_step(step_lib.make_train_step(model, TX, **kwargs),
                                 state_lib.state_shardings(model, TX, mesh), sharding, mesh)
    return fn, sharding


def _run(mesh_shape, steps=1, batch=BATCH, **kwargs):
    """`steps` updates on `batch` from the mesh's fresh state: (state, [metrics])."""
    mesh, _, state = _setup(mesh_shape)
    fn, sharding = _step_fn(mesh_shape, **kwargs)
    state = jax.tree.map(jnp.copy, state)  # The step donates its input.
    history = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, m = fn(state, jax.device_put(batch, sharding))
            history.append(jax.device_get(m))
    return state, history


def _deltas(mesh_shape, state):
    fresh = _setup(mesh_shape)[2]
    return [np.asarray(a) - np.asarray(b)
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh.params))]


FSDP = (2, 4, 1)  # data, fsdp, tensor
ONE = (1, 1, 1)


def test_microbatches_accumulate_to_the_full_batch_gradient():
    full, m1 = _run(FSDP, steps=2)
    accumulated, m4 = _run(FSDP, steps=2, num_microbatches=4)
    for a, b in zip(_deltas(FSDP, full), _deltas(FSDP, accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for k in ("loss", "grad_norm", "loss_weight"):
        np.testing.assert_allclose(m1[-1][k], m4[-1][k], rtol=1e-5)
    assert m1[1]["loss"] < m1[0]["loss"]  # It learns.


def test_sharded_step_matches_one_device():
    one, m1 = _run(ONE)
    many, m8 = _run(FSDP)
    np.testing.assert_allclose(m1[0]["loss"], m8[0]["loss"], rtol=1e-6)
    for a, b in zip(_deltas(ONE, one), _deltas(FSDP, many)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_is_flagged_and_skip_keeps_the_state(policy):
    weights = np.where(BATCH["decoder_loss_weights"] > 0, np.inf, 0.0).astype(np.float32)
    bad = dict(BATCH, decoder_loss_weights=weights)
    kwargs = {"on_nonfinite": "skip"} if policy == "skip" else {}  # "stop" is the default.
    state, (m,) = _run(FSDP, batch=bad, **kwargs)
    assert m["finite"] == 0.0 and not np.isfinite(m["loss"])
    assert int(state.step) == 1  # The step counts either way.
    unchanged = all(not d.any() for d in _deltas(FSDP, state))
    assert unchanged == (policy == "skip")


def test_microbatches_must_divide_the_batch():
    with pytest.raises(ValueError, match="num_microbatches=3"):
        step_lib.split_microbatches({"x": jnp.zeros((8, 4))}, 3)


def test_bf16_compute_keeps_float32_master_weights():
    """DecoderConfig.dtype='bfloat16': matmuls in bf16, params and Adam moments in f32."""
    config = tiny_config(dtype="bfloat16")
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    model = Decoder(config)
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh):
        state = state_lib.create_train_state(model, tx, mesh, seed=0)
        fn = jax.jit(step_lib.make_train_step(model, tx), donate_argnums=0)
        state, m = fn(state, BATCH)
    leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state[0].mu)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    _, (m32,) = _run(ONE)
    assert np.isfinite(float(m["loss"]))
    np.testing.assert_allclose(float(m["loss"]), m32["loss"], rtol=2e-2)
    assert float(m["loss"]) != m32["loss"]  # bf16 really was used.


def test_example_weighting_gives_each_packed_example_an_equal_share():
    """`loss_per="example"` is the token step on weights that give every segment the same
    total (the NumPy reference below), on a sharded mesh; the total weight is kept."""
    weights, seg = BATCH["decoder_loss_weights"], BATCH["decoder_segment_ids"]
    want = np.zeros_like(weights)
    n = sum(len(set(row[w > 0])) for row, w in zip(seg, weights))
    for b in range(weights.shape[0]):
        for s in set(seg[b][weights[b] > 0]):
            mine = seg[b] == s
            want[b, mine] = weights[b, mine] * weights.sum() / n / weights[b, mine].sum()
    got = step_lib.per_example_weights(jnp.asarray(weights), jnp.asarray(seg))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(float(got.sum()), weights.sum(), rtol=1e-6)
    reweighted = {**BATCH, "decoder_loss_weights": want}
    by_token, m_token = _run(FSDP, batch=reweighted)
    by_example, m_example = _run(FSDP, loss_per="example")
    for a, b in zip(_deltas(FSDP, by_token), _deltas(FSDP, by_example)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m_token[0]["loss"], m_example[0]["loss"], rtol=1e-5)
    # Rows without segment ids are one example each; unknown settings are refused.
    row = step_lib.per_example_weights(jnp.asarray(weights), None)
    np.testing.assert_allclose(row.sum(axis=1), weights.sum() / weights.shape[0], rtol=1e-6)
    with pytest.raises(ValueError, match="loss_weighting.per='sample'"):
        step_lib.loss_weighting("sample")
