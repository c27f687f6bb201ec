"""How the demo runs its stages: numbered, timed, logged in one line each, and reused.

    [demo 5/8] pretrain ...
    [demo 5/8] pretrain: 900 steps, held-out loss 1.02 (312 s, 520 s CPU, load 3.1)

A finished stage stores its result in MODEL_DIR/stages/<name>.json together with a
fingerprint of the run configuration it can depend on (`stage_fingerprints`: everything
but the settings only later stages read); a rerun whose configuration gives the same
fingerprint reads it back instead of running the stage again (an interrupted demo
therefore restarts at the first unfinished stage, and the stages that write checkpoints
resume inside themselves). A stage stored under other settings is built again, with
every stage after it, when it writes its outputs whole (generation, evaluation, the
pictures); one that would resume from what the old settings built is refused before any
stage runs (the demo's `_check_stages_of_another_config`); `demo.start_over` builds
everything again. Paths a result holds into
MODEL_DIR follow the folder when it is moved (`StageRunner.cached`). A failing stage is
named in its line and in its error.

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

import ast
import hashlib
import inspect
import os
import re
import resource
import sys
import threading
import time
from typing import Any, Callable

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def jsonable(x: Any) -> Any:
    """Dicts, lists and numpy scalars -> plain JSON values (keys become strings; a float
    that is not finite, a mean over nothing, becomes None as `fs.write_json` writes it, so
    that a stage's result is the same fresh and read back)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return fs.finite(x.item() if isinstance(x, np.generic) else x)


# What a demo writes at the top of its MODEL_DIR (config.gin, config.<n>.gin aside).
OWN_ENTRIES = ("stages", "metrics.json", "tfds", "image_tokenizer", "retriever", "data",
               "pretrain", "sft_data", "sft", "export", "eval", "pictures")


_CONFIG_FILE = re.compile(r"config(\.\d+)?\.gin")
# What a write cut short by a kill leaves beside an entry: a staged folder or file
# (`train/staging.py`, `fs.atomic_write`) or the one it was replacing.
_LEFTOVER = re.compile(r"(?P<entry>.+)\.(tmp-[0-9a-f]{8}|tmp-staging|old-[0-9a-f]{8})")


def _leftover_of_own(name: str) -> bool:
    """Whether `name` is a cut-short write of the demo's own (`export.tmp-1a2b3c4d`)."""
    match = _LEFTOVER.fullmatch(name)
    return bool(match) and (match["entry"] in OWN_ENTRIES
                            or bool(_CONFIG_FILE.fullmatch(match["entry"])))


def foreign_entries(model_dir: str) -> list[str]:
    """What model_dir holds that a demo does not write, sorted ([]: a demo's folder). In a
    folder without `stages/` (which a demo makes before its first stage) nothing but config
    files is the demo's: a `data/` or `eval/` there is someone else's."""
    if not fs.isdir(model_dir):
        return []
    names = [n.rstrip("/") for n in fs.listdir(model_dir)]
    if "stages" not in names:
        return sorted(n for n in names if not _CONFIG_FILE.fullmatch(n))
    return sorted(n for n in names if n not in OWN_ENTRIES and not _CONFIG_FILE.fullmatch(n)
                  and not _leftover_of_own(n))


def _delete(path: str) -> None:
    if fs.isdir(path):
        fs.rmtree(path)
    elif fs.exists(path):
        fs.remove(path)


def clear(model_dir: str) -> None:
    """Deletes what earlier demo runs built in model_dir: its own entries only (OWN_ENTRIES,
    and what a killed write left beside them; config.gin is the current run's), never
    anything else a folder holds."""
    if not fs.isdir(model_dir):
        return
    for name in OWN_ENTRIES:
        _delete(os.path.join(model_dir, name))
    for name in fs.listdir(model_dir):
        if _leftover_of_own(name.rstrip("/")):
            _delete(os.path.join(model_dir, name.rstrip("/")))


def clean(model_dir: str) -> None:
    """`make clean-demo`: `clear`, the runs' config files too, then the folder itself if
    nothing else is left in it; says what it kept."""
    clear(model_dir)
    if not fs.isdir(model_dir):
        return
    for name in fs.listdir(model_dir):
        if _CONFIG_FILE.fullmatch(name.rstrip("/")):
            fs.remove(os.path.join(model_dir, name.rstrip("/")))
    kept = sorted(n.rstrip("/") for n in fs.listdir(model_dir))
    if kept:
        print(f"[clean-demo] {model_dir}: deleted what the demo wrote; kept {', '.join(kept)} "
              "(not the demo's)")
    else:
        fs.rmtree(model_dir)
        print(f"[clean-demo] deleted {model_dir}")


def earlier_work(model_dir: str) -> list[str]:
    """What model_dir holds that an earlier run built (config files and an empty `stages/`
    are not work), sorted; [] for a fresh folder."""
    if not fs.isdir(model_dir):
        return []
    names = [n.rstrip("/") for n in fs.listdir(model_dir)]
    return sorted(n for n in names if not _CONFIG_FILE.fullmatch(n)
                  and not (n == "stages" and not fs.listdir(os.path.join(model_dir, n))))


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


_BINDING = re.compile(r"^(?P<configurable>[A-Za-z_][\w./]*)\.\w+\s*=")


def bindings_by_configurable(config_text: str) -> list[tuple[str | None, str]]:
    """The config's deciding lines as `(configurable, text)`: a binding with the lines that
    continue its value (a long dict or list is written over several), under the selector
    before its parameter ("images/SamplingConfig"); anything else (imports, macros) under
    None."""
    out: list[tuple[str | None, str]] = []
    for line in config_lines(config_text):
        if not line.strip() or line.startswith("#"):
            continue
        match = _BINDING.match(line)
        if match is None and out and line[:1] in (" ", "\t", ")", "]", "}"):
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            out.append((match.group("configurable") if match else None, line))
    return out


def stage_fingerprints(config_text: str, names: list[str],
                       first_read_by: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Per stage (in run order), a short hash of the config lines it can depend on: every
    deciding line except the bindings of configurables that only later stages read.

    `first_read_by`: stage -> the configurables it is the first stage to read (a scoped
    selector, "images/SamplingConfig", or a bare name, which covers that name's unscoped
    bindings only). A configurable no stage lists counts for every stage, so a setting
    changed there is never taken as leaving a stage as it was.
    """
    unknown = sorted(set(first_read_by) - set(names))
    if unknown:
        raise ValueError(f"first_read_by names stages the run does not have: {unknown}")
    late = {c: names.index(stage) for stage, cs in first_read_by.items() for c in cs}
    lines = bindings_by_configurable(config_text)
    out = {}
    for i, name in enumerate(names):
        kept = [text for configurable, text in lines if late.get(configurable, 0) <= i]
        out[name] = hashlib.sha256("\n".join(kept).encode("utf-8")).hexdigest()[:16]
    return out


def earlier_fingerprint(config_text: str) -> str:
    """The fingerprint stages stored before 6 Dec (the whole config string, MODEL_DIR
    included): a run of the same config in the same folder still reuses them."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:16]


_MODEL_DIR_LINE = re.compile(r"^MODEL_DIR = (.+)$", re.MULTILINE)


def _norm(path: str) -> str:
    return path.rstrip("/") if fs.is_remote(path) else os.path.normpath(path)


def _names_of(model_dir: str) -> list[str]:
    """How paths into `model_dir` begin: as it was given, and absolute."""
    return sorted({_norm(model_dir), _norm(fs.abspath(model_dir))})


def recorded_model_dirs(model_dir: str) -> list[str]:
    """The MODEL_DIRs that model_dir's config files (config.gin, config.<n>.gin) name, as
    given and absolute: where results stored without their own MODEL_DIR were written."""
    out: set[str] = set()
    for path in fs.glob(os.path.join(model_dir, "config*.gin")):
        for line in _MODEL_DIR_LINE.finditer(fs.read_text(path)):
            try:
                value = ast.literal_eval(line.group(1).strip())
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str) and value:
                out.update(_names_of(value))
    return sorted(out)


def reroot(value: Any, before: list[str], model_dir: str) -> Any:
    """`value` (a stored result) with every path into one of the folders `before` and not
    into model_dir put under model_dir as given: the same file of a moved folder."""
    here, before = _names_of(model_dir), sorted(set(before), key=len, reverse=True)

    def move(text: str) -> str:
        path = _norm(text) if text else text
        if not text or any(path == h or path.startswith(h + "/") for h in here):
            return text
        old = next((d for d in before if path == d or path.startswith(d + "/")), None)
        return text if old is None else model_dir.rstrip("/") + path[len(old):]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return move(x) if isinstance(x, str) else x

    return walk(value)


def _named(error: Exception, stage: str) -> Exception:
    """`error` naming the demo stage it ended: a UserInputError as one of the same kind
    with the stage in its message (main prints it as its one error line; main.run also
    tells the kinds apart), any other error as it is, with a note its traceback shows."""
    if isinstance(error, UserInputError):
        try:
            return type(error)(f"the demo's {stage} stage: {error}")
        except TypeError:  # A kind made otherwise: as it is.
            pass
    error.add_note(f"(in the demo's {stage} stage)")
    return error


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


_LOOK = object()  # `StageRunner.run`: look for a stored result itself.


class StageRunner:
    """Runs the demo's stages in order, keeping their results, times and a log line each.

    Args:
      model_dir: MODEL_DIR; results are cached under MODEL_DIR/stages/.
      names: every stage the run will go through, in order (for the "k/n" counter).
      config_fingerprint: see `fingerprint` (one for every stage) or `stage_fingerprints`
        (each stage's own); cached results stored under another one are not reused.
      print_fn: where the log lines go.
      also_accepted: other fingerprints of the same configuration, for every stage (the
        whole config's, what stages stored before they had their own).
      outputs: per stage, the paths under MODEL_DIR it writes that later stages read; a
        stored result whose outputs are gone is built again.

    Once a stage is built in this run rather than reused, every stage after it is built
    again too (its inputs are new), except those started beside it (`run_together`).
    """

    def __init__(self, model_dir: str, names: list[str], config_fingerprint: str | dict[str, str],
                 print_fn: Callable[[str], None] | None = None,
                 also_accepted: tuple[str, ...] = (),
                 outputs: dict[str, tuple[str, ...]] | None = None):
        self.model_dir, self.dir = model_dir, os.path.join(model_dir, "stages")
        self.names = list(names)
        self.config = (dict(config_fingerprint) if isinstance(config_fingerprint, dict)
                       else dict.fromkeys(self.names, config_fingerprint))
        self.outputs = dict(outputs or {})
        self.built_from: int | None = None  # The first stage built (not reused) in this run.
        self.accepted = {name: {self.config[name], *also_accepted} for name in self.names}
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
                and fs.read_json(self._cache_path(name)).get("config")
                not in self.accepted[name]]

    def cached(self, name: str) -> Any | None:
        """The stored result of `name` from a run with this configuration, or None (also when
        a stage before it was built in this run, or one of its `outputs` is gone). Its
        paths into the MODEL_DIR it was stored in (the one it records, or for a result
        stored before they did, those the folder's config files name) are put under this
        MODEL_DIR, so a moved folder reports its own files."""
        path = self._cache_path(name)
        if not fs.exists(path):
            return None
        if self.built_from is not None and self.names.index(name) > self.built_from:
            return None
        stored = fs.read_json(path)
        if stored.get("config") not in self.accepted[name]:
            return None
        gone = [p for p in self.outputs.get(name, ()) if not fs.exists(
            os.path.join(self.model_dir, p))]
        if gone:
            self.print(f"{self._header(name)}: stored, but {gone[0]} is gone: building it "
                       "again")
            return None
        before = stored.get("model_dir") or recorded_model_dirs(self.model_dir)
        return reroot(stored["result"], before, self.model_dir)

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
        from cm3leon_jax.train import checkpoints  # jax: `make clean-demo` imports this module

        results: list[Any] = [None] * len(stages)
        errors: list[BaseException | None] = [None] * len(stages)

        stored = [self.cached(name) for name, _, _ in stages]  # Decided before any runs.

        def work(i: int) -> None:
            try:
                results[i] = self.run(*stages[i], stored=stored[i])
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
            summary: Callable[[Any], str] | None = None, stored: Any = _LOOK) -> Any:
        """Runs (or reuses) one stage; returns its result. `stored`: `cached(name)`, when the
        caller looked already."""
        wall, cpu = time.time(), cpu_seconds()
        result = self.cached(name) if stored is _LOOK else stored
        if result is not None:
            self.reused.append(name)
            how = "reused"
        else:
            self.print(f"{self._header(name)} ...")
            try:
                result = jsonable(fn())
            except Exception as e:  # noqa: BLE001 - said, and raised again naming the stage
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.print(f"{self._header(name)}: failed: {first}")
                named = _named(e, name)
                if named is e:
                    raise
                raise named from e
            if was_preempted(result):
                # Not stored: a rerun must resume the stage, not take the cut-short result.
                self.print(f"{self._header(name)}: stopped by SIGTERM, its state saved; rerun "
                           "the same command to resume")
                raise PreemptedError(name)
            fs.makedirs(self.dir)
            tmp = self._cache_path(name) + ".tmp"
            fs.write_json(tmp, {"config": self.config[name], "result": result,
                                "model_dir": _names_of(self.model_dir)})
            fs.rename(tmp, self._cache_path(name))
            how = "done"
            index = self.names.index(name)
            self.built_from = index if self.built_from is None else min(self.built_from, index)
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


def settings(configurable: Callable) -> dict[str, Any]:
    """A gin-configurable stage function's arguments as the run will call it: its defaults,
    with what gin binds over them (for checking a late stage's settings when the demo
    starts, not after the minutes of every stage before it)."""
    defaults = {name: p.default for name, p in inspect.signature(configurable).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **gin.get_bindings(configurable)}
