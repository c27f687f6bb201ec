"""Sharded training math equals unsharded, on 8 fake CPU devices, for four mesh layouts.

Each parameter's sharding is checked against a table written by hand from the default
rules (module docstring of `partitioning.py`), not computed by the code under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_testlib import packed_batch, random_params, tiny_chameleon, tiny_config

from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder, abstract_variables
from cm3leon_jax.model.loss import decoder_loss

LAYOUTS = {  # name: (data, fsdp, tensor)
    "data": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "data_tensor": (2, 1, 4),
    "fsdp_tensor": (1, 4, 2),
}


def expected_spec(path: str, tensor: int, kv_heads: int) -> P:
    """What the default rules say, for the tiny configs (every other dim divides evenly)."""
    kv = "tensor" if kv_heads % tensor == 0 else None  # 2 kv heads do not split 4 ways.
    table = {
        "['token_embed']['embedding']": P("tensor", "fsdp"),      # [vocab, embed]
        "['position_embed']['embedding']": P(None, "fsdp"),       # [length, embed]
        "['lm_head']['kernel']": P("fsdp", "tensor"),             # [embed, vocab]
        "['final_norm']['scale']": P("fsdp"),                     # [embed]
        "['layers']['attention']['query']['kernel']": P(None, "fsdp", "tensor"),
        "['layers']['attention']['key']['kernel']": P(None, "fsdp", kv),
        "['layers']['attention']['value']['kernel']": P(None, "fsdp", kv),
        "['layers']['attention']['out']['kernel']": P(None, "tensor", None, "fsdp"),
        "['layers']['attention']['query_norm']['scale']": P(None, "tensor"),
        "['layers']['attention']['query_norm']['bias']": P(None, "tensor"),
        "['layers']['attention']['key_norm']['scale']": P(None, kv),
        "['layers']['attention']['key_norm']['bias']": P(None, kv),
        "['layers']['attention_norm']['scale']": P(None, "fsdp"),
        "['layers']['mlp_norm']['scale']": P(None, "fsdp"),
        "['layers']['mlp']['wi']['kernel']": P(None, "fsdp", "tensor"),
        "['layers']['mlp']['wi_gate']['kernel']": P(None, "fsdp", "tensor"),
        "['layers']['mlp']['wi_up']['kernel']": P(None, "fsdp", "tensor"),
        "['layers']['mlp']['wo']['kernel']": P(None, "tensor", "fsdp"),
    }
    return table[path]


CASES = ([("chameleon", layout) for layout in LAYOUTS] + [("cm3leon", "fsdp_tensor")]
         + [("cm3leon_fused_head", "fsdp_tensor"), ("chameleon_fused_head", "data_tensor")])


def _loss_and_grad(config):
    model = Decoder(config)
    # The train step's form (no accuracy), so that `loss_chunk` fuses the head.
    fn = lambda p, b: decoder_loss(model, p, b, z_loss=1e-4, accuracy=False)[0]
    return lambda p, b: jax.value_and_grad(fn)(p, b)


@functools.lru_cache(maxsize=None)
def _setup(variant: str):
    """(config, params, batch, unsharded loss, unsharded grads) for one variant; a
    "_fused_head" variant is compared with the same model's loss on whole logits."""
    base = variant.removesuffix("_fused_head")
    config = tiny_chameleon() if base == "chameleon" else tiny_config()
    params = random_params(config, seed=7)
    batch = packed_batch(8, 32, config.vocab_size, seed=8)
    loss, grads = jax.jit(_loss_and_grad(config))(params, batch)  # No mesh: one device.
    if variant != base:
        config = config.replace(loss_chunk=8)
    return config, params, batch, loss, grads


@pytest.mark.parametrize("variant,layout", CASES)
def test_sharded_loss_and_grads_equal_unsharded(variant, layout):
    config, params, batch, ref_loss, ref_grads = _setup(variant)
    loss_and_grad = _loss_and_grad(config)

    data, fsdp, tensor = LAYOUTS[layout]
    mesh = partitioning.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    logical = partitioning.logical_axes(abstract_variables(config)["params"])
    param_sharding = partitioning.logical_to_sharding(logical, mesh, shapes=params)
    batch_sharding = NamedSharding(mesh, partitioning.logical_to_mesh_axes(("batch", "length")))
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, param_sharding)
        sharded_batch = jax.device_put(batch, batch_sharding)
        step = jax.jit(loss_and_grad, out_shardings=(NamedSharding(mesh, P()), param_sharding))
        loss, grads = step(sharded_params, sharded_batch)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5),
                 grads, ref_grads)

    flat = jax.tree_util.tree_flatten_with_path(sharded_params)[0]
    for path, arr in flat:
        name = jax.tree_util.keystr(path)
        want = NamedSharding(mesh, expected_spec(name, tensor, config.kv_heads))
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (name, arr.sharding.spec, want.spec)
    # The batch is split over data and fsdp together: 8 rows -> 1 per device.
    assert sharded_batch["decoder_input_tokens"].addressable_shards[0].data.shape == (
        8 // (data * fsdp), 32)


def test_activation_constraints_follow_the_rules():
    """The MLP hidden state's constraint splits it over `tensor` (Megatron) under a mesh."""
    config = tiny_config()
    mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4)

    def hidden(x):  # Just the constraint the MLP applies, on its own.
        return partitioning.with_logical_constraint(x * 2, ("batch", "length", "mlp"))

    with jax.set_mesh(mesh):
        out = jax.jit(hidden)(jnp.ones((8, 16, config.mlp_dim)))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "tensor")), 3)
    # Without a mesh the constraint is a no-op (the single-device path of every test).
    np.testing.assert_array_equal(hidden(jnp.ones((2, 3, 4))), 2 * jnp.ones((2, 3, 4)))
