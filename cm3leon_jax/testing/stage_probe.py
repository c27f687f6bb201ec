"""Stage functions for the tests of `demo/apart.py`, which runs a stage in a process of its
own: what that process sees, and how it ends."""

from __future__ import annotations

import os
import time

import gin

from cm3leon_jax import hostmem
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError
from cm3leon_jax.train import checkpoints


def report(binding: str) -> dict:
    """The value of a gin binding in this process, its memory policy and its id."""
    return {"value": gin.query_parameter(binding), "host_memory": os.environ.get(hostmem.ENV),
            "pid": os.getpid()}


def refuse(message: str, mismatch: bool = False) -> None:
    raise (ModelDirMismatchError if mismatch else UserInputError)(message)


def sleep_without_listening(marker: str, seconds: float) -> None:
    """As a stage before its trainer listens for SIGTERM (imports, data): no handler."""
    with open(marker, "w"):
        pass
    time.sleep(seconds)


def crash(message: str) -> None:
    raise RuntimeError(message)


def wait_for_sigterm(marker: str, seconds: float) -> dict:
    """As a trainer waits on its steps: writes `marker` once it listens, then returns
    `{"preempted": True}` when a SIGTERM arrives (False after `seconds`)."""
    with checkpoints.PreemptionSignal() as preemption:
        with open(marker, "w"):
            pass
        deadline = time.monotonic() + seconds
        while not preemption.reached(0) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"preempted": preemption.reached(0)}
