"""The SLURM job: what `launch/slurm_gpu.sbatch` hands srun, and the mesh of its one
process per GPU.

The script runs under a stand-in `srun` that records its arguments, environment and
working folder. The mesh is `train_mesh` over stand-in GPU devices (one per process, as
SLURM starts them): the DCN axes span nodes, grouped by every process's SLURM_NODEID.
"""

import json
import os
import stat
import subprocess
import sys

import gin
import jax
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.train import distributed
from launch import common, slurm

GIN = "gin_configs/train/cm3leon_350m.gin"
RECORDING_SRUN = """#!{python}
import json, os, sys
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
               "cpus": os.environ.get("SLURM_CPUS_PER_TASK")}}, f)
"""


def run_script(tmp_path, cwd: str, **env) -> dict:
    """Runs the sbatch script as SLURM would (its environment), from `cwd`; what srun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun.json"
    srun = bin_dir / "srun"
    srun.write_text(RECORDING_SRUN.format(python=sys.executable, record=str(record)))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    script = os.path.join(common.REPO, slurm.SCRIPT)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "CM3LEON_PYTHON": sys.executable, **env}
    for key in ("SLURM_SUBMIT_DIR", "SLURM_CPUS_PER_TASK"):
        if key not in env:
            full_env.pop(key, None)
    subprocess.run(["bash", script, GIN, "/shared/run"], cwd=cwd, env=full_env, check=True,
                   capture_output=True, text=True, timeout=60)
    return json.loads(record.read_text())


def test_srun_gets_the_jobs_cpus_per_task(tmp_path):
    """Since Slurm 22.05 srun does not take --cpus-per-task from sbatch: each task would get
    one CPU."""
    got = run_script(tmp_path, common.REPO, SLURM_CPUS_PER_TASK="8")
    assert "--cpus-per-task=8" in got["argv"] and got["cpus"] == "8"
    assert got["argv"].index("--cpus-per-task=8") < got["argv"].index("-m")
    got = run_script(tmp_path, common.REPO)  # not set: srun's own default
    assert not any(a.startswith("--cpus-per-task") for a in got["argv"])


def test_the_job_runs_in_its_working_folder_not_the_submit_folder(tmp_path):
    """`sbatch --chdir=REPO` starts the job in REPO; SLURM_SUBMIT_DIR is where sbatch ran."""
    submitted_from = tmp_path / "elsewhere"
    submitted_from.mkdir()
    got = run_script(tmp_path, common.REPO, SLURM_SUBMIT_DIR=str(submitted_from))
    assert got["cwd"] == common.REPO and f"--gin_file={GIN}" in got["argv"]


class FakeGpu:
    """A GPU of one SLURM task: each process sees the one GPU of its local rank."""
    platform = "gpu"
    device_kind = "stand-in GPU"

    def __init__(self, device, process_index: int):
        self.id, self.process_index = device.id, process_index

    def __repr__(self):
        return f"gpu{self.id}@process{self.process_index}"


@pytest.fixture
def gpus():
    """Eight GPUs, one per process: two nodes of four, SLURM's cyclic task layout (process
    i on node i % 2)."""
    gin.clear_config()
    yield [FakeGpu(d, i) for i, d in enumerate(jax.devices()[:8])]
    gin.clear_config()


def test_dcn_axes_span_nodes_when_slurm_runs_a_process_per_gpu(gpus, monkeypatch):
    nodes = [i % 2 for i in range(8)]
    gathered = []
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setattr(distributed, "gather", lambda code: gathered.append(code) or nodes)
    mesh = distributed.train_mesh(dcn_data=2, devices=gpus)
    assert gathered == [1]  # this process's node, gathered once
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    # The data axis: node 0's four GPUs, then node 1's.
    assert [d.process_index for d in mesh.devices.flat] == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(UserInputError, match="= 4 but there are 2 nodes \\(SLURM_NODEID\\)"):
        distributed.train_mesh(dcn_data=2, dcn_fsdp=2, devices=gpus)
    nodes[:] = [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(UserInputError, match="the nodes \\(SLURM_NODEID\\) hold \\[3, 5\\]"):
        distributed.train_mesh(dcn_data=2, devices=gpus)


def test_without_slurm_or_on_cpu_each_process_is_a_group(gpus, monkeypatch):
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    monkeypatch.setattr(distributed, "gather", lambda code: pytest.fail("gathered"))
    with pytest.raises(UserInputError, match="= 2 but there are 8 processes"):
        distributed.train_mesh(dcn_data=2, devices=gpus)
    mesh = distributed.train_mesh(dcn_data=8, devices=gpus)
    assert [d.process_index for d in mesh.devices.flat] == list(range(8))
    # CPU processes (the tests' multi-process jobs) stay processes inside a SLURM job too.
    monkeypatch.setenv("SLURM_NODEID", "0")
    with pytest.raises(UserInputError, match="= 2 but there are 1 processes"):
        distributed.train_mesh(dcn_data=2, devices=jax.devices())


def test_the_mesh_is_jaxs_hybrid_mesh_where_jax_can_build_it(monkeypatch):
    """Grouped by process (what create_hybrid_device_mesh can group by), train_mesh lays
    the devices out exactly as jax does."""
    from jax.experimental import mesh_utils
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    gin.clear_config()
    processes = [FakeGpu(d, i // 2) for i, d in enumerate(jax.devices()[:8])]
    processes = processes[1::2] + processes[::2]  # not in process order
    for dcn in [(4, 1, 1), (2, 1, 2), (1, 2, 2)]:
        mesh = distributed.train_mesh(*dcn, devices=processes)
        ici = [mesh.devices.shape[i] // dcn[i] for i in range(3)]
        expected = mesh_utils.create_hybrid_device_mesh(ici, dcn, processes,
                                                        process_is_granule=True)
        assert mesh.devices.tolist() == expected.tolist()
