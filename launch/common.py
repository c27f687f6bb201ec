"""What every launcher shares: its arguments, the host command line, and running or printing.

The host command line is the argv of `python -m cm3leon_jax.main`; engines that
hand a command to a remote shell (`gcloud ... ssh --command`, `xpk --command`,
`srun bash -c`) get it through `shell_line`, which quotes every argument so that
overrides such as `--gin.train.task='cm3leon_user'` reach the program unchanged.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from cm3leon_jax import fs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The per-slice mesh sizes (`partitioning.make_mesh`) and the slice counts over DCN
# (`distributed.train_mesh`) a run's gin files bind.
MESH_KEYS = ("make_mesh.data", "make_mesh.fsdp", "make_mesh.tensor")
DCN_KEYS = ("train_mesh.dcn_data", "train_mesh.dcn_fsdp", "train_mesh.dcn_tensor")
# Cloud TPU names a slice "<generation>-<N>": N counts TensorCores on v2-v4, v5p and tpu7x
# (two per chip on v4 and v5p, one JAX device per chip; two per chip on tpu7x, Ironwood, each
# its own JAX device: libtpu's tpu7x:2x2x1 topology has 8 devices), chips on v5litepod (v5e)
# and v6e.
TPU_CORES_PER_DEVICE = {"v2": 1, "v3": 1, "v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1,
                        "tpu7x": 1}


class LaunchError(Exception):
    """A mistake in a launcher's arguments, or an engine that refused; one line for the user."""


def add_run_args(parser: argparse.ArgumentParser, model_dir_help: str = "",
                 example_gin_file: str = "gin_configs/pods/cm3leon_7b_v5p256.gin") -> None:
    """GIN_FILE MODEL_DIR [--gin_file=...] [--dry_run]: the arguments every launcher takes."""
    parser.add_argument("gin_file", help=f"the run's gin file, e.g. {example_gin_file} "
                        "(relative to the repository)")
    parser.add_argument("model_dir", help=model_dir_help or "the run's MODEL_DIR (gs:// for "
                        "remote hosts: every host must see the same folder)")
    parser.add_argument("--gin_file", dest="extra_gin_files", action="append", default=[],
                        help="another gin file, parsed after GIN_FILE; may be repeated")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parses argv; every argument the parser does not know must be a `--gin.KEY=VALUE`.

    Returns the namespace with `.overrides`: the `--gin.KEY=VALUE` arguments, as given.
    """
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for arg in rest:
        if not re.match(r"--gin\.[A-Za-z_][\w./]*=", arg):
            parser.error(f"unrecognized argument {arg!r}; gin overrides are written "
                         "--gin.KEY=VALUE, e.g. --gin.train.num_steps=100")
    args.overrides = list(rest)
    one_slash = re.match(r"([A-Za-z][\w+.-]*):/(?!/)", getattr(args, "model_dir", "") or "")
    if one_slash:  # Read as a local folder named "gs:" otherwise.
        raise LaunchError(f"MODEL_DIR {args.model_dir!r} has one slash after "
                          f"{one_slash.group(1)}:; write {one_slash.group(1)}://...")
    return args


def gin_string(value: str) -> str:
    """A Python/gin string literal for `value` (what `--gin.MODEL_DIR=` needs)."""
    return repr(value)


def main_argv(python: str, gin_files: Sequence[str], model_dir: str,
              overrides: Sequence[str], bindings: dict[str, str] | None = None) -> list[str]:
    """argv of `python -m cm3leon_jax.main` on a host.

    `bindings` are the launcher's own (e.g. `initialize.auto`); they come before the
    user's `overrides`, so a user's `--gin.KEY=` of the same key wins (gin keeps the last).
    """
    argv = [python, "-m", "cm3leon_jax.main"]
    argv += [f"--gin_file={f}" for f in gin_files]
    argv.append(f"--gin.MODEL_DIR={gin_string(model_dir)}")
    argv += [f"--gin.{k}={v}" for k, v in (bindings or {}).items()]
    return argv + list(overrides)


def overridden(overrides: Sequence[str], key: str) -> bool:
    """Whether the user already binds `key` with a `--gin.key=` override."""
    return any(o.startswith(f"--gin.{key}=") for o in overrides)


def check_gin_files(gin_files: Sequence[str], shipped: bool = False) -> None:
    """Every gin file must exist in the repository: it travels with the code to the hosts.

    `shipped`: the hosts get a copy of the repository without what git ignores (tpu_vm's
    tarball, xpk's image), so a gin file git ignores (one under runs/) is refused too."""
    for f in gin_files:
        if os.path.isabs(f) or not os.path.exists(os.path.join(REPO, f)):
            raise LaunchError(f"gin file {f!r} is not a file inside the repository ({REPO}); "
                              "remote hosts get the repository's files, so give a path "
                              "relative to its root, e.g. gin_configs/pods/<name>.gin")
        if shipped and subprocess.run(["git", "-C", REPO, "check-ignore", "-q", f],
                                      capture_output=True).returncode == 0:
            raise LaunchError(f"gin file {f!r} is one git ignores, so the copy of the "
                              "repository the hosts get leaves it out; put it under "
                              "gin_configs/ (or another folder git does not ignore)")


def tpu_devices(accelerator_type: str) -> int | None:
    """JAX devices (chips) of a TPU slice type such as v5p-256 (128); None if unknown."""
    match = re.fullmatch(r"(\w+)-(\d+)", accelerator_type)
    if not match or match.group(1) not in TPU_CORES_PER_DEVICE:
        return None
    return int(match.group(2)) // TPU_CORES_PER_DEVICE[match.group(1)]


def check_tpu_type(flag: str, accelerator_type: str) -> int:
    """The JAX devices of a TPU slice type; a name that is not `<generation>-<N>` of a
    generation this file knows (TPU_CORES_PER_DEVICE) is refused, before the mesh and batch
    checks would be skipped for it."""
    devices = tpu_devices(accelerator_type)
    if devices:
        return devices
    generation = accelerator_type.rsplit("-", 1)[0].lower()
    hint = ("; v5e slices are named v5litepod-N (e.g. v5litepod-64)"
            if generation in ("v5e", "v5lite") else "")
    raise LaunchError(
        f"{flag}={accelerator_type!r} is not a TPU slice type this launcher knows: write "
        f"<generation>-<N> with a generation of {', '.join(TPU_CORES_PER_DEVICE)}{hint} "
        "(another generation: add how many TensorCores make one JAX device to "
        "TPU_CORES_PER_DEVICE in launch/common.py)")


def _gin_include_path(name: str) -> str | None:
    """The repository file a gin `include` names (gin's search folders: the root, gin_configs/)."""
    for folder in (REPO, os.path.join(REPO, "gin_configs")):
        if fs.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _read_bindings(path: str, keys: Sequence[str], found: dict) -> None:
    """Updates `found` with `path`'s bindings of `keys` as written (one-line values), its
    includes read in place (gin's order: a later binding wins); an include this host cannot
    find makes every key unknown (None)."""
    for line in fs.read_text(path).splitlines():
        line = line.split("#", 1)[0].strip()
        include = re.fullmatch(r"include\s+(['\"])(.+)\1", line)
        if include:
            included = _gin_include_path(include.group(2))
            if included is None:  # gin reports it on the hosts; nothing to check here.
                found.update(dict.fromkeys(keys))
                continue
            _read_bindings(included, keys, found)
        binding = re.fullmatch(r"([\w./]+)\s*=\s*(.+)", line)
        if binding and binding.group(1) in keys:
            found[binding.group(1)] = binding.group(2).strip()


def bound_values(gin_files: Sequence[str], overrides: Sequence[str],
                 bindings: dict[str, str] | None, keys: Sequence[str]) -> dict[str, str | None]:
    """The values (as written) the run binds to `keys`: its gin files (repository paths) in
    order, then the launcher's `bindings`, then the user's `--gin.` overrides, as
    `cm3leon_jax.main` applies them. Absent: not bound; None: not known here."""
    found: dict[str, str | None] = {}
    for f in gin_files:
        _read_bindings(os.path.join(REPO, f), keys, found)
    lines = [f"{k} = {v}" for k, v in (bindings or {}).items()]
    lines += [o[len("--gin."):].replace("=", " = ", 1) for o in overrides]
    for line in lines:
        key, value = (part.strip() for part in line.split("=", 1))
        if key in keys:
            found[key] = value
    return found


def bound_ints(gin_files: Sequence[str], overrides: Sequence[str],
               bindings: dict[str, str] | None, defaults: dict[str, int | None]
               ) -> dict[str, int | None]:
    """`bound_values` of the keys of `defaults` as integers. Unbound keys keep their
    `defaults`; None: bound to something other than an integer literal (a macro, a scoped
    binding), so unknown."""
    found = bound_values(gin_files, overrides, bindings, tuple(defaults))
    return {k: (int(found[k]) if found[k] is not None and re.fullmatch(r"-?\d+", found[k])
                else None) if k in found else v for k, v in defaults.items()}


def _string(value: str | None) -> str | None:
    """A gin string literal's value; None for anything else (a macro, a reference)."""
    try:
        parsed = ast.literal_eval(value) if value is not None else None
    except (ValueError, SyntaxError):
        return None
    return parsed if isinstance(parsed, str) else None


DATA_KEYS = ("data_dirs.synthetic", "data_dirs.user", "sft_data_dirs.synthetic",
             "sft_data_dirs.user")


def data_keys(task: str) -> list[str]:
    """The data-folder bindings a task of tasks/ reads (tasks/pretrain.py, tasks/sft.py)."""
    if task.startswith("cm3leon_sft_user"):
        return ["sft_data_dirs.user"] + ["data_dirs.user"] * ("replay" in task)
    if task.startswith("cm3leon_sft"):
        return ["sft_data_dirs.synthetic"] + ["data_dirs.synthetic"] * ("replay" in task)
    if task.startswith("cm3leon_user"):
        return ["data_dirs.user"]
    return ["data_dirs.synthetic"] if task.startswith("cm3leon_synthetic") else []


def check_data_dirs(gin_files: Sequence[str], overrides: Sequence[str], where: str,
                    remote: bool) -> None:
    """Refuses, before anything is provisioned, a run whose task reads a data folder the run
    does not bind (or, `remote`: binds to a folder that is not gs://, which the hosts
    cannot see); a value not known here (a macro) is left to the hosts."""
    values = bound_values(gin_files, overrides, None, ["train.task", *DATA_KEYS])
    task = _string(values.get("train.task"))
    keys = data_keys(task or "")
    for key in keys:
        if (values.get(key) or "").startswith(("%", "@")):
            continue  # A macro or reference: resolved on the hosts.
        folder = _string(values.get(key))
        if not folder and key.endswith(".synthetic") and not remote:
            continue  # Its default, the demo's folder in the repository the nodes share.
        if not folder:
            raise LaunchError(f"train.task={task!r} reads {key}, which the run does not bind; "
                              f"give --gin.{key}=\"'gs://BUCKET/data'\" (the preprocess "
                              "run's output folder)")
        if remote and not folder.startswith("gs://"):
            raise LaunchError(f"{key}={folder!r} is not a gs:// folder, and the hosts of "
                              f"{where} cannot read this machine's files; copy the data to "
                              "gs:// and give that folder")


def bound_mesh(gin_files: Sequence[str], overrides: Sequence[str],
               bindings: dict[str, str] | None = None) -> dict[str, int | None]:
    """`bound_ints` of MESH_KEYS and DCN_KEYS, with the functions' defaults."""
    return bound_ints(gin_files, overrides, bindings,
                      {"make_mesh.data": -1, **dict.fromkeys((*MESH_KEYS[1:], *DCN_KEYS), 1)})


def _dcn_groups(sizes: dict[str, int | None], slices: tuple[int, str] | None) -> int | None:
    """The groups (slices, nodes) the DCN axes span, checked against the launch's
    `slices` (count, what they are); None: unknown."""
    dcn = [sizes[k] for k in DCN_KEYS]
    if any(v is None or v < 1 for v in dcn):
        return None
    groups = math.prod(dcn)
    if slices is not None and groups > 1 and groups != slices[0]:
        fix = (f"make the product {slices[0]} (or 1: no DCN axes)" if slices[0] > 1
               else "make it 1 (no DCN axes)")
        raise LaunchError(
            f"train_mesh.dcn_data x dcn_fsdp x dcn_tensor = {' x '.join(map(str, dcn))} = "
            f"{groups} groups over DCN, but the launch has {slices[0]} {slices[1]}, which the "
            f"DCN axes span: {fix}")
    return groups


def check_mesh_fits(gin_files: Sequence[str], overrides: Sequence[str], devices: int | None,
                    what: str, bindings: dict[str, str] | None = None,
                    slices: tuple[int, str] | None = None) -> None:
    """Refuses, before anything is provisioned, a run whose mesh cannot be built on
    `devices` devices (`what` names where that count comes from; None: unknown): the DCN
    product that is not the launch's `slices` (count, what they are; None: not known
    here), per-slice sizes (a -1 resolved as `make_mesh` does) that do not fill the
    devices, and a batch whose micro-batch rows do not split over the data axes."""
    sizes = bound_mesh(gin_files, overrides, bindings)
    groups = _dcn_groups(sizes, slices)
    ici = [sizes[k] for k in MESH_KEYS]
    if devices is None or groups is None or None in ici or ici.count(-1) > 1 \
            or any(v == 0 or v < -1 for v in ici):
        return  # Unknown here, or a mistake make_mesh reports on the hosts.
    known = math.prod(v for v in ici if v != -1)
    if -1 in ici and devices % (groups * known) == 0:
        ici[ici.index(-1)] = devices // (groups * known)
    mesh = " x ".join(f"{k.split('.')[1]} {v}" for k, v in zip(MESH_KEYS, ici))
    mesh += f" x {groups} slices (train_mesh.dcn_*)" * (groups > 1)
    if -1 in ici or math.prod(ici) * groups != devices:
        raise LaunchError(
            f"the mesh of {', '.join(gin_files)} ({mesh}) needs "
            f"{'a multiple of ' * (-1 in ici)}{known * groups} devices (chips or GPUs), but "
            f"{what} gives {devices}; pick the size the gin file is for, or override its mesh "
            "(e.g. --gin.make_mesh.fsdp=-1: all devices)")
    ways = ici[0] * ici[1] * sizes["train_mesh.dcn_data"] * sizes["train_mesh.dcn_fsdp"]
    _check_batch(gin_files, overrides, bindings, ways, f"{mesh} on {what}")


def _check_batch(gin_files: Sequence[str], overrides: Sequence[str],
                 bindings: dict[str, str] | None, ways: int, where: str) -> None:
    """`train.step.check_batch` before launching: the micro-batch rows must split over the
    `ways` devices of the mesh axes the `batch` rule names (data and fsdp, DCN included)."""
    batch = bound_ints(gin_files, overrides, bindings,
                       {"train.global_batch_size": None, "train.num_microbatches": 1})
    rows, parts = batch["train.global_batch_size"], batch["train.num_microbatches"]
    if rows is None or parts is None:
        return
    if parts < 1 or rows % parts:
        raise LaunchError(f"train.global_batch_size={rows} does not split into "
                          f"train.num_microbatches={parts}; pick a divisor")
    if (rows // parts) % ways:
        raise LaunchError(
            f"train.global_batch_size={rows} / num_microbatches={parts} = {rows // parts} rows "
            f"per micro-batch do not split over the {ways} devices of the data and fsdp axes "
            f"({where}); make the rows a multiple of {ways}, or change the mesh, the batch or "
            "the job's size")


def quote(arg: str) -> str:
    """POSIX sh quoting of one argument, readable where it can be.

    `--gin.X='abc'` becomes `"--gin.X='abc'"` rather than shlex's `'--gin.X='"'"'abc'"'"''`;
    both give the shell the same word.
    """
    if "'" in arg and not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def shell_line(argv: Sequence[str]) -> str:
    """One shell command line that runs `argv` exactly."""
    return " ".join(quote(a) for a in argv)


class Runner:
    """Runs commands, or with `dry_run` prints them (`# ...` lines are what it would check)."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def run(self, argv: Sequence[str], cwd: str | None = None) -> None:
        """Runs `argv` (printing it first); a non-zero exit is a LaunchError."""
        print(shell_line(argv), file=self.out, flush=True)
        if self.dry_run:
            return
        rc = subprocess.call(list(argv), cwd=cwd)
        if rc:
            raise LaunchError(f"command failed with exit status {rc}: {shell_line(argv)}")

    def query(self, argv: Sequence[str]) -> str | None:
        """Output of a read-only command, or None if it fails; in a dry run, None (unknown)."""
        print(shell_line(argv), file=self.out, flush=True)
        if self.dry_run:
            return None
        proc = subprocess.run(list(argv), capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def wait_until(self, argv: Sequence[str], done: Callable[[str | None], bool],
                   what: str, poll_s: float = 30.0, timeout_s: float = 24 * 3600) -> None:
        """Re-runs the read-only `argv` until `done(output)`; `what` names it in messages."""
        self.note(f"repeat every {poll_s:g} s until {what}:")
        if self.dry_run:
            print(shell_line(argv), file=self.out, flush=True)
            return
        start = time.time()
        while not done(self.query(argv)):
            if time.time() - start > timeout_s:
                raise LaunchError(f"timed out after {timeout_s:g} s waiting until {what}")
            time.sleep(poll_s)


def run_main(build: Callable[[Sequence[str] | None], int], argv=None) -> int:
    """Calls a launcher's `build(argv)`; a LaunchError becomes one line and exit status 2."""
    try:
        return build(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
