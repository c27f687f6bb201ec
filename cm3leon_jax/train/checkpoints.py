"""Checkpoints with orbax: async saves, keep N, corruption fallback, save on SIGTERM.

Layout under `MODEL_DIR/checkpoints/`::

    <step>/state/    the TrainState (orbax StandardSave: OCDBT + zarr, one shard per device)
    <step>/data/     the data iterators' position (`data.ShardedBatches.save`)
    <step>/checksums.json   size and CRC32 of every file, written before the commit
    corrupt.<step>/  a checkpoint that failed to restore, moved aside (see `restore`)

Saves are asynchronous: `save` blocks only while device buffers are copied to host
memory, then training continues while a background thread writes; a step directory
appears (atomically renamed from a temporary one) only once complete, so a process
killed mid-save leaves the previous checkpoint as the latest. Restoring takes target
shardings from the abstract state given, so a run may resume on another mesh shape.

A committed checkpoint can still be damaged later (a truncated copy, a bad disk).
Orbax notices some of that (a short file) but not flipped bytes, so process 0 records
every file's size and CRC32 in `checksums.json` before the step directory is committed
(orbax's post-finalization callback, after all processes have written) and checks them
before restoring. Reading the checkpoint once more costs about a second per GB; bind
`Checkpointer.checksums = False` where the storage checks integrity itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import zlib
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cm3leon_jax import fs

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
# Written or rewritten by orbax after our callback; not needed to restore.
_UNCHECKED = {CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"}


class CorruptCheckpointError(Exception):
    """A file of a checkpoint does not match its recorded size or checksum."""


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(root: epath.Path, prefix: str = "") -> list[str]:
    """Relative paths of the files under `root` (epath: works on GCS too)."""
    out = []
    for child in root.iterdir():
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            out += _files(child, rel + "/")
        elif rel not in _UNCHECKED:
            out.append(rel)
    return sorted(out)


def write_checksums(root: epath.Path) -> None:
    """Records the size and CRC32 of every file under the step directory `root`."""
    files = {rel: [(root / rel).stat().length, _crc32(root / rel)] for rel in _files(root)}
    (root / CHECKSUMS).write_text(json.dumps({"crc32": files}))


def verify_checksums(root: epath.Path) -> bool:
    """Raises CorruptCheckpointError on a mismatch; False if nothing was recorded."""
    manifest = root / CHECKSUMS
    if not manifest.exists():
        return False
    for rel, (size, crc) in json.loads(manifest.read_text())["crc32"].items():
        path = root / rel
        if not path.exists():
            raise CorruptCheckpointError(f"{rel} is missing")
        if path.stat().length != size:
            raise CorruptCheckpointError(f"{rel} has {path.stat().length} bytes, not {size}")
        if _crc32(path) != crc:
            raise CorruptCheckpointError(f"{rel} does not match its checksum")
    return True


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves/restores an iterator with `save(dir)`/`restore(dir)` (`data.ShardedBatches`)."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        args.iterator.save(os.fspath(directory))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        args.iterator.restore(os.fspath(directory))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


@gin.configurable
class Checkpointer:
    """The run's checkpoints: when to save, how many to keep, how to restore.

    Args:
        directory: where checkpoints live (the trainer passes MODEL_DIR/checkpoints).
        save_every: save when the step is a multiple of this (and at the end of the run,
            and on preemption).
        keep: how many of the latest checkpoints to keep.
        async_save: write in a background thread (training goes on meanwhile).
        checksums: record and verify every file's CRC32 (see the module docstring).
    """

    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True, checksums: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpointer: save_every and keep must be >= 1; got "
                             f"{save_every}, {keep}.")
        # Orbax needs an absolute path; cloud paths (gs://...) are already.
        self.directory = epath.Path(fs.abspath(directory))
        self.checksums, self._async = checksums, async_save
        self._saving: int | None = None  # The step being written (orbax saves one at a time).
        policies = ocp.checkpoint_managers  # No save at the first step (orbax's default).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy()]),
            async_options=ocp.AsyncOptions(post_finalization_callback=self._before_commit)
            if async_save and checksums else None)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": DataIteratorHandler()})
        self.last_good_step: int | None = None

    def describe_last_good(self) -> str:
        if self.last_good_step is None:
            return "none (no checkpoint was saved or restored in this run)"
        return f"step {self.last_good_step} in {self.directory / str(self.last_good_step)}"

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (the step is a multiple of save_every)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data: Any, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether it started a save."""
        if self._manager.latest_step() == step or not (force or self.due(step)):
            return False
        self._manager.wait_until_finished()  # orbax would too; then no callback is pending.
        self._saving = step
        saved = self._manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataIteratorSave(data)))
        if saved:
            self.last_good_step = step
            if self.checksums and not self._async and jax.process_index() == 0:
                self._before_commit()  # Already committed: record right after.
        return saved

    def _before_commit(self) -> None:
        """Runs on process 0 once every process has written `self._saving`."""
        step = self._saving
        staged = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        write_checksums(staged[0] if staged else self.directory / str(step))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, abstract_state: Any, data: Any) -> Any | None:
        """The newest readable checkpoint, restored onto `abstract_state`'s shardings.

        `data`'s iterators are moved to the saved position. A checkpoint that fails to
        restore (truncated or corrupt files) is reported with a warning, moved aside to
        `corrupt.<step>` and the previous one is tried. Returns None if there is none.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                self._verify(step)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=DataIteratorRestore(data)))
            except Exception as e:  # pylint: disable=broad-except  # Any failure means unusable.
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); moving it to "
                            "corrupt.%d and trying the previous one.", step, self.directory,
                            type(e).__name__, first[:300], step)
                self._set_aside(step)
                continue
            self.last_good_step = step
            return restored.state
        return None

    def _verify(self, step: int) -> None:
        if not self.checksums:
            return
        error = ""
        if jax.process_index() == 0:
            try:
                if not verify_checksums(self.directory / str(step)):
                    log.warning("checkpoint at step %d has no %s; restoring it unverified.",
                                step, CHECKSUMS)
            except CorruptCheckpointError as e:
                error = str(e)
        if jax.process_count() > 1:  # Every process must agree on which step to restore.
            flag = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            error = error or ("corrupt (process 0 says)" if int(flag) else "")
        if error:
            raise CorruptCheckpointError(error)

    def _set_aside(self, step: int) -> None:
        # Out of the way, so that this step can be saved again when training reaches it.
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"corrupt.{step}"
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()


class PreemptionSignal:
    """Notices a preemption (SIGTERM), so the trainer can save and exit cleanly.

    With one process, a SIGTERM handler sets a flag. With several, JAX's coordination
    service already watches for SIGTERM, and `reached_preemption_sync_point` makes every
    process agree on the same step to stop at (a host cannot save alone).
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self) -> "PreemptionSignal":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
                return False
        return self._flag.is_set()
