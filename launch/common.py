"""What every launcher shares: its arguments, the host command line, and running or printing.

The host command line is the argv of `python -m cm3leon_jax.main`; engines that
hand a command to a remote shell (`gcloud ... ssh --command`, `xpk --command`,
`srun bash -c`) get it through `shell_line`, which quotes every argument so that
overrides such as `--gin.train.task='cm3leon_user'` reach the program unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(Exception):
    """A mistake in a launcher's arguments, or an engine that refused; one line for the user."""


def add_run_args(parser: argparse.ArgumentParser, model_dir_help: str = "") -> None:
    """GIN_FILE MODEL_DIR [--gin_file=...] [--dry_run]: the arguments every launcher takes."""
    parser.add_argument("gin_file", help="the run's gin file, e.g. "
                        "gin_configs/pods/cm3leon_7b_v5p256.gin (relative to the repository)")
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
