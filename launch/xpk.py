r"""Start a run on a GKE cluster with `xpk workload create` (TPU or GPU, one or more slices).

    python -m launch.xpk gin_configs/pods/cm3leon_7b_v5p256.gin gs://BUCKET/cm3leon_7b \
        --gin.data_dirs.user="'gs://BUCKET/data'" \
        --cluster=CLUSTER --workload=cm3leon-7b --device_type=v5p-256 [--num_slices=2] \
        [--max_restarts=3] [--docker_image=IMAGE] [--project=P --zone=Z] \
        [--gin.KEY=VALUE ...] [--dry_run]

xpk runs `--command` in a container on every host of every slice. The code gets there
one of two ways: `--docker_image` (an image with this repository in /app and its
dependencies installed; the command runs it as is), or by default xpk's own build:
it copies this checkout (`--script-dir`) onto `--base_docker_image` (python:3.11) and
the command first installs it (`pip install -e '.[tpu]'`, or `jax[cuda12]` on GPUs).

Processes find each other through `jax.distributed.initialize()`: on TPU it reads the
slice from GKE (`initialize.auto`); on GPU through the variables xpk sets
(JAX_COORDINATOR_ADDRESS/PORT, NNODES, NODE_RANK), passed on as CM3LEON_COORDINATOR,
CM3LEON_NUM_PROCESSES and CM3LEON_PROCESS_ID (one process per node, all its GPUs).
With `--num_slices=N` on TPU the data axis also spans slices over DCN
(`train_mesh.dcn_data=N`, unless given). `--max_restarts` restarts the job after
a failure or preemption (a preempted run saves and exits 42, xpk's restart status); the
trainer resumes from MODEL_DIR's latest checkpoint.
"""

from __future__ import annotations

import argparse
import re
from typing import Sequence

from launch import common

# xpk's GPU node types (its system_characteristics table, xpk 1.16) and the GPUs of one
# node; TPU slices are "<generation>-<N>" (v4-8, v5litepod-16, v5p-128, v6e-256), checked
# by `common.check_tpu_type`.
GPU_TYPES = {"l4-1": 1, "l4-2": 2, "l4-4": 4, "l4-8": 8, "a100-40gb-1": 1, "a100-40gb-2": 2,
             "a100-40gb-4": 4, "a100-40gb-8": 8, "h100-80gb-8": 8, "h100-mega-80gb-8": 8,
             "h200-141gb-8": 8, "b200-8": 8, "gb200-4": 4, "gb200-4-nolssd": 4}
# Exit statuses after which the job is restarted, besides xpk's own (42, 127-255):
# 1 is an uncaught Python exception, e.g. a collective that failed with a lost host.
RESTART_EXIT_CODES = "1"
# With --max_restarts, a run stopped by SIGTERM (a preemption) saves and exits with xpk's
# own restart status, so that xpk starts it again and it resumes; without, it exits 0
# (saved and stopped, as everywhere else).
PREEMPTED_EXIT_CODE = 42
GPU_ENV = ("CM3LEON_COORDINATOR=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT} "
           "CM3LEON_NUM_PROCESSES=${NNODES} CM3LEON_PROCESS_ID=${NODE_RANK}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.xpk",
                                     description=__doc__.split("\n\n")[0])
    common.add_run_args(parser)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--workload", required=True,
                        help="workload name: lower-case letters, digits and '-'")
    parser.add_argument("--device_type", required=True,
                        help="xpk's device type: a TPU slice (v5p-256, v5litepod-64) or a GPU "
                        "node type (h100-80gb-8, h200-141gb-8)")
    parser.add_argument("--num_slices", type=int, default=1, help="TPU slices (multislice)")
    parser.add_argument("--num_nodes", type=int, default=1, help="GPU nodes")
    parser.add_argument("--max_restarts", type=int, default=0)
    parser.add_argument("--priority", default=None,
                        choices=["very-low", "low", "medium", "high", "very-high"])
    parser.add_argument("--project", default=None)
    parser.add_argument("--zone", default=None)
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--docker_image", default=None,
                       help="an image with this repository in /app, installed")
    image.add_argument("--base_docker_image", default="python:3.11",
                       help="image xpk copies this checkout onto (default python:3.11)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the container")
    return parser


def is_gpu(device_type: str) -> bool:
    return device_type in GPU_TYPES


def quote(arg: str) -> str:
    """Quotes one argument for bash without `"` or `\\` outside `\\xNN` escapes.

    xpk puts the command into a YAML double-quoted string (the COMMAND variable of GPU
    jobs), where a `"` ends the string and `\\x27` is a valid escape; bash's `$'...'`
    form decodes the same escapes, so the argument survives both.
    """
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if not re.search(r"['\"\\]", arg):
        return f"'{arg}'"
    return "$'" + "".join(f"\\x{ord(c):02x}" if c in "'\"\\" else c for c in arg) + "'"


def launcher_bindings(args) -> dict[str, str]:
    """The gin bindings this launcher adds: TPU process discovery, and the slices over DCN
    as `train_mesh.dcn_data` when the run binds no DCN axis itself."""
    bindings = {} if is_gpu(args.device_type) else {"initialize.auto": "True"}
    dcn = common.bound_values([args.gin_file, *args.extra_gin_files], args.overrides, None,
                              common.DCN_KEYS)
    if args.num_slices > 1 and not dcn:
        bindings["train_mesh.dcn_data"] = str(args.num_slices)
    return bindings


def command(args) -> str:
    """The `--command` xpk runs in the container, from /app (this repository)."""
    gpu = is_gpu(args.device_type)
    argv = common.main_argv("python3", [args.gin_file, *args.extra_gin_files], args.model_dir,
                            args.overrides, launcher_bindings(args))
    line = " ".join(quote(a) for a in argv)
    if args.max_restarts:
        line = f"CM3LEON_PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE} {line}"
    if gpu:
        line = f"{GPU_ENV} {line}"
    if args.docker_image is None:
        targets = [".", "jax[cuda12]==0.10.2"] if gpu else [".[tpu]"]
        install = ["python3", "-m", "pip", "install", "-q", "-e", *targets]
        line = f"{' '.join(quote(a) for a in install)} && {line}"
    else:  # xpk sets no working folder for a user's image; the gin paths are /app's.
        line = f"cd /app && {line}"
    return line


def xpk_argv(args) -> list[str]:
    argv = ["xpk", "workload", "create", f"--cluster={args.cluster}",
            f"--workload={args.workload}", f"--device-type={args.device_type}",
            f"--command={command(args)}"]
    if is_gpu(args.device_type):
        argv.append(f"--num-nodes={args.num_nodes}")
    else:
        argv.append(f"--num-slices={args.num_slices}")
    argv.append(f"--max-restarts={args.max_restarts}")
    if args.max_restarts:
        argv.append(f"--restart-on-exit-codes={RESTART_EXIT_CODES}")
    if args.docker_image:
        argv.append(f"--docker-image={args.docker_image}")
    else:
        argv += [f"--base-docker-image={args.base_docker_image}", f"--script-dir={common.REPO}"]
    argv += [f"--{k}={v}" for k, v in (("project", args.project), ("zone", args.zone),
                                       ("priority", args.priority)) if v]
    argv += [f"--env={e}" for e in args.env]
    return argv


def check(args) -> None:
    common.check_gin_files([args.gin_file, *args.extra_gin_files], shipped=True)
    if not args.model_dir.startswith("gs://"):
        raise common.LaunchError(f"MODEL_DIR {args.model_dir!r} is not a gs:// folder; every "
                                 "pod must write to the same place")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.workload):
        raise common.LaunchError(f"--workload={args.workload!r}: use lower-case letters, "
                                 "digits and '-', starting with a letter")
    for name in ("num_slices", "num_nodes", "max_restarts"):
        if getattr(args, name) < (0 if name == "max_restarts" else 1):
            raise common.LaunchError(f"--{name}={getattr(args, name)}: must be >= "
                                     f"{0 if name == 'max_restarts' else 1}")
    family = args.device_type.split("-")[0]
    if not is_gpu(args.device_type) and family in {t.split("-")[0] for t in GPU_TYPES} | {
            "n2", "m1"}:  # xpk's CPU node families.
        raise common.LaunchError(f"--device_type={args.device_type!r} is not a GPU node type "
                                 f"xpk knows: one of {', '.join(GPU_TYPES)} (CPU node types "
                                 "are not supported here)")
    if is_gpu(args.device_type) and args.num_slices != 1:
        raise common.LaunchError("--num_slices is for TPU slices; for GPUs give --num_nodes")
    if not is_gpu(args.device_type) and args.num_nodes != 1:
        raise common.LaunchError(f"--num_nodes is for GPU node types; {args.device_type!r} is "
                                 "a TPU slice: give --num_slices")
    for e in args.env:
        if "=" not in e or '"' in e or "\\" in e:
            raise common.LaunchError(f"--env={e!r}: write KEY=VALUE, without \" or \\ "
                                     "(xpk puts values in YAML double quotes)")
    gin_files = [args.gin_file, *args.extra_gin_files]
    if is_gpu(args.device_type):  # One process per node: the DCN axes span the nodes.
        nodes = f"node{'s' * (args.num_nodes > 1)} (--num_nodes={args.num_nodes})"
        common.check_mesh_fits(gin_files, args.overrides,
                               GPU_TYPES[args.device_type] * args.num_nodes,
                               f"--device_type={args.device_type} x --num_nodes="
                               f"{args.num_nodes}", launcher_bindings(args),
                               (args.num_nodes, nodes))
    else:
        chips = common.check_tpu_type("--device_type", args.device_type)
        slices = f"slice{'s' * (args.num_slices > 1)} (--num_slices={args.num_slices})"
        common.check_mesh_fits(gin_files, args.overrides, chips * args.num_slices,
                               f"--device_type={args.device_type} x --num_slices="
                               f"{args.num_slices}", launcher_bindings(args),
                               (args.num_slices, slices))
    common.check_data_dirs(gin_files, args.overrides, "the cluster", remote=True)


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    check(args)
    common.Runner(args.dry_run).run(xpk_argv(args), cwd=common.REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
