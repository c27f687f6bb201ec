"""How every benchmark times a trial, reports the spread of its trials, and saves its result.

Timings on a shared machine are noisy, so a benchmark interleaves its peers trial by trial
and reports each figure's median with its range (`spread`), never one number alone. Every
script runs its `main` through `cli`: a mistake in its inputs is one `error:` line.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import statistics
import tempfile
import time
from typing import Callable, Sequence


def cli(main: Callable[[], object]) -> None:
    """Runs a benchmark's `main` as a command: a mistake in what it was given (a
    UserInputError: a folder that is not a run, a missing file) is one `error:` line and
    exit status 2, as the run modes do; a whole-number result is the exit status."""
    import sys

    from cm3leon_jax.errors import UserInputError
    try:
        result = main()
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(result, int) and not isinstance(result, bool):
        raise SystemExit(result)


def tpu_topology(name: str):
    """The TPU topology `name` to compile for on this host, or one line saying what to
    install (AOT compilation for TPU needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    from cm3leon_jax.errors import UserInputError
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except RuntimeError as e:
        if "TPU support not installed" not in str(e):
            raise
        raise UserInputError("compiling for a TPU topology needs libtpu on this host (no TPU "
                             "needed): pip install 'jax[tpu]==0.10.2' into the venv.") from None


def require(*modules: str) -> None:
    """Stops with one line when a peer this benchmark compares against is not installed
    (they are setup.py's `bench` extra, which `make test` leaves out)."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: this benchmark needs {missing}: install them with "
                         "`.venv/bin/python tools/install.py -e '.[bench]'`.")


def timed(fn: Callable[[], object], pause_s: float = 0.5) -> float:
    """Seconds `fn()` takes, after `pause_s` of sleep: the other framework's worker threads
    (torch's, XLA's pool) go idle first, so one peer's spinning never bills the other."""
    time.sleep(pause_s)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: Sequence[float]) -> dict[str, float]:
    """{"median", "min", "max"} of the trials' values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_json(path: str, result: dict) -> None:
    """The result as JSON at `path` (`--json=`); nothing when `path` is empty."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def xla_op_times(fn: Callable[[], object], calls: int
                 ) -> tuple[collections.Counter, collections.Counter]:
    """(microseconds, events) per XLA op name over `calls` calls of `fn`, from a
    `jax.profiler` trace (the complete events of the trace's perfetto export)."""
    import jax  # Not every benchmark that reports spreads imports jax.

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/*perfetto_trace.json.gz",
                                              recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            times[e["name"]] += e["dur"]
            counts[e["name"]] += 1
    return times, counts


def at_least_one(text: str) -> int:
    """argparse type of a count of trials or rounds: a whole number >= 1 (0 has no median)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1 (a median needs a trial)")
    return value
