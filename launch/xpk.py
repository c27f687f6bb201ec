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

# xpk names GPU machine types "<gpu>-<memory>-<count>[-<variant>]" (a3 / a4 / a3-mega
# families: h100-80gb-8, h100-mega-80gb-8, b200-8, gb200-4-nolssd) and TPU slices
# "<generation>-<chips or cores>" (v4-8, v5litepod-16, v5p-128, v6e-256, tpu7x-64).
GPU_TYPE = re.compile(r"^(h100|h200|b200|a100|l4|gb200)(-[\w]+)*$")
TPU_TYPE = re.compile(r"^(v\d+[a-z]*|v5litepod|tpu\d+[a-z]*)-\d+$")
# Exit statuses after which the job is restarted, besides xpk's own (42, 127-255):
# 1 is an uncaught Python exception, e.g. a collective that failed with a lost host.
RESTART_EXIT_CODES = "1"
# A run stopped by SIGTERM (a preemption) saves and exits with xpk's own restart status,
# so that --max_restarts resumes it (with 0, xpk takes the job as finished).
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
    return bool(GPU_TYPE.match(device_type))


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
    """The gin bindings this launcher adds: TPU process discovery, the slices over DCN."""
    bindings = {} if is_gpu(args.device_type) else {"initialize.auto": "True"}
    if args.num_slices > 1 and not common.overridden(args.overrides, "train_mesh.dcn_data"):
        bindings["train_mesh.dcn_data"] = str(args.num_slices)
    return bindings


def command(args) -> str:
    """The `--command` xpk runs in the container, from /app (this repository)."""
    gpu = is_gpu(args.device_type)
    argv = common.main_argv("python3", [args.gin_file, *args.extra_gin_files], args.model_dir,
                            args.overrides, launcher_bindings(args))
    line = " ".join(quote(a) for a in argv)
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
    if not (is_gpu(args.device_type) or TPU_TYPE.match(args.device_type)):
        raise common.LaunchError(f"--device_type={args.device_type!r} is neither a TPU slice "
                                 "(e.g. v5p-128, v5litepod-16) nor a GPU type xpk knows (e.g. "
                                 "h100-80gb-8); CPU node types are not supported here")
    if is_gpu(args.device_type) and args.num_slices != 1:
        raise common.LaunchError("--num_slices is for TPU slices; for GPUs give --num_nodes")
    if not is_gpu(args.device_type) and args.num_nodes != 1:
        raise common.LaunchError(f"--num_nodes is for GPU node types; {args.device_type!r} is "
                                 "a TPU slice: give --num_slices")
    for e in args.env:
        if "=" not in e or '"' in e or "\\" in e:
            raise common.LaunchError(f"--env={e!r}: write KEY=VALUE, without \" or \\ "
                                     "(xpk puts values in YAML double quotes)")
    if not is_gpu(args.device_type):  # GPU type names give no reliable GPU count.
        chips = common.tpu_devices(args.device_type)
        # One slice: train_mesh's DCN groups are its hosts, whose count is not known here.
        slices = ((args.num_slices, f"slices (--num_slices={args.num_slices})")
                  if args.num_slices > 1 else None)
        common.check_mesh_fits([args.gin_file, *args.extra_gin_files], args.overrides,
                               chips and chips * args.num_slices,
                               f"--device_type={args.device_type} x --num_slices="
                               f"{args.num_slices}", launcher_bindings(args), slices)


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    check(args)
    common.Runner(args.dry_run).run(xpk_argv(args), cwd=common.REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
