r"""Start a run on a Cloud TPU VM slice, through a queued resource (created, or reused).

    python -m launch.tpu_vm gin_configs/pods/cm3leon_7b_v5p256.gin gs://BUCKET/cm3leon_7b \
        --name=cm3leon-7b --accelerator_type=v5p-256 --zone=us-east5-a --project=PROJECT \
        [--spot] [--detach] [--gin.KEY=VALUE ...] [--dry_run]

Steps (each a `gcloud` command, printed before it runs; `--dry_run` only prints):
1. `queued-resources describe NAME`: if the queued resource exists it is reused,
   otherwise `queued-resources create NAME --node-id=NAME ...`; then wait until it
   is ACTIVE (a FAILED or SUSPENDED one is an error: delete it, or pick another name).
2. Pack this checkout (tracked and untracked files that git does not ignore) into a
   tarball, `tpu-vm scp` it to every worker (`--worker=all`), unpack it into
   `~/cm3leon_jax` and `pip install -e '.[tpu]'` into `~/cm3leon_jax/.venv`, so all hosts
   run exactly the code you launched from (an existing .venv is kept and updated, or made
   again when its Python is not the --python version).
3. `tpu-vm ssh --worker=all --command='cd ~/cm3leon_jax && .venv/bin/python -m
   cm3leon_jax.main --gin_file=... --gin.MODEL_DIR=... --gin.initialize.auto=True ...'`:
   one process per host; `jax.distributed.initialize()` finds the slice's hosts.
   With `--detach` each host runs it under nohup, logging to ~/cm3leon_jax/run.log,
   and the ssh returns at once.

MODEL_DIR must be a `gs://` folder: every host writes checkpoints and reads the config
there. The TPU VM image needs Python >= 3.11 (`--python` names it). One slice only; for
several slices (multislice over DCN) use `launch/xpk.py`.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--python", default="python3", help="Python >= 3.11 on the TPU VMs")
    parser.add_argument("--detach", action="store_true",
                        help="run under nohup (log: ~/cm3leon_jax/run.log) and return")
    parser.add_argument("--skip_install", action="store_true",
                        help="the workers already have this code installed")
    return parser


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


def _check_reused_slice(args, runner: common.Runner) -> None:
    """Refuses to reuse a queued resource of another slice type (the run's mesh is sized
    for --accelerator_type). One created with a type and topology instead of an
    accelerator type reports none: nothing to compare then."""
    found = runner.query(gcloud_tpu(args, "queued-resources", "describe", args.name,
                                    "--format=value(tpu.nodeSpec[0].node.acceleratorType)"))
    if found and found != args.accelerator_type:
        raise common.LaunchError(
            f"queued resource {args.name!r} holds a {found} slice, not --accelerator_type="
            f"{args.accelerator_type}; choose another --name, or delete it (gcloud compute "
            f"tpus queued-resources delete {args.name} --force)")


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
    """Remote shell line: unpack the tarball over ~/cm3leon_jax and install it in its venv.

    An existing .venv is kept only when its Python is the version `python` is (a venv made
    by an earlier launch with another --python is made again: pip would refuse the package
    in it for good)."""
    version = "import sys; print(sys.version_info[:2])"
    kept = common.shell_line([".venv/bin/python", "-c", version])
    wanted = common.shell_line([python, "-c", version])
    same = f'test "$({kept})" = "$({wanted})"'
    return (f"set -e; mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && {{ {{ test -x .venv/bin/python && {same}; }} || "
            f"{{ rm -rf .venv && {common.shell_line([python, '-m', 'venv', '.venv'])}; }}; }} && "
            f"{common.shell_line(['.venv/bin/pip', 'install', '-q', '-e', '.[tpu]'])}")


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
    args.runtime_version = args.runtime_version or runtime_version(args.accelerator_type)
    common.check_mesh_fits([args.gin_file, *args.extra_gin_files], args.overrides,
                           common.tpu_devices(args.accelerator_type),
                           f"--accelerator_type={args.accelerator_type}")
    runner = common.Runner(args.dry_run)
    ensure_queued_resource(args, runner)
    if not args.skip_install:
        install(args, runner)
    runner.run(gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=all",
                          f"--command={run_command(args)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run_main(launch))
