"""The train state, created already sharded by the logical-axis rules.

Nothing here ever materializes a whole model on one host: shapes come from
`jax.eval_shape`, shardings from the parameters' logical names
(`model/partitioning.py`), and the state itself from one `jax.jit` whose
`out_shardings` are those shardings, so each device initializes only its own
shard (JAX's partitionable threefry makes the random values independent of the
mesh). The optimizer state's shardings mirror the parameters' via
`optax.tree_map_params`, so Adam's moments are split exactly like the weights
(ZeRO-3 under the `fsdp` axis) and scalars such as the step count are replicated.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder, abstract_variables


@flax.struct.dataclass
class TrainState:
    """What a training step reads and writes; a pytree (checkpointed whole).

    step: int32[] number of optimizer updates applied so far.
    params: the decoder's parameters (unboxed, in `DecoderConfig.param_dtype`).
    opt_state: the optax state of `tx`.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def param_axes(config) -> Any:
    """The logical axes (`PartitionSpec`s of names) of every parameter of the decoder."""
    return partitioning.logical_axes(abstract_variables(config)["params"])


def param_shardings(model: Decoder, mesh: Mesh, rules=None) -> tuple[Any, Any]:
    """(abstract params, their `NamedSharding`s) from the decoder's logical names."""
    boxed = abstract_variables(model.config)["params"]
    shapes = nn.unbox(boxed)
    logical = partitioning.logical_axes(boxed)
    return shapes, partitioning.logical_to_sharding(logical, mesh, rules, shapes)


def state_shardings(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=None) -> TrainState:
    """The `NamedSharding` of every leaf of the `TrainState` for `model` and `tx` on `mesh`."""
    shapes, params = param_shardings(model, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, shapes)
    # Leaves of the optimizer state that mirror a parameter (moments) take its
    # sharding; everything else (counts, scalars) is replicated.
    # (A partitioned optimizer, as Muon's, holds MaskedNode where a part skips a parameter.)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda x, sharding: x if masked(x) else sharding,
                                abstract_opt, params,
                                transform_non_params=lambda _: replicated, is_leaf=masked)
    return TrainState(step=replicated, params=params, opt_state=opt)


def abstract_train_state(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                         rules=None) -> TrainState:
    """`jax.ShapeDtypeStruct`s (with shardings) of the state: what orbax restores into."""
    shardings = state_shardings(model, tx, mesh, rules)
    shapes = jax.eval_shape(lambda: _init(model, tx, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def _init(model: Decoder, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(model.init(rng, tokens)["params"])
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))


def make_init_fn(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                 rules=None) -> Callable[[jax.Array], TrainState]:
    """`rng -> TrainState`, jitted so each device initializes only its own shard.

    Call it under `jax.set_mesh(mesh)` (the trainer does): the model's activation
    constraints read the mesh from there.
    """
    shardings = state_shardings(model, tx, mesh, rules)
    return jax.jit(lambda rng: _init(model, tx, rng), out_shardings=shardings)


def create_train_state(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                       seed: int, rules=None) -> TrainState:
    """A fresh state from `seed`, created sharded (see `make_init_fn`)."""
    return make_init_fn(model, tx, mesh, rules)(jax.random.key(seed))


def bytes_per_device(abstract_state: Any) -> int:
    """Bytes the largest device holds for `abstract_state` (leaves with `.sharding`)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        size = int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + size
    return max(per_device.values(), default=0)
