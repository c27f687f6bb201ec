r"""Start a run as N processes on this machine: one JAX job, as on N hosts.

    python -m launch.local gin_configs/train/tiny.gin runs/tiny \
        [--num_processes=2] [--cpu_devices_per_process=1 | --gpus_per_process=1] \
        [--gin.KEY=VALUE ...] [--dry_run]

(`launch/local.sh` does the same after `make install`.) With one process this is
`python -m cm3leon_jax.main` itself. With N, each process gets CM3LEON_COORDINATOR
(a free port on 127.0.0.1), CM3LEON_NUM_PROCESSES and CM3LEON_PROCESS_ID, which
`train/distributed.py` turns into `jax.distributed.initialize`; on CPU the processes
talk through gloo. Each output line is prefixed with its process id; if one process
fails the others are stopped, and the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from typing import Sequence

from launch import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.local",
                                     description=__doc__.split("\n\n")[0])
    common.add_run_args(parser, "the run's MODEL_DIR", "gin_configs/train/tiny.gin")
    parser.add_argument("--num_processes", type=int, default=1)
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpu_devices_per_process", type=int, default=None,
                         help="fake CPU devices per process (XLA_FLAGS)")
    devices.add_argument("--gpus_per_process", type=int, default=None,
                         help="process i sees GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)")
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(args, port: int) -> list[dict[str, str]]:
    """The environment each process adds to this one's."""
    envs = []
    for i in range(args.num_processes):
        env = {}
        if args.num_processes > 1:
            env.update(CM3LEON_COORDINATOR=f"127.0.0.1:{port}",
                       CM3LEON_NUM_PROCESSES=str(args.num_processes),
                       CM3LEON_PROCESS_ID=str(i))
        if args.cpu_devices_per_process:
            env["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_"
                                f"device_count={args.cpu_devices_per_process}").strip()
        if args.gpus_per_process:
            g = args.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * g + j) for j in range(g))
        envs.append(env)
    return envs


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def run_all(argv: list[str], envs: list[dict[str, str]]) -> int:
    """Starts one process per env; returns 0, or the exit status of the first to fail."""
    procs, relays = [], []
    for i, env in enumerate(envs):
        proc = subprocess.Popen(argv, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        relays.append(threading.Thread(target=_relay, args=(proc, f"[{i}] "), daemon=True))
        relays[-1].start()
    failed = 0
    pending = list(procs)
    while pending:
        for proc in list(pending):
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(proc)
            if rc and not failed:
                failed = rc
                for other in pending:  # the others would wait for it forever
                    other.terminate()
    for t in relays:
        t.join(timeout=5)
    return failed


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    if args.num_processes < 1:
        raise common.LaunchError(f"--num_processes={args.num_processes}: must be >= 1")
    command = common.main_argv(sys.executable, [args.gin_file, *args.extra_gin_files],
                               args.model_dir, args.overrides)
    envs = process_envs(args, free_port())
    if args.dry_run:
        for env in envs:
            prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
            print(common.shell_line(prefix + command))
        return 0
    if args.num_processes == 1:
        return subprocess.call(command, env={**os.environ, **envs[0]})
    return run_all(command, envs)


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
