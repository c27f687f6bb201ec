"""How the demo runs its stages: numbered, timed, logged in one line each, and reused.

    [demo 5/8] pretrain ...
    [demo 5/8] pretrain: 900 steps, held-out loss 1.02 (312 s, 520 s CPU, load 3.1)

A finished stage stores its result in MODEL_DIR/stages/<name>.json together with a
fingerprint of the whole run configuration; a rerun with the same configuration reads
it back instead of running the stage again (an interrupted demo therefore restarts at
the first unfinished stage, and the stages that write checkpoints resume inside
themselves). A changed configuration reruns every stage, each reusing what it built.

Wall seconds on a shared machine say little, so each stage also records the CPU
seconds of this process (all threads) and of the processes it ran a stage in
(`demo/apart.py`, counted when they end), and the 1-minute load average at its end.

Stages that need nothing from each other can run at the same time (`run_together`: the
first in the calling thread, the others in threads of their own). Each still gets its
own log lines, cached result and wall seconds; their CPU seconds are the process's over
each one's span, so they overlap, and the totals (`total_seconds`, `total_cpu_seconds`)
are measured over the whole run instead of summed.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.train import checkpoints


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def jsonable(x: Any) -> Any:
    """Dicts, lists and numpy scalars -> plain JSON values (keys become strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


# What a demo writes at the top of its MODEL_DIR (config.gin, config.<n>.gin aside).
OWN_ENTRIES = ("stages", "metrics.json", "tfds", "image_tokenizer", "retriever", "data",
               "pretrain", "sft_data", "sft", "export", "eval", "pictures")


def foreign_entries(model_dir: str) -> list[str]:
    """What model_dir holds that a demo does not write, sorted ([]: a demo's folder)."""
    if not fs.isdir(model_dir):
        return []
    names = (n.rstrip("/") for n in fs.listdir(model_dir))
    return sorted(n for n in names
                  if n not in OWN_ENTRIES and not re.fullmatch(r"config(\.\d+)?\.gin", n))


def clear(model_dir: str) -> None:
    """Deletes what earlier demo runs built in model_dir: its own entries only (OWN_ENTRIES;
    config.gin is the current run's), never anything else a folder holds."""
    if not fs.isdir(model_dir):
        return
    for name in OWN_ENTRIES:
        path = os.path.join(model_dir, name)
        if fs.isdir(path):
            fs.rmtree(path)
        elif fs.exists(path):
            fs.remove(path)


def earlier_work(model_dir: str) -> list[str]:
    """What model_dir holds besides config.gin (the current run's): an earlier run's work,
    sorted; [] for a fresh folder."""
    if not fs.isdir(model_dir):
        return []
    return sorted(n.rstrip("/") for n in fs.listdir(model_dir)
                  if n.rstrip("/") != "config.gin")


# Lines of the config that say where and how to run, not what is built.
_NOT_BUILT_FROM = re.compile(r"^(MODEL_DIR|demo\.start_over) = ")


def config_lines(config_text: str) -> list[str]:
    """The lines of a gin config string that decide what the demo builds."""
    return [line for line in config_text.splitlines() if not _NOT_BUILT_FROM.match(line)]


def fingerprint(config_text: str) -> str:
    """A short hash of the run configuration (the gin config string), leaving out
    MODEL_DIR and demo.start_over: a moved folder, or a rerun without start_over, builds
    the same."""
    return hashlib.sha256("\n".join(config_lines(config_text)).encode("utf-8")
                          ).hexdigest()[:16]


def earlier_fingerprint(config_text: str) -> str:
    """The fingerprint stages stored before 6 Dec (the whole config string, MODEL_DIR
    included): a run of the same config in the same folder still reuses them."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:16]


class PreemptedError(Exception):
    """A stage's trainer stopped on SIGTERM and saved its state; rerunning resumes it."""


def was_preempted(result: Any) -> bool:
    """Whether a stage's result says its trainer was stopped by SIGTERM (`preempted`)."""
    return isinstance(result, dict) and bool(result.get("preempted"))


def _print_line(line: str) -> None:
    """One line to stdout in one write: stages that run at the same time print from their
    own threads, and `print` writes the line and its newline apart."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class StageRunner:
    """Runs the demo's stages in order, keeping their results, times and a log line each.

    Args:
      model_dir: MODEL_DIR; results are cached under MODEL_DIR/stages/.
      names: every stage the run will go through, in order (for the "k/n" counter).
      config_fingerprint: see `fingerprint`; cached results of another one are ignored.
      print_fn: where the log lines go.
      also_accepted: other fingerprints of the same configuration (`earlier_fingerprint`).
    """

    def __init__(self, model_dir: str, names: list[str], config_fingerprint: str,
                 print_fn: Callable[[str], None] | None = None,
                 also_accepted: tuple[str, ...] = ()):
        self.dir = os.path.join(model_dir, "stages")
        self.names, self.config = list(names), config_fingerprint
        self.accepted = {config_fingerprint, *also_accepted}
        self.print = print_fn or _print_line
        self.results: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.load: dict[str, float] = {}
        self.reused: list[str] = []
        self.together: list[list[str]] = []
        self.started, self.cpu_started = time.time(), cpu_seconds()

    def _header(self, name: str) -> str:
        k, n = self.names.index(name) + 1, len(self.names)
        bar = "#" * k + "-" * (n - k)
        return f"[demo {k}/{n} {bar}] {name}"

    def _cache_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.json")

    def built_by_another_config(self) -> list[str]:
        """The stages whose stored results another configuration built, in order."""
        return [name for name in self.names if fs.exists(self._cache_path(name))
                and fs.read_json(self._cache_path(name)).get("config") not in self.accepted]

    def cached(self, name: str) -> Any | None:
        """The stored result of `name` from a run with this configuration, or None."""
        path = self._cache_path(name)
        if not fs.exists(path):
            return None
        stored = fs.read_json(path)
        return stored["result"] if stored.get("config") in self.accepted else None

    def run_together(self, stages: list[tuple[str, Callable[[], Any],
                                          Callable[[Any], str] | None]]) -> list[Any]:
        """Runs (or reuses) independent stages `(name, fn, summary)` at the same time;
        returns their results in order.

        The first runs in this thread, each other one in a thread of its own. A SIGTERM
        stops them all: the handler installed here for the whole group (Python lets only
        the main thread install one) raises the flag every trainer's
        `checkpoints.PreemptionSignal` reads, so each saves its state and returns
        `preempted`. A stage that fails or is preempted is raised here once the others are
        done; an interrupt of this thread is raised at once.
        """
        results: list[Any] = [None] * len(stages)
        errors: list[BaseException | None] = [None] * len(stages)

        def work(i: int) -> None:
            try:
                results[i] = self.run(*stages[i])
            except Exception as e:  # noqa: BLE001 - raised again by the calling thread
                errors[i] = e

        threads = [threading.Thread(target=work, args=(i,), daemon=True,
                                    name=f"demo-{stages[i][0]}") for i in range(1, len(stages))]
        self.together.append([name for name, _, _ in stages])
        with checkpoints.PreemptionSignal():
            for t in threads:
                t.start()
            work(0)
            for t in threads:
                t.join()
        for e in errors:
            if e is not None:
                raise e
        return results

    def run(self, name: str, fn: Callable[[], Any],
            summary: Callable[[Any], str] | None = None) -> Any:
        """Runs (or reuses) one stage; returns its result."""
        wall, cpu = time.time(), cpu_seconds()
        result = self.cached(name)
        if result is not None:
            self.reused.append(name)
            how = "reused"
        else:
            self.print(f"{self._header(name)} ...")
            result = jsonable(fn())
            if was_preempted(result):
                # Not stored: a rerun must resume the stage, not take the cut-short result.
                self.print(f"{self._header(name)}: stopped by SIGTERM, its state saved; rerun "
                           "the same command to resume")
                raise PreemptedError(name)
            fs.makedirs(self.dir)
            tmp = self._cache_path(name) + ".tmp"
            fs.write_json(tmp, {"config": self.config, "result": result})
            fs.rename(tmp, self._cache_path(name))
            how = "done"
        self.results[name] = result
        self.seconds[name] = round(time.time() - wall, 1)
        self.cpu_seconds[name] = round(cpu_seconds() - cpu, 1)
        self.load[name] = round(os.getloadavg()[0], 1)
        said = summary(result) if summary is not None and result is not None else ""
        self.print(f"{self._header(name)}: {how}{': ' + said if said else ''} "
                   f"({self.seconds[name]} s, {self.cpu_seconds[name]} s CPU, "
                   f"load {self.load[name]})")
        return result

    def skip(self, name: str, why: str) -> None:
        """A stage that cannot run yet: say so in the log (and the caller lists it)."""
        self.print(f"{self._header(name)}: not run: {why}")

    def timings(self) -> dict[str, Any]:
        """`seconds` (wall) and `cpu_seconds` per stage, `load_average` at each stage's end,
        the totals since the runner started, which stages were reused and which ran
        together."""
        return {"seconds": dict(self.seconds), "cpu_seconds": dict(self.cpu_seconds),
                "total_seconds": round(time.time() - self.started, 1),
                "total_cpu_seconds": round(cpu_seconds() - self.cpu_started, 1),
                "load_average": dict(self.load), "reused_stages": list(self.reused),
                "stages_together": [list(group) for group in self.together]}
