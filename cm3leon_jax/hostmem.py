"""Host memory: optionally keep what XLA:CPU frees, so that each step does not fault it back in.

XLA:CPU allocates an execution's temporaries as one block (430 MiB for `small.gin`'s train
step) with `malloc`, from one of its worker threads. glibc serves a block that large with a
fresh `mmap` (a worker thread's arena cannot hold it) and unmaps it when the step ends, so
every step touches 430 MiB of new pages: 125,000 page faults, each zero-filling 4 KiB, about
a tenth of that step's time (`benchmarks/RESULTS_train.md`). `retain_freed_memory` tells
glibc to keep one arena, never to `mmap` and never to trim the heap: the block is carved
from the heap once and reused by every later step. The process keeps its peak heap size.

It is opt-in (`CM3LEON_JAX_HOST_MEMORY=retain`): one trainer on a CPU host gains (the
`small` train step 0.72 -> 0.65 s; the demo's decoder pretraining 241 -> 175 s on XLA's
kernels, 168 -> 161 s on the C++ ones), but every thread then shares one arena. The demo's
two trainers that run at once (image tokenizer and retriever, each with its input
pipeline) lost more than that as two threads of one process (tokenizer 4.74 -> 4.49
steps/s, retriever 101 -> 124 s in a shortened demo), so the demo runs each in a process of
its own with the setting on (`demo/apart.py`); and a TensorFlow input pipeline queues on
the arena too: the demo's SFT stage took 97 s against 60, its held-out evaluation (seqio
batches) about 40 s longer (RESULTS_train.md, 5 Dec). `main.main`, `demo/apart.py` and
`benchmarks/train_step.py` call it first thing, before any other thread allocates (glibc
fixes the number of arenas when a second thread first needs one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "CM3LEON_JAX_HOST_MEMORY"
# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def retain_freed_memory() -> bool:
    """If `$CM3LEON_JAX_HOST_MEMORY` is "retain", make glibc's malloc keep freed memory for
    reuse (see the module doc). Returns whether it did: False where the variable is unset or
    "default", or the C library is not glibc."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "retain", "default"):
        raise ValueError(f"${ENV}={os.environ[ENV]!r}: use \"retain\" (keep freed host "
                         "memory for reuse: faster for one trainer on a CPU host) or "
                         "\"default\" (glibc's own policy, also when unset).")
    if choice != "retain":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # Not glibc (musl, macOS): nothing to tune.
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1),            # every thread allocates from the main heap,
                (_M_MMAP_MAX, 0),             # which serves blocks of any size,
                (_M_TRIM_THRESHOLD, 2**31 - 1),  # is never handed back to the system,
                (_M_TOP_PAD, 64 << 20))       # and grows 64 MiB at a time.
    return all(mallopt(param, value) == 1 for param, value in settings)
