"""Meshes and logical-axis rules: the one place that decides where arrays live.

The decoder names the axes of its parameters and activations with *logical* names
(`batch`, `length`, `embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, `layers`). The
rules here map each logical name to zero or more *mesh* axes of a three-axis device
mesh `(data, fsdp, tensor)`::

    logical    default mesh axes     why
    batch      (data, fsdp)          FSDP is data parallelism whose params are split too
    embed      fsdp                  params' model dimension: ZeRO-3 style sharding
    mlp        tensor                Megatron-style: column- then row-parallel MLP
    heads      tensor                attention heads split across tensor-parallel chips
    kv_heads   tensor                (only where it divides: GQA may have few kv heads)
    vocab      tensor                embedding rows / logits columns
    kv, length, layers  -            head dim, sequence and the scanned layer axis stay whole

Changing parallelism is a gin change (`axis_rules.rules = [...]` and
`make_mesh.fsdp = 4`), not a code change.

How a name list becomes a `PartitionSpec` (flax's convention, which t5x and MaxText
users know): rules are tried in order; a rule applies to an array's dimension only if
none of its mesh axes is already used by that array. So for an activation
`[batch, length, embed]`, `batch` takes `(data, fsdp)` first and `embed` stays whole,
while a parameter `[embed, mlp]` gets `(fsdp, tensor)`. On top of flax's rule, a mesh
axis that does not divide the dimension evenly is dropped (the dimension is
replicated over it rather than padded), e.g. 8 kv heads on a 16-way tensor axis.

All three trainers take their mesh from `make_mesh` (the decoder's through
`train/distributed.train_mesh`); the VQGAN (`vocab/vqgan_train.py`) and CLIP
(`retrieval/clip_train.py`) trainers name only their batch axis (`batch`, split by
these rules, via `train/step.batch_sharding`) and keep their small weights replicated.
This module depends on nothing else in the package, and it is usable without gin:
every function takes explicit rules.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cm3leon_jax.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes) pairs, in priority order (see the module docstring).
LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


@gin.configurable
def axis_rules(rules: LogicalRules = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """The logical-to-mesh rules in force; bind `axis_rules.rules` in gin to change them."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise UserInputError(
                f"axis_rules: each rule must be (logical_name, mesh_axes); got {rule!r}."
            )
        name, axes = rule
        flat = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
        unknown = [a for a in flat if a is not None and a not in MESH_AXES]
        if unknown:
            raise UserInputError(f"axis_rules: rule {rule!r} names mesh axes {unknown}; "
                                 f"the mesh axes are {MESH_AXES}.")
        out.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all of them).

    Exactly one size may be -1, meaning "all remaining devices". Axes are `Auto`
    (the compiler propagates shardings from our constraints: the pjit style), so
    use it with `jax.set_mesh(mesh)` and `jax.jit(..., in_shardings, out_shardings)`.
    `jax.make_mesh` picks a device order that suits the hardware's topology
    (ICI rings on TPU), which matters for the `tensor` axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserInputError(f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be "
                             "positive, with at most one -1 (the remaining devices).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserInputError(f"make_mesh: {len(devices)} devices do not split into "
                                 f"fsdp*tensor*data = {known} x N; pick sizes that divide it.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserInputError(f"make_mesh(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) "
                             f"needs {math.prod(sizes)} devices; there are {len(devices)}.")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _mesh_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(mesh.shape)


def logical_to_mesh_axes(names: Sequence[str | None], rules: LogicalRules | None = None,
                         shape: Sequence[int] | None = None,
                         mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> PartitionSpec:
    """Logical axis names of one array -> its `PartitionSpec` of mesh axes.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped.
    """
    rules = axis_rules() if rules is None else rules
    assigned = nn.logical_to_mesh_axes(tuple(names), rules)
    spec = []
    for i, axes in enumerate(assigned):
        flat = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
        flat = tuple(a for a in flat if a is not None)
        if shape is not None and mesh is not None:
            sizes, kept, prod = _mesh_sizes(mesh), [], 1
            for a in flat:  # Keep the longest prefix whose product divides the dim.
                if shape[i] % (prod * sizes.get(a, 1)):
                    break
                prod *= sizes.get(a, 1)
                kept.append(a)
            flat = tuple(kept)
        spec.append(None if not flat else flat[0] if len(flat) == 1 else flat)
    while spec and spec[-1] is None:  # P('a', None) == P('a'); keep specs canonical.
        spec.pop()
    return PartitionSpec(*spec)


def logical_axes(boxed_tree: Any) -> Any:
    """The logical names of every leaf of a flax variable tree, as `PartitionSpec`s.

    Leaves created with `nn.with_logical_partitioning` carry their names; plain leaves
    get `PartitionSpec()` (replicated).
    """
    return nn.get_partition_spec(boxed_tree)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: LogicalRules | None = None,
                        shapes: Any | None = None) -> Any:
    """A tree of logical `PartitionSpec`s -> a tree of `NamedSharding`s on `mesh`.

    `shapes` (same structure; arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape`) lets mesh axes that do not divide a dimension be dropped.
    """
    rules = axis_rules() if rules is None else rules
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_axes(s, rules)),
                            logical_tree, is_leaf=_is_spec)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, logical_to_mesh_axes(s, rules, np.shape(x), mesh)),
        logical_tree, shapes, is_leaf=_is_spec)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None],
                            rules: LogicalRules | None = None) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without a mesh.

    Unlike `flax.linen.with_logical_constraint`, this reads our gin-bound rules and
    also applies on CPU, so the fake-device tests exercise the same constraints as a pod.
    The mesh is the one set with `jax.set_mesh`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"with_logical_constraint: names {tuple(names)} do not match an "
                         f"array of shape {x.shape}.")
    spec = logical_to_mesh_axes(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
