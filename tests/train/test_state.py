"""The train state is created sharded by the logical rules, the same on any mesh."""

import jax
import numpy as np
import pytest
from train_testlib import tiny_config

from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.train import optimizer
from cm3leon_jax.train import state as state_lib

CONFIG = tiny_config()


def _tx():
    return optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, decay_steps=10))


def _create(mesh, seeds=(3,)):
    with jax.set_mesh(mesh):
        init = state_lib.make_init_fn(Decoder(CONFIG), _tx(), mesh)
        states = [init(jax.random.key(s)) for s in seeds]
    return states if len(seeds) > 1 else states[0]


def test_every_leaf_is_sharded_by_its_logical_names():
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    state = _create(mesh)
    shapes, expected = state_lib.param_shardings(Decoder(CONFIG), mesh)
    flat_state = jax.tree_util.tree_leaves_with_path(state.params)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    for path, leaf in flat_state:
        assert leaf.sharding.spec == flat_expected[path].spec, jax.tree_util.keystr(path)
    adam = state.opt_state[1][0]  # chain(clip, adamw(scale_by_adam, ...))
    for moments in (adam.mu, adam.nu):
        for (path, m), (_, p) in zip(jax.tree_util.tree_leaves_with_path(moments), flat_state):
            assert m.sharding.spec == p.sharding.spec, jax.tree_util.keystr(path)
    assert adam.count.sharding.is_fully_replicated
    # FSDP and tensor parallelism: the MLP kernel [layers, embed, mlp] is split 4 ways.
    wi = state.params["layers"]["mlp"]["wi"]["kernel"]
    assert wi.addressable_shards[0].data.shape == (CONFIG.num_layers, CONFIG.d_model // 2,
                                                   CONFIG.mlp_dim // 2)


def test_same_seed_same_values_on_any_mesh():
    a, c = _create(partitioning.make_mesh(data=-1), seeds=(3, 4))
    b = _create(partitioning.make_mesh(data=1, fsdp=4, tensor=2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(c.params["token_embed"]["embedding"]),
                              np.asarray(a.params["token_embed"]["embedding"]))


@pytest.mark.parametrize("fsdp", [1, 8])
def test_bytes_per_device_shrinks_with_fsdp(fsdp):
    mesh = partitioning.make_mesh(data=8 // fsdp, fsdp=fsdp)
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), _tx(), mesh)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    # params + two Adam moments, all float32; split evenly by fsdp (d_model 64 / 8).
    assert state_lib.bytes_per_device(abstract) == pytest.approx(total / fsdp, rel=0.01)


def test_muons_momentum_is_sharded_as_its_matrix_and_adams_moments_as_theirs():
    """With `kind='muon'` the optimizer state is two parts, each holding moments of only
    some parameters (the others a MaskedNode): every moment takes its parameter's sharding."""
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, decay_steps=10),
                                  kind="muon", param_axes=state_lib.param_axes(CONFIG))
    with jax.set_mesh(mesh):
        state = state_lib.make_init_fn(Decoder(CONFIG), tx, mesh)(jax.random.key(3))
    params = dict(jax.tree_util.tree_leaves_with_path(state.params))
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        # A moment's path ends with its parameter's: [..., 'layers', 'mlp', 'wi', 'kernel'].
        for param_path, param in params.items():
            n = len(param_path)
            if path[-n:] == param_path and leaf.shape == param.shape:
                assert leaf.sharding.spec == param.sharding.spec, jax.tree_util.keystr(path)
                moments += 1
                break
        else:
            assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
    # Muon: one momentum for each of the 6 kernels; AdamW: two moments of the 2 embeddings.
    assert moments == 6 + 2 * 2
    wi_momentum = state.opt_state[1].inner_states["muon"].inner_state[0].mu
    assert wi_momentum["layers"]["mlp"]["wi"]["kernel"].addressable_shards[0].data.shape == (
        CONFIG.num_layers, CONFIG.d_model // 2, CONFIG.mlp_dim // 2)
