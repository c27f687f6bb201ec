r"""Start a run on a Cloud TPU VM slice, through a queued resource (created, or reused).

    python -m launch.tpu_vm gin_configs/pods/cm3leon_7b_v5p256.gin gs://BUCKET/cm3leon_7b \
        --gin.data_dirs.user="'gs://BUCKET/data'" --name=cm3leon-7b \
        --accelerator_type=v5p-256 --zone=us-east5-a --project=PROJECT \
        [--spot] [--detach] [--gin.KEY=VALUE ...] [--dry_run]

Steps (each a `gcloud` command, printed before it runs; `--dry_run` only prints):
1. `queued-resources describe NAME`: if the queued resource exists it is reused,
   otherwise `queued-resources create NAME --node-id=NAME ...`; then wait until it
   is ACTIVE (a FAILED or SUSPENDED one is an error: delete it, or pick another name).
2. Pack this checkout (tracked and untracked files that git does not ignore) into a
   tarball, `tpu-vm scp` it to every worker (`--worker=all`), unpack it into
   `~/cm3leon_jax` and install it (`-e '.[tpu]'`) into a Python 3.11 venv,
   `~/cm3leon_jax/.venv`, so all hosts run exactly the code you launched from. The TPU
   images (Ubuntu 22.04) have Python 3.10, below setup.py's >= 3.11: the image's
   Python (`--python`) installs uv with pip (`--user`), and uv makes the venv with a
   Python 3.11 it downloads if the image has none, and installs into it (an existing
   .venv is kept and updated, or made again when it is not Python 3.11).
3. `tpu-vm ssh --worker=all --command='cd ~/cm3leon_jax && .venv/bin/python -m
   cm3leon_jax.main --gin_file=... --gin.MODEL_DIR=... --gin.initialize.auto=True ...'`:
   one process per host; `jax.distributed.initialize()` finds the slice's hosts.
   With `--detach` each host runs it under nohup, logging to ~/cm3leon_jax/run.log,
   and the ssh returns at once.

A queued resource that exists already is reused only when it is what this launch asks
for: the slice type, the image (--runtime_version) and the capacity (--spot, --reserved,
or neither: on demand).

MODEL_DIR must be a `gs://` folder: every host writes checkpoints and reads the config
there. One slice only; for several slices (multislice over DCN) use `launch/xpk.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tarfile
import tempfile
from typing import Sequence

from launch import common

# The software image each TPU generation boots (Cloud TPU documentation).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/cm3leon_jax"
ARCHIVE = "cm3leon_jax_src.tar.gz"
# The venv's Python (setup.py: >= 3.11), and the uv that makes it (as tools/install.py).
PYTHON_VERSION = "3.11"
UV = "uv==0.13.9"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm",
                                     description=__doc__.split("\n\n")[0])
    common.add_run_args(parser)
    parser.add_argument("--name", required=True,
                        help="queued resource and TPU node name (created if absent)")
    parser.add_argument("--accelerator_type", required=True, help="e.g. v5p-256, v5litepod-64")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--runtime_version", default=None,
                        help="TPU VM image; default by generation: " + ", ".join(
                            f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()))
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    capacity.add_argument("--reserved", action="store_true", help="use the project's reservation")
    parser.add_argument("--python", default="python3",
                        help="the TPU VM image's Python (any 3.x with pip): it installs uv, "
                        f"which makes the run's Python {PYTHON_VERSION} venv")
    parser.add_argument("--detach", action="store_true",
                        help="run under nohup (log: ~/cm3leon_jax/run.log) and return")
    parser.add_argument("--skip_install", action="store_true",
                        help="the workers already have this code installed")
    return parser


# Generations Cloud TPU offers through GKE only (its TPU7x page: "To use TPU7x, you must
# use Google Kubernetes Engine"), so no TPU VM, queued or not, can be made of them.
GKE_ONLY = ("tpu7x",)


def check_tpu_vm_type(accelerator_type: str) -> None:
    """Refuses a slice type Cloud TPU does not offer as TPU VMs (`GKE_ONLY`)."""
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation in GKE_ONLY:
        raise common.LaunchError(
            f"--accelerator_type={accelerator_type!r}: Cloud TPU offers {generation} slices "
            "through GKE only, not as TPU VMs: launch on a GKE cluster with launch.xpk "
            f"(--device_type={accelerator_type}).")


def runtime_version(accelerator_type: str) -> str:
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise common.LaunchError(
            f"--accelerator_type={accelerator_type!r}: no default image for {generation!r}; "
            f"give --runtime_version (known generations: {', '.join(RUNTIME_VERSIONS)})")
    return RUNTIME_VERSIONS[generation]


def gcloud_tpu(args, *command: str) -> list[str]:
    """`gcloud compute tpus COMMAND... --zone --project`."""
    return ["gcloud", "compute", "tpus", *command, f"--zone={args.zone}",
            f"--project={args.project}"]


def ensure_queued_resource(args, runner: common.Runner) -> None:
    """Reuses the queued resource `args.name` if it exists, creates it otherwise; waits for it."""
    describe = gcloud_tpu(args, "queued-resources", "describe", args.name,
                          "--format=value(state.state)")
    state = runner.query(describe)
    if state is None:
        runner.note(f"queued resource {args.name!r} not found{' (dry run)' * runner.dry_run}: "
                    "create it")
        create = gcloud_tpu(args, "queued-resources", "create", args.name,
                            f"--node-id={args.name}",
                            f"--accelerator-type={args.accelerator_type}",
                            f"--runtime-version={args.runtime_version}")
        create += ["--spot"] * args.spot + ["--reserved"] * args.reserved
        runner.run(create)
    elif state in ("FAILED", "SUSPENDED"):
        raise common.LaunchError(f"queued resource {args.name!r} is {state}; delete it "
                                 f"(gcloud compute tpus queued-resources delete {args.name} "
                                 "--force) or choose another --name")
    else:
        _check_reused_slice(args, runner)
        runner.note(f"reusing queued resource {args.name!r} (state {state})")

    def active(out: str | None) -> bool:
        if out in ("FAILED", "SUSPENDED"):
            raise common.LaunchError(f"queued resource {args.name!r} became {out}")
        return out == "ACTIVE"
    runner.wait_until(describe, active, f"queued resource {args.name} is ACTIVE")


def _capacity(spot: bool, reserved: bool) -> str:
    """The capacity a queued resource asks for, named by the flags that ask for it."""
    if spot:
        return "spot capacity (--spot)"
    if reserved:
        return "reserved capacity (--reserved)"
    return "on-demand capacity (neither --spot nor --reserved)"


def _check_reused_slice(args, runner: common.Runner) -> None:
    """Refuses to reuse a queued resource that is not what this launch asks for: another
    slice type (the run's mesh is sized for --accelerator_type), image or capacity. gcloud
    records --spot as the `spot` tier and --reserved as a `reservationName` (v2 API; the
    alpha API's `guaranteed.reserved` too). A field it does not report (a slice made with a
    type and topology has no accelerator type) is not compared."""
    out = runner.query(gcloud_tpu(args, "queued-resources", "describe", args.name,
                                  "--format=json"))
    try:
        found = json.loads(out or "{}")
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        raise common.LaunchError(f"gcloud printed no JSON object for queued resource "
                                 f"{args.name!r} (describe --format=json): {out[:200]!r}")
    node = ((found.get("tpu") or {}).get("nodeSpec") or [{}])[0].get("node") or {}
    wrong = []
    if node.get("acceleratorType") not in (None, "", args.accelerator_type):
        wrong.append(f"holds a {node['acceleratorType']} slice, not --accelerator_type="
                     f"{args.accelerator_type}")
    if node.get("runtimeVersion") not in (None, "", args.runtime_version):
        wrong.append(f"runs the image {node['runtimeVersion']}, not --runtime_version="
                     f"{args.runtime_version}")
    had = _capacity("spot" in found, bool(found.get("reservationName") or (
        found.get("guaranteed") or {}).get("reserved")))
    if found and had != _capacity(args.spot, args.reserved):
        wrong.append(f"has {had}, not {_capacity(args.spot, args.reserved)}")
    if wrong:
        raise common.LaunchError(
            f"queued resource {args.name!r} {'; it '.join(wrong)}; choose another --name, or "
            f"delete it (gcloud compute tpus queued-resources delete {args.name} --force)")


def source_files() -> list[str]:
    """This checkout's files that git tracks or would track (not ignored), repo-relative."""
    out = subprocess.run(["git", "-C", common.REPO, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, text=True, check=True)
    return sorted({f for f in out.stdout.split("\0")
                   if f and os.path.isfile(os.path.join(common.REPO, f))})


def pack_source(path: str) -> int:
    """Writes this checkout's source to the tarball `path`; returns the number of files."""
    files = source_files()
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(common.REPO, f), arcname=f)
    return len(files)


def install_command(python: str) -> str:
    """Remote shell line: unpack the tarball into a fresh ~/cm3leon_jax (the earlier one's
    `.venv` and `run.log` carried over, nothing else: a file deleted here is gone there
    too) and install it into its Python 3.11 venv, which uv makes (`python -m uv`: uv
    installed by `python`'s pip).

    An existing .venv is kept only when it is Python 3.11 (one made by an earlier launch
    with the image's Python is made again: pip would refuse the package in it for good)."""
    line = common.shell_line
    uv = [python, "-m", "uv"]
    version = 'import sys; print("%d.%d" % sys.version_info[:2])'
    kept = f'test "$({line([".venv/bin/python", "-c", version])})" = {PYTHON_VERSION}'
    no_uv = line(["echo", f"error: {python} -m pip could not install {UV} on this TPU VM; "
                  f"give --python=<a Python 3 with pip> (uv makes the Python {PYTHON_VERSION} "
                  "venv)"])
    get_uv = (f"{{ {line([*uv, '--version'])} >/dev/null 2>&1 || "
              f"{line([python, '-m', 'pip', 'install', '-q', '--user', UV])} || "
              f"{{ {no_uv} >&2; exit 1; }}; }}")
    make_venv = line([*uv, "venv", "-q", "--python", PYTHON_VERSION, ".venv"])
    install = line([*uv, "pip", "install", "-q", "--python", ".venv/bin/python", "-e", ".[tpu]"])
    fresh = f"{REMOTE_DIR}.new"
    unpack = (f"rm -rf {fresh} && mkdir -p {fresh} {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C "
              f"{fresh} && for kept in .venv run.log; do if [ -e {REMOTE_DIR}/$kept ]; then "
              f"mv {REMOTE_DIR}/$kept {fresh}/; fi; done && rm -rf {REMOTE_DIR} && "
              f"mv {fresh} {REMOTE_DIR}")
    return (f"set -e; {unpack} && "
            f"cd {REMOTE_DIR} && {get_uv} && {{ {{ test -x .venv/bin/python && {kept}; }} || "
            f"{{ rm -rf .venv && {make_venv}; }}; }} && {install}")


def run_command(args) -> str:
    """Remote shell line that every worker runs: the host command line, from ~/cm3leon_jax."""
    argv = common.main_argv(".venv/bin/python", [args.gin_file, *args.extra_gin_files],
                            args.model_dir, args.overrides, {"initialize.auto": "True"})
    line = common.shell_line(argv)
    if args.detach:
        line = f"nohup {line} > run.log 2>&1 < /dev/null &"
    return f"cd {REMOTE_DIR} && {line}"


def install(args, runner: common.Runner) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, ARCHIVE)
        if runner.dry_run:
            runner.note(f"pack {len(source_files())} files of {common.REPO} (git ls-files "
                        f"--cached --others --exclude-standard) into {archive}")
        else:
            runner.note(f"packed {pack_source(archive)} files into {archive}")
        runner.run(gcloud_tpu(args, "tpu-vm", "scp", archive, f"{args.name}:~/{ARCHIVE}",
                              "--worker=all"))
    runner.run(gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=all",
                          f"--command={install_command(args.python)}"))


def launch(argv: Sequence[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    common.check_gin_files([args.gin_file, *args.extra_gin_files], shipped=True)
    if not args.model_dir.startswith("gs://"):
        raise common.LaunchError(f"MODEL_DIR {args.model_dir!r} is not a gs:// folder; every "
                                 "host of the slice must write to the same place")
    gin_files = [args.gin_file, *args.extra_gin_files]
    chips = common.check_tpu_type("--accelerator_type", args.accelerator_type)
    check_tpu_vm_type(args.accelerator_type)
    args.runtime_version = args.runtime_version or runtime_version(args.accelerator_type)
    common.check_mesh_fits(gin_files, args.overrides, chips,
                           f"--accelerator_type={args.accelerator_type}",
                           slices=(1, "slice (launch.tpu_vm starts one; several: launch.xpk)"))
    common.check_data_dirs(gin_files, args.overrides, "the slice", remote=True)
    runner = common.Runner(args.dry_run)
    ensure_queued_resource(args, runner)
    if not args.skip_install:
        install(args, runner)
    runner.run(gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=all",
                          f"--command={run_command(args)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
