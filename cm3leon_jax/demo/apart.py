"""A demo stage in a process of its own, with freed host memory kept there.

The image tokenizer and the retriever train at the same time (`demo.train_together`). As
two threads of one process they share its heap: with glibc's policy each trainer's
per-step temporaries (more than a worker thread's arena holds) are fresh `mmap`s, faulted
in page by page every step (the retriever's step spent a third of its CPU in the kernel),
and with `CM3LEON_JAX_HOST_MEMORY=retain` (`hostmem.py`) the two trainers' threads queue on
the one arena instead, slower still. Each in its own process, with the memory kept there,
neither happens: half the demo's length of the two then (750 tokenizer and 450 retriever steps,
benchmarks/demo_first_stages.py) took 222-231 s instead of 253-259, the retriever 191-195 s
instead of 231-234; at 300 and 180 steps 115 s instead of 119-122 (a process's start,
about 5 s, weighs more there). The demo's own process keeps glibc's policy for the stages after them
(its SFT's input pipeline is slower on one arena).

    result = apart.run("cm3leon_jax.demo.run:retriever_stage", {"out_dir": path}, "retriever")

The child re-reads this process's gin configuration (`gin.config_str()`), calls the
function with the keyword arguments (JSON values), and hands back its JSON result. A
SIGTERM seen by this process (`checkpoints.PreemptionSignal`) is passed on, so the
child's trainer saves its state and returns its `preempted` result as it would here; a
`UserInputError` in the child is raised here with its message, any other failure as a
`StageProcessError` (the child's traceback is on this process's stderr).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import gin

from cm3leon_jax import fs, hostmem
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError

_POLL_S = 0.2  # how often the waiting thread looks for a SIGTERM to pass on
# The child's command: glibc's policy is set before anything else is imported (the demo
# package brings jax and TensorFlow, whose threads would take arenas of their own).
_CHILD = ("import sys; from cm3leon_jax import hostmem; hostmem.retain_freed_memory(); "
          "from cm3leon_jax.demo import apart; sys.exit(apart.child_main(sys.argv[1:]))")


class StageProcessError(RuntimeError):
    """A stage's own process failed (not on the user's input)."""


def run(function: str, kwargs: dict[str, Any], name: str) -> Any:
    """`function` ("module:name") called with `kwargs` in a new Python process; its result.

    The child starts with `$CM3LEON_JAX_HOST_MEMORY=retain` unless the variable is set, so
    an explicit "default" is kept.
    """
    from cm3leon_jax.train import checkpoints  # jax: not needed to import this module

    with tempfile.TemporaryDirectory(prefix=f"cm3leon_{name}_") as tmp:
        spec, result = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        fs.write_json(spec, {"function": function, "kwargs": kwargs, "gin": gin.config_str()})
        env = dict(os.environ)
        env.setdefault(hostmem.ENV, "retain")
        # The child imports what this process can (`tasks` sits beside the package).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, spec, result, str(os.getpid())],
                                 env=env)
        with checkpoints.PreemptionSignal() as preemption:
            passed_on = False
            while child.poll() is None:
                if not passed_on and preemption.reached(0):
                    child.send_signal(signal.SIGTERM)
                    passed_on = True
                time.sleep(_POLL_S)
        if passed_on and child.returncode == -signal.SIGTERM:
            # Ended by the SIGTERM passed on before (or after) a trainer listened for it:
            # nothing of the stage is stored, so a rerun resumes it, as after a save.
            return {"preempted": True}
        return _read_result(result, child.returncode, name)


def _read_result(path: str, status: int, name: str) -> Any:
    answer = fs.read_json(path) if fs.exists(path) else None
    if answer is not None and "user_input_error" in answer:
        kind = ModelDirMismatchError if answer.get("mismatch") else UserInputError
        raise kind(answer["user_input_error"])  # As the stage raised it (main undoes for one).
    if status != 0 or answer is None:
        raise StageProcessError(f"the demo's {name} stage failed in its own process (exit "
                                f"status {status}); its error is printed above "
                                "(--gin.demo.train_together=False runs the stage in this "
                                "process)")
    return answer["result"]


def _end_with_parent(parent: int) -> None:
    """End this process when the demo's does (Linux: PR_SET_PDEATHSIG), so that a killed
    demo leaves no trainer behind; and now if it is gone already."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(1)


def child_main(argv: list[str]) -> int:
    """The child's work (`_CHILD`): configure gin as the parent was, run, write the result.
    argv: the spec's path, the result's path, the parent's process id."""
    import logging

    from absl import logging as absl_logging

    from cm3leon_jax import main as main_lib  # noqa: F401 - registers `run`, bound in the config
    from cm3leon_jax.demo import stages

    spec_path, result_path, parent = argv
    _end_with_parent(int(parent))
    spec = fs.read_json(spec_path)
    gin.parse_config(spec["gin"])
    gin.finalize()
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("cm3leon_jax").setLevel(logging.INFO)
    module, _, attr = spec["function"].partition(":")
    function = getattr(importlib.import_module(module), attr)
    try:
        answer = {"result": stages.jsonable(function(**spec["kwargs"]))}
    except UserInputError as e:
        answer = {"user_input_error": str(e), "mismatch": isinstance(e, ModelDirMismatchError)}
    fs.write_json(result_path, answer)
    return 0
