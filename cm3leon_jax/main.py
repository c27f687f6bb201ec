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
starts (a different earlier one is kept as `config.<n>.gin`: it records how the
checkpoints already there were trained). Configuration mistakes (a missing file, an
unknown configurable or parameter, a missing required value) and mistakes in the
user's input found while running (`errors.UserInputError`: a missing data folder or
MODEL_DIR, an unreadable file, a checkpoint that does not fit) end the program with
one line naming the binding or path and the fix, and exit status 2. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from cm3leon_jax import hostmem

if __name__ == "__main__":
    # Before jax starts its threads: with $CM3LEON_JAX_HOST_MEMORY=retain, XLA:CPU's
    # per-step temporaries reuse freed heap instead of faulting in fresh pages every step.
    try:
        hostmem.retain_freed_memory()
    except ValueError as e:  # A bad $CM3LEON_JAX_HOST_MEMORY: one line, as for gin errors.
        import sys
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from cm3leon_jax import fs  # noqa: E402
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError  # noqa: E402
from cm3leon_jax.train import distributed, run_config  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_PATHS = (_REPO_ROOT, os.path.join(_REPO_ROOT, "gin_configs"))


class ConfigError(Exception):
    """A mistake in the gin files or flags, reported in one line."""


@gin.configurable
def run(mode: Callable[..., object] = gin.REQUIRED,
        model_dir: str = gin.REQUIRED):
    """Writes the resolved config to `model_dir`, then calls the chosen mode.

    A mode may refuse a run before anything is written, with an attribute
    `preflight(model_dir)` that raises UserInputError: its MODEL_DIR (the `sft` mode
    refuses its base run's folder, whose config.gin this would replace) and whatever
    settings it can check without doing any work (export's dtype, eval's strategies, the
    demo's folder); a folder whose config.gin
    another mode wrote is refused for every mode. A run whose checkpoints (or, for
    the demo, stages) were built by another config (ModelDirMismatchError) leaves config.gin
    as it found it; so does any other refusal (UserInputError) of a run that wrote nothing
    there (a folder it made for the config is removed again). With several
    processes, process 0 alone writes it (the job is joined first).
    """
    # First: the checks below may read checkpoints (an export's reads its image tokenizer's
    # config through orbax), which starts JAX's backend, after which a pod cannot join.
    distributed.initialize()
    check = getattr(mode, "preflight", None)
    if check is not None:
        check(model_dir)
    run_config.check_same_mode(model_dir, _mode_name(mode))
    # One writer: the processes of a pod would otherwise rename one another's config.gin.
    undo, failure, created = None, None, not fs.exists(model_dir)
    if not jax.distributed.is_initialized() or jax.process_index() == 0:
        try:
            undo = run_config.write_undoable(model_dir)[1]
        except UserInputError as e:  # Raised below, on every process.
            failure = e
    if not distributed.all_agree(failure is None):
        raise failure or UserInputError(f"process 0 could not write {model_dir}/config.gin: "
                                        "its log says why.")
    saved, entries = _saved_steps(model_dir), _entries(model_dir)
    try:
        return mode(model_dir=model_dir)
    except ModelDirMismatchError:
        # What is there was left untouched and belongs to the earlier config.gin.
        if undo is not None:
            undo()
        raise
    except UserInputError:
        # Any other refusal of a run that wrote nothing (no new entry in MODEL_DIR, no new
        # checkpoint): what is there belongs to the earlier config.gin (a size its
        # checkpoints do not have, a dtype its export was not written in, must not stay
        # recorded beside them), and a folder this run made is removed again.
        if undo is not None and _saved_steps(model_dir) == saved and (
                _entries(model_dir) == entries):
            undo()
            if created and not fs.listdir(model_dir):
                fs.rmtree(model_dir)
        raise


def _entries(model_dir: str) -> list[str]:
    """What MODEL_DIR holds besides its config files (config.gin, config.<n>.gin)."""
    names = fs.listdir(model_dir) if fs.isdir(model_dir) else []
    return sorted(n.rstrip("/") for n in names
                  if not re.fullmatch(r"config(\.\d+)?\.gin", n.rstrip("/")))


def _saved_steps(model_dir: str) -> list[str]:
    """The step folders under MODEL_DIR/checkpoints (none for modes that save none)."""
    folder = fs.join(model_dir, "checkpoints")
    return sorted(n.rstrip("/") for n in fs.listdir(folder)) if fs.isdir(folder) else []


def _mode_name(mode: Callable[..., object]) -> str:
    """The gin name `run.mode` refers to (`@train` -> "train")."""
    try:
        return gin.query_parameter("run.mode").selector.split(".")[-1]
    except (ValueError, AttributeError):  # run() called directly, outside gin.
        return getattr(mode, "__name__", str(mode))


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """argv -> (gin files, bindings, search folders). `--gin.K=V` becomes the binding `K=V`."""
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
            parser.error(f"unrecognized argument {arg!r}; bindings are written "
                         "--gin.KEY=VALUE")
        bindings.append(arg[len("--gin."):])
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. gin_configs/runs/demo.gin)")
    # `--gin_search_path` folders resolve both `--gin_file`s and includes (t5x's order:
    # the ones given first, then the repository's).
    search = [os.path.abspath(p) for p in args.gin_search_path]
    return [_find(f, search) for f in args.gin_file], bindings, search


def _find(gin_file: str, search: Sequence[str]) -> str:
    """`gin_file` as given if it exists, else the first `--gin_search_path` folder holding it."""
    if os.path.isabs(gin_file) or os.path.exists(gin_file):
        return gin_file
    found = [os.path.join(p, gin_file) for p in search if os.path.exists(os.path.join(p, gin_file))]
    return found[0] if found else gin_file


def configure(gin_files: Sequence[str], bindings: Sequence[str],
              finalize: bool = True, search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings; raises ConfigError on any mistake.

    `search_paths` are extra folders for files and includes, searched before the
    repository's. `finalize=False` skips the check that every `%gin.REQUIRED` is bound
    (and leaves the config open), for tools that only inspect a config.
    """
    paths = (*search_paths, *SEARCH_PATHS)
    # Our folders go before gin's '' (the current directory): for '' gin also asks its
    # Python-path reader, which crashes on a relative path whose folder is a namespace
    # package (`gin_configs/...` whenever the repository root is on sys.path, as with an
    # editable install) when run from any other folder. A path that exists as given
    # still wins: `_find` and the check below make --gin_file paths absolute first.
    prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
    prefixes[:] = [*paths, *(p for p in prefixes if p not in paths)]
    for f in gin_files:
        if not any(os.path.exists(os.path.join(p, f)) for p in ("", *paths)):
            looked = ", ".join(["the current directory", *paths])
            raise ConfigError(f"gin file not found: {f!r} (looked in {looked}); give its path "
                              "or the folder holding it with --gin_search_path")
    gin_files = [os.path.abspath(f) if os.path.exists(f) else f for f in gin_files]
    # gin logs every include path it tries and misses; our error says it once.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(gin_files, bindings,
                                            finalize_config=finalize)
    except (ValueError, IOError, SyntaxError, ImportError) as e:
        raise ConfigError(_unquoted(bindings) or _first_line(e)) from None
    finally:
        root.setLevel(level)
    unread = _unread_macro(bindings)
    if unread:
        raise ConfigError(unread)


_MACRO = re.compile(r"[A-Za-z_]\w*")


def _unread_macro(bindings: Sequence[str]) -> str | None:
    """The error for the first binding that sets a macro (`--gin.IMAGE_SIZ=16`) no binding
    of the parsed files reads as `%NAME`: gin takes it without a word, and the run goes on
    with the value the files give (a typo of a macro's name); None if every one is read."""
    macros = [b.partition("=")[0].strip() for b in bindings]
    macros = [m for m in macros if _MACRO.fullmatch(m)]
    if not macros:
        return None
    read = set(re.findall(r"%([A-Za-z_][\w.]*)", gin.config_str()))
    for name in macros:
        if name not in read:
            known = ", ".join(sorted(read - {"gin.REQUIRED"})) or "none"
            return (f"--gin.{name}=... sets a macro that no binding of these gin files reads "
                    f"(%{name}): a typo? The macros they read: {known}.")
    return None


# A value gin cannot read that a user meant as a string: a bare word or path.
_BARE = re.compile(r"[A-Za-z_./~][\w./:~+-]*")


def _unquoted(bindings: Sequence[str]) -> str | None:
    """The error for the first binding whose value is a bare word or path (`float32`,
    `runs/x`): gin reads values as Python literals (its own `@` references and `%` macros
    aside), so a string needs quotes; None if no binding looks so."""
    for binding in bindings:
        key, _, value = binding.partition("=")
        value = value.strip()
        if _BARE.fullmatch(value) and value not in ("True", "False", "None"):
            return (f"--gin.{key.strip()}={value}: gin reads values as Python literals and "
                    f"{value} is not one; a string needs quotes: "
                    f"--gin.{key.strip()}=\"'{value}'\"")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    gin_files, bindings, search = parse_args(sys.argv[1:] if argv is None else argv)
    # Progress lines of long runs (trainers, pipelines) are INFO logs.
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        configure(gin_files, bindings, search_paths=search)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run()
    except UserInputError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:
        # gin reports a missing %gin.REQUIRED value only when the function
        # that needs it is called; everything else is a real failure.
        if "Required bindings" not in str(e):
            raise
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and result.get("preempted"):
        # Saved on SIGTERM, not finished: a scheduler that restarts on a status (xpk: 42)
        # gets it from its launcher through this variable; 0 otherwise.
        return int(os.environ.get(PREEMPTED_EXIT_CODE_ENV, "0"))
    return 0


# The exit status of a run stopped by SIGTERM after saving (default 0).
PREEMPTED_EXIT_CODE_ENV = "CM3LEON_PREEMPTED_EXIT_CODE"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
