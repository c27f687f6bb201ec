r"""The gin entry point: one command line for every kind of run.

    python -m cm3leon_jax.main \
        --gin_file=gin_configs/runs/demo.gin \
        --gin.MODEL_DIR="'runs/demo'" \
        [--gin_file=more.gin ...] [--gin.KEY=VALUE ...]

As in t5x: gin files may `include` each other (paths resolve against the
current directory, the repository root and `gin_configs/`), values a run cannot
do without are `%gin.REQUIRED`, and `--gin.KEY=VALUE` flags are bindings applied
after the files. A gin file picks its run mode by binding `run.mode` to a
configurable function (`run.mode = @demo`), which is called as
`mode(model_dir=MODEL_DIR)`; the module defining it is imported by the gin file
itself (`import cm3leon_jax.demo`), so this entry point stays small.

The resolved configuration is written to `MODEL_DIR/config.gin` before the run
starts. Configuration mistakes (a missing file, an unknown configurable or
parameter, a missing required value) end the program with one line naming the
binding or path, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

import gin
from absl import logging as absl_logging

from cm3leon_jax import fs

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_PATHS = (_REPO_ROOT, os.path.join(_REPO_ROOT, "gin_configs"))


class ConfigError(Exception):
    """A mistake in the gin files or flags, reported in one line."""


@gin.configurable
def run(mode: Callable[..., object] = gin.REQUIRED,
        model_dir: str = gin.REQUIRED):
    """Writes the resolved config to `model_dir`, then calls the chosen mode."""
    fs.makedirs(model_dir)
    with fs.open(fs.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    return mode(model_dir=model_dir)


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """argv -> (gin files, bindings). `--gin.K=V` becomes the binding `K=V`."""
    parser = argparse.ArgumentParser(
        prog="python -m cm3leon_jax.main",
        description="Run a gin-configured cm3leon-jax job.")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="a gin file; may be given several times")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a binding KEY=VALUE; same as --gin.KEY=VALUE")
    parser.add_argument("--gin_search_path", action="append", default=[],
                        help="an extra folder to resolve gin files and includes")
    args, rest = parser.parse_known_args(argv)
    bindings = list(args.gin_bindings)
    for arg in rest:
        if not arg.startswith("--gin.") or "=" not in arg:
            parser.error(f"unrecognised argument {arg!r}; bindings are written "
                         "--gin.KEY=VALUE")
        bindings.append(arg[len("--gin."):])
    for path in args.gin_search_path:
        gin.add_config_file_search_path(path)
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. gin_configs/runs/demo.gin)")
    return args.gin_file, bindings


def configure(gin_files: Sequence[str], bindings: Sequence[str],
              finalize: bool = True) -> None:
    """Parses files then bindings; raises ConfigError on any mistake.

    `finalize=False` skips the check that every `%gin.REQUIRED` is bound (and
    leaves the config open), for tools that only inspect a config.
    """
    for path in SEARCH_PATHS:
        if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
            gin.add_config_file_search_path(path)
    for f in gin_files:
        if not any(os.path.exists(os.path.join(p, f)) for p in ("", *SEARCH_PATHS)):
            raise ConfigError(f"gin file not found: {f!r} (looked in the current "
                              f"directory, {_REPO_ROOT} and gin_configs/)")
    # gin logs every include path it tries and misses; our error says it once.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(gin_files, bindings,
                                            finalize_config=finalize)
    except (ValueError, IOError, SyntaxError, ImportError) as e:
        raise ConfigError(_first_line(e)) from None
    finally:
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    gin_files, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    # Progress lines of long runs (trainers, pipelines) are INFO logs.
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        configure(gin_files, bindings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run()
    except (RuntimeError, ValueError) as e:
        # gin reports a missing %gin.REQUIRED value only when the function
        # that needs it is called; everything else is a real failure.
        if "Required bindings" not in str(e):
            raise
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    return 0


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
