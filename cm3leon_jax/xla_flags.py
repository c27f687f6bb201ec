"""XLA flags a run's config asks for, added to `$XLA_FLAGS` before XLA starts.

XLA reads `$XLA_FLAGS` once per process, when its first backend starts; the processes a
run starts (the demo's trainers in `demo/apart.py`) inherit the variable. So a config can
choose backend flags (`demo.xla_flags`) as long as nothing in the process has used XLA yet;
after that the flags are fixed, and asking for new ones is an error rather than a silent
no-op.
"""

from __future__ import annotations

import os
from typing import Sequence

from cm3leon_jax.errors import UserInputError

ENV = "XLA_FLAGS"


def add(flags: Sequence[str], what: str) -> list[str]:
    """Appends `flags` ("--name=value" each) that `$XLA_FLAGS` lacks; returns those added.

    `what` names the setting in the error raised when XLA has already started here."""
    current = os.environ.get(ENV, "").split()
    new = [f for f in flags if f not in current]
    if not new:
        return []
    bad = [f for f in new if not f.startswith("--") or " " in f]
    if bad:
        raise UserInputError(f"{what}: {bad} are not XLA flags; write each as "
                             "'--xla_name=value'.")
    from jax._src import xla_bridge  # Importing jax does not start a backend.

    if xla_bridge.backends_are_initialized():
        raise UserInputError(f"{what}={list(flags)}: XLA has already started in this process, "
                             f"so its flags are fixed; put them in ${ENV} before starting.")
    os.environ[ENV] = " ".join(current + new)
    return new
