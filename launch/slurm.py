r"""Submit a run to a SLURM GPU cluster: `sbatch launch/slurm_gpu.sbatch` with the job's shape.

    python -m launch.slurm gin_configs/train/cm3leon_350m.gin /shared/runs/350m \
        --gin.data_dirs.user="'/shared/data'" --nodes=2 --gpus_per_node=8 \
        [--partition=P] [--account=A] [--time=2-00:00:00] [--gin.KEY=VALUE ...] [--dry_run]

(The size's train file runs on GPUs unchanged: its FSDP mesh takes whatever devices
the job has; the hardware and timings in its header are the TPU slice's. No GPU
topology has its own gin file: none was benchmarked here.)

One task per GPU (`--ntasks-per-node` = `--gpus-per-node`); the script's `srun` starts
them, and `jax.distributed.initialize()` discovers the job from SLURM and gives each
task the GPU of its local rank (see launch/slurm_gpu.sbatch). Submitted from the
repository root (`--chdir`), so every node runs this checkout's code and `.venv`:
the repository must be on a file system all nodes share. MODEL_DIR: a shared folder
or `gs://`. DCN axes (`train_mesh.dcn_*`) span nodes: their product is 1 or `--nodes`
(`train_mesh` groups the GPUs by `SLURM_NODEID`). The job's size is checked before
submitting: the mesh (a -1 size resolved on its GPUs) and the batch's split over it.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from launch import common

SCRIPT = os.path.join("launch", "slurm_gpu.sbatch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm",
                                     description=__doc__.split("\n\n")[0])
    common.add_run_args(parser, "the run's MODEL_DIR: a folder every node sees, or gs://",
                        example_gin_file="gin_configs/train/cm3leon_350m.gin")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
    parser.add_argument("--job_name", default="cm3leon")
    parser.add_argument("--python", default=None,
                        help="the Python on the nodes (default: the repository's .venv)")
    return parser


def sbatch_argv(args) -> list[str]:
    """argv of the `sbatch` command: the job's shape, the script, then its arguments."""
    for name in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise common.LaunchError(f"--{name}={getattr(args, name)}: must be >= 1")
    argv = ["sbatch", f"--chdir={common.REPO}", f"--job-name={args.job_name}",
            f"--nodes={args.nodes}", f"--ntasks-per-node={args.gpus_per_node}",
            f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_task}",
            f"--output={os.path.join(common.REPO, 'slurm-%j.out')}"]
    argv += [f"--{k}={v}" for k, v in (("partition", args.partition),
                                       ("account", args.account), ("time", args.time)) if v]
    if args.python:
        argv.append(f"--export=ALL,CM3LEON_PYTHON={args.python}")
    # The script passes what follows MODEL_DIR to `cm3leon_jax.main`: the other gin files
    # (parsed after GIN_FILE, before any binding), then the bindings.
    return argv + [SCRIPT, args.gin_file, args.model_dir,
                   *[f"--gin_file={f}" for f in args.extra_gin_files], *args.overrides]


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    gin_files = [args.gin_file, *args.extra_gin_files]
    common.check_gin_files(gin_files)
    sbatch = sbatch_argv(args)
    nodes = f"node{'s' * (args.nodes > 1)} (--nodes={args.nodes})"
    common.check_mesh_fits(gin_files, args.overrides, args.nodes * args.gpus_per_node,
                           f"the job (--nodes={args.nodes} x --gpus_per_node="
                           f"{args.gpus_per_node} GPUs)", slices=(args.nodes, nodes))
    common.check_data_dirs(gin_files, args.overrides, "the job", remote=False)
    common.Runner(args.dry_run).run(sbatch, cwd=common.REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
