"""Launchers that start real processes here: they form one JAX job of 2 (seconds, no model).

`launch/local.sh` -> `launch.local` with --num_processes=2, and `launch/slurm_gpu.sbatch`
run under a stand-in `srun` that starts its tasks with the variables SLURM gives them,
so JAX's own SLURM discovery (`initialize.auto`) joins them. Both run the
`processes_mode` job (cm3leon_jax/testing/processes_mode.py); the training itself across
processes is tests/train/test_multihost.py.
"""

import json
import os
import socket
import stat
import subprocess
import sys

from launch import common

GIN = os.path.join("tests", "launch", "processes.gin")
TAG = "--gin.processes_mode.tag='a b \"c\"'"


def records(model_dir) -> list[dict]:
    return [json.load(open(os.path.join(model_dir, f"process_{i}.json"))) for i in range(2)]


def check_one_job_of_two(model_dir, proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:]
    for i, r in enumerate(records(model_dir)):
        assert (r["process_index"], r["process_count"], r["gathered"]) == (i, 2, [0, 1])
        assert r["tag"] == 'a b "c"'


def test_local_launcher_starts_two_processes(tmp_path):
    model_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.local", GIN, model_dir, "--num_processes=2",
         "--cpu_devices_per_process=2", TAG],
        cwd=common.REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    check_one_job_of_two(model_dir, proc)
    assert [r["devices"] for r in records(model_dir)] == [4, 4]


def free_job_id() -> int:
    """A SLURM_JOB_ID whose port (jax: 61440 + id % 4096) is free here."""
    for job_id in range(1000, 5096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id % 4096))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in jax's SLURM range")


FAKE_SRUN = """#!/usr/bin/env python3
# Stand-in for srun on one node: starts SLURM_NTASKS copies of its command with the
# variables srun sets per task, waits, and fails if one fails.
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(i),
                                     "SLURM_LOCALID": str(i), "SLURM_STEP_NODELIST": "localhost"})
         for i in range(n)]
sys.exit(max(p.wait() for p in procs))
"""


def test_slurm_script_joins_tasks_through_jax_discovery(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    model_dir = str(tmp_path / "run")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XLA_FLAGS": "",
           "SLURM_JOB_ID": str(free_job_id()), "SLURM_NTASKS": "2",
           "CM3LEON_PYTHON": sys.executable}
    env.pop("SLURM_SUBMIT_DIR", None)
    proc = subprocess.run(["bash", os.path.join("launch", "slurm_gpu.sbatch"), GIN, model_dir,
                           TAG], cwd=common.REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    proc.stdout += proc.stderr
    check_one_job_of_two(model_dir, proc)
