"""Meshes and logical-axis rules (no decoder involved: other networks share this module)."""

from __future__ import annotations

import os
import subprocess
import sys

import gin
import jax
import pytest
from jax.sharding import PartitionSpec as P

from cm3leon_jax.model import partitioning


def test_partitioning_does_not_import_the_decoder():
    code = ("import sys, cm3leon_jax.model.partitioning; "
            "assert not [m for m in sys.modules if m.startswith('cm3leon_jax.model.')"
            " and m != 'cm3leon_jax.model.partitioning'], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize(
    "sizes,want",
    [
        (dict(), (8, 1, 1)),
        (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
        (dict(data=1, fsdp=-1, tensor=4), (1, 2, 4)),
    ],
)
def test_make_mesh_fills_the_remaining_axis(sizes, want):
    mesh = partitioning.make_mesh(**sizes)
    assert tuple(mesh.shape.values()) == want and mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes,msg", [
    (dict(data=3), "needs 3 devices"), (dict(data=-1, fsdp=3), "do not split"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
])
def test_make_mesh_errors(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        partitioning.make_mesh(**sizes)


def test_rules_priority_and_divisibility():
    # Activations: batch takes data and fsdp first, so embed stays whole.
    assert partitioning.logical_to_mesh_axes(("batch", "length", "embed")) == P(("data", "fsdp"))
    # Parameters: embed -> fsdp, mlp -> tensor.
    assert partitioning.logical_to_mesh_axes(("embed", "mlp")) == P("fsdp", "tensor")
    mesh = partitioning.make_mesh(data=1, fsdp=2, tensor=4)
    # 2 kv heads do not split 4 ways: replicated rather than padded.
    assert partitioning.logical_to_mesh_axes(("embed", "kv_heads", "kv"), shape=(64, 2, 16),
                                             mesh=mesh) == P("fsdp")
    assert partitioning.logical_to_mesh_axes(("embed", "kv_heads", "kv"), shape=(64, 8, 16),
                                             mesh=mesh) == P("fsdp", "tensor")


def test_rules_are_gin_configurable():
    gin.clear_config()
    try:
        gin.parse_config("axis_rules.rules = [('batch', 'data'), ('embed', 'tensor')]")
        assert partitioning.logical_to_mesh_axes(("batch", "embed")) == P("data", "tensor")
        assert partitioning.logical_to_mesh_axes(("mlp",)) == P()  # No rule: replicated.
        gin.parse_config("axis_rules.rules = [('batch', 'pods')]")
        with pytest.raises(ValueError, match="names mesh axes"):
            partitioning.axis_rules()
    finally:
        gin.clear_config()
