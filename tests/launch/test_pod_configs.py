"""Every pod config (gin_configs/pods/*.gin) parses, its mesh fits its slice, its header is true.

A pod file's header names its launch command, `# Topology: <gen>:<AxBxC>` (the chips),
`# Mesh: data D x fsdp F x tensor T` and what the AOT benchmark expects. Here: the file
parses with the trainer's gin, the bound mesh is the header's and uses exactly the
topology's chips, the batch splits into its micro-batches over the data axes, the
header's command runs through its launcher (`--dry_run`), and the header records the
AOT result. That the step compiles and fits is benchmarks/pod_configs.py (libtpu).
"""

import contextlib
import glob
import io
import math
import os
import re
import shlex

import gin
import pytest

from cm3leon_jax import main as main_lib
from launch import common, tpu_vm, xpk

FILES = sorted(glob.glob(os.path.join(common.REPO, "gin_configs", "pods", "*.gin")))


def header(path: str) -> str:
    with open(path) as f:
        return "".join(line for line in f if line.startswith("#"))


def bound(path: str) -> dict:
    gin.clear_config()
    try:
        main_lib.configure([path], ["MODEL_DIR='gs://bucket/run'"])
        keys = ["make_mesh.data", "make_mesh.fsdp", "make_mesh.tensor",
                "train.global_batch_size", "train.num_microbatches", "train.seq_len"]
        out = {k: gin.query_parameter(k) for k in keys}
        for k in ("train_mesh.dcn_data", "train_mesh.dcn_fsdp", "train_mesh.dcn_tensor"):
            try:
                out[k] = gin.query_parameter(k)
            except ValueError:
                out[k] = 1
        return out
    finally:
        gin.clear_config()


def test_there_are_pod_configs():
    names = {os.path.basename(f) for f in FILES}
    assert {"cm3leon_7b_v5p256.gin", "cm3leon_350m_v5e64.gin", "chameleon_7b_v5p256.gin"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_pod_config_mesh_fits_its_topology(path):
    text = header(path)
    topo = re.search(r"^# Topology: (\w+):(\d+(?:x\d+)*)", text, re.M)
    assert topo, f"{path}: header needs '# Topology: <gen>:<AxBxC>'"
    chips = math.prod(int(n) for n in topo.group(2).split("x"))
    mesh = re.search(r"^# Mesh: data (\d+) x fsdp (\d+) x tensor (\d+)", text, re.M)
    assert mesh, f"{path}: header needs '# Mesh: data D x fsdp F x tensor T'"
    b = bound(path)
    sizes = [b["make_mesh.data"], b["make_mesh.fsdp"], b["make_mesh.tensor"]]
    assert sizes == [int(n) for n in mesh.groups()], "header's mesh is not the bound one"
    dcn = [b["train_mesh.dcn_data"], b["train_mesh.dcn_fsdp"], b["train_mesh.dcn_tensor"]]
    assert math.prod(sizes) * math.prod(dcn) == chips
    data_ways = sizes[0] * sizes[1] * dcn[0] * dcn[1]
    per_step = b["train.global_batch_size"]
    assert per_step % (b["train.num_microbatches"] * data_ways) == 0
    assert re.search(r"^# Expected.*GiB per chip", text, re.M), "header needs the AOT result"


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_pod_config_header_commands_launch(path):
    lines = header(path).splitlines()
    commands, current = [], None
    for line in lines:
        body = line[1:].strip()
        if body.startswith("python -m launch."):
            current = body
        elif current is not None:
            current += " " + body
        if current is not None and not current.endswith("\\"):
            commands.append(current)
            current = None
        elif current is not None:
            current = current[:-1]
    assert any("launch.tpu_vm" in c for c in commands), "header needs its launch command"
    for command in commands:
        # "...": the gin file, MODEL_DIR and bindings of the header's first command.
        argv = shlex.split(command.replace("...", os.path.relpath(path, common.REPO)
                                           + " gs://BUCKET/run --gin.data_dirs.user="
                                           "\"'gs://BUCKET/data'\"", 1))
        module = {"launch.tpu_vm": tpu_vm, "launch.xpk": xpk}[argv[2]]
        with contextlib.redirect_stdout(io.StringIO()):
            assert module.launch([*argv[3:], "--dry_run"]) == 0


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_the_launchers_read_the_mesh_gin_binds(path):
    """launch/common.py reads the mesh from the gin text (the launchers import no jax):
    what it reads must be what gin binds."""
    b = bound(path)
    rel = os.path.relpath(path, common.REPO)
    assert common.bound_mesh([rel], []) == {k: b[k] for k in (*common.MESH_KEYS,
                                                             *common.DCN_KEYS)}
