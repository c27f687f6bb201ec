"""`python -m cm3leon_jax.main ...` with one fault injected: the process SIGKILLs itself
in the middle of an asynchronous checkpoint save.

    FAULT_KILL_DURING_SAVE_OF_STEP=8 python tests/train/fault_runner.py --gin_file=... ...

The kill lands in orbax's background save, once every file of that step is written
and before the step directory is committed (its atomic rename): the moment where a
crash could leave a checkpoint that looks complete but is not.
"""

import os
import signal
import sys

from cm3leon_jax import main
from cm3leon_jax.train import checkpoints


def _kill_during_save_of(step: int) -> None:
    write = checkpoints.write_checksums

    def write_then_die(root):
        write(root)
        if root.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.write_checksums = write_then_die


if __name__ == "__main__":
    _kill_during_save_of(int(os.environ["FAULT_KILL_DURING_SAVE_OF_STEP"]))
    sys.exit(main.main())
