"""Multi-process start-up and the training mesh (ICI axes within a slice, DCN across).

`initialize` must run before anything touches a JAX backend. It connects the
processes of one job through `jax.distributed.initialize`, from gin or from the
environment (set by `launch/` scripts)::

    CM3LEON_COORDINATOR=10.0.0.1:1234 CM3LEON_NUM_PROCESSES=2 CM3LEON_PROCESS_ID=0

or, on TPU pods / SLURM / Kubernetes, `initialize.auto = True` lets JAX discover it.
On CPU the processes talk through gloo collectives.

`train_mesh` builds the `(data, fsdp, tensor)` mesh: the per-slice sizes are those
of `make_mesh` (`make_mesh.fsdp = 8`, -1 = the rest), and `train_mesh.dcn_*` multiply
an axis across slices (multi-slice TPU: data-parallel over the data-center network),
so an axis's total size is `ici * dcn`. Slices are TPU slices where the devices say so,
nodes for GPUs under SLURM (one process per GPU there), otherwise processes (GPU hosts
elsewhere, or CPU processes in the tests).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import partitioning

log = logging.getLogger(__name__)


@gin.configurable
def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               cpu_collectives: str = "gloo") -> None:
    """Joins this process to a multi-process job, or does nothing for a single process.

    Args:
        coordinator_address: "host:port" of process 0's coordinator; default from
            `CM3LEON_COORDINATOR` (or `JAX_COORDINATOR_ADDRESS`).
        num_processes, process_id: default from `CM3LEON_NUM_PROCESSES` /
            `CM3LEON_PROCESS_ID`.
        auto: let JAX detect the cluster (TPU pods, SLURM, Kubernetes).
        cpu_collectives: cross-process collectives on CPU ("gloo" or "mpi").
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("CM3LEON_COORDINATOR") \
        or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "CM3LEON_NUM_PROCESSES" in env:
        num_processes = int(env["CM3LEON_NUM_PROCESSES"])
    if process_id is None and "CM3LEON_PROCESS_ID" in env:
        process_id = int(env["CM3LEON_PROCESS_ID"])
    if not auto and coordinator_address is None:
        return  # One process.
    if jax.distributed.is_initialized():
        return
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise UserInputError(f"initialize: coordinator {coordinator_address!r} is set but "
                                 "num_processes/process_id are not (bind them in gin or set "
                                 "CM3LEON_NUM_PROCESSES and CM3LEON_PROCESS_ID).")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d of %d; %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def gather(code: int) -> list[int]:
    """Every process's `code`, by process index: a barrier that carries each one's outcome
    of a step it took on its own, so that all of them act on the same outcome. Every process
    of the job must call it at the same point. One process (the job never joined): `[code]`,
    without starting XLA (a mode may still set its flags)."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return [int(code)]
    from jax.experimental import multihost_utils
    codes = multihost_utils.process_allgather(np.array([code], np.int32))
    return [int(c) for c in np.asarray(codes).reshape(-1)]


def all_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process of the job (`gather`): a step that failed on one
    process only (process 0's writes) then raises on every process instead of leaving the
    others waiting at the next collective."""
    return not any(gather(0 if ok else 1))


def _group(devices: Sequence[Any], key) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for d in devices:
        out.setdefault(key(d), []).append(d)
    return out


def _slices(devices: Sequence[Any]) -> tuple[dict[int, list[Any]], str]:
    """Devices grouped by what the DCN axes span, and that group's name: TPU slices where
    the devices say so; GPUs under SLURM by node (`SLURM_NODEID`: SLURM starts one process
    per GPU, and a device knows only its process, so every process's node is gathered);
    otherwise by process (one per GPU host elsewhere, or CPU processes in the tests).

    Groups are keyed, so ordered, by slice index or by their first process.
    """
    slices = _group(devices, lambda d: getattr(d, "slice_index", 0) or 0)
    if len(slices) > 1:
        return slices, "slices"
    node = os.environ.get("SLURM_NODEID", "")
    if getattr(devices[0], "platform", None) == "gpu" and node.isdigit():
        nodes = gather(int(node))  # By process index.
        first: dict[int, int] = {}
        for process, n in enumerate(nodes):
            first.setdefault(n, process)
        return _group(devices, lambda d: first[nodes[d.process_index]]), "nodes (SLURM_NODEID)"
    return _group(devices, lambda d: d.process_index), "processes"


@gin.configurable
def train_mesh(dcn_data: int = 1, dcn_fsdp: int = 1, dcn_tensor: int = 1,
               devices: Sequence[Any] | None = None) -> Mesh:
    """The `(data, fsdp, tensor)` mesh: `make_mesh`'s per-slice sizes times `dcn_*`."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    if min(dcn) < 1:
        raise UserInputError(f"train_mesh: dcn sizes must be >= 1; got {dcn}.")
    if math.prod(dcn) == 1:
        return partitioning.make_mesh(devices=devices)
    slices, what = _slices(devices)
    if len(slices) != math.prod(dcn):
        raise UserInputError(f"train_mesh: dcn_data*dcn_fsdp*dcn_tensor = {math.prod(dcn)} but "
                             f"there are {len(slices)} {what}; make them equal.")
    groups = [slices[k] for k in sorted(slices)]
    if len({len(g) for g in groups}) > 1:
        raise UserInputError(f"train_mesh: the {what} hold {[len(g) for g in groups]} devices; "
                             "the DCN axes need the same number in each.")
    # make_mesh resolves the gin-bound per-slice sizes (and their -1) on one slice.
    ici = tuple(partitioning.make_mesh(devices=groups[0]).devices.shape)
    # mesh_utils.create_hybrid_device_mesh's layout, over these groups (it groups only by
    # slice or by process): each group's ICI mesh, the groups tiled in the DCN shape.
    meshes = [mesh_utils.create_device_mesh(ici, g) for g in groups]
    blocks = np.vectorize(lambda i: meshes[i], otypes=[object])(
        np.arange(len(groups)).reshape(dcn))
    return Mesh(np.block(blocks.tolist()), partitioning.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(partitioning.MESH_AXES))
