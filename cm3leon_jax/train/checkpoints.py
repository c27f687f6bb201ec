"""Checkpoints with orbax: async saves, keep N, corruption fallback, save on SIGTERM.

Layout under `MODEL_DIR/checkpoints/`::

    <step>/state/    the TrainState (orbax StandardSave: OCDBT + zarr, one shard per device)
    <step>/data/     the data iterators' position (`data.ShardedBatches.save`), when the
                     run's data has one (a run whose position follows from the step has none)
    <step>/<item>/   a trainer's own extra items (`items=`: the image tokenizer's config
                     and inference params, which loading it reads without the state)
    <step>/checksums.json   size and CRC32 of every file, written before the commit
    corrupt.<step>/  a corrupt checkpoint, moved aside by `restore` (never deleted)

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

Restoring tells three things apart, so that no good checkpoint is ever lost:
  * corruption (a checksum mismatch, a truncated, missing or unreadable file): the
    checkpoint is moved aside with a warning and the previous one is tried;
  * a checkpoint that does not fit this run (another model size, another data layout):
    `CheckpointMismatchError`, naming the parameter and both shapes, before orbax reads
    anything; every checkpoint is left byte-identical;
  * anything else is a bug and propagates with its traceback.
On a pod the processes decide together (`agreed`): a step one process cannot read is set
aside, or raises, on all of them, so that none trains from a step the others passed over.
A save that fails (a full disk, a write error) raises `CheckpointSaveError`, which names
the last complete checkpoint; the failed step never becomes a step directory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import zlib
from typing import Any, Callable, TypeVar

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cm3leon_jax import fs
from cm3leon_jax.errors import CheckpointMismatchError, UserInputError  # The first: re-exported.
from cm3leon_jax.train import distributed

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"

# orbax splits every replicated array among its replicas to write it ("replica-parallel"), and
# each split is a small jit program: a compile per array shape on a process's first save. For a
# small array that costs far more than the write it shares: the 80-array state of a 2-layer
# model on 8 replicas took 3.8 CPU s to save first, 0.3 s with this threshold (0.66 and 0.27 s
# later). Large arrays, the ones worth splitting, are still split.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 64 * 1024
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES), override=True)
# Written or rewritten by orbax after our callback; not needed to restore.
_UNCHECKED = {CHECKSUMS, f"{CHECKSUMS}.partial", "_CHECKPOINT_METADATA", "commit_success.txt"}


# Errors of the storage or the machine, not of the files: never taken for corruption.
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, MemoryError)
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


def _transient(error: BaseException) -> bool:
    """Whether reading failed for a reason that says nothing about the files (a network or
    storage outage, a timeout, memory), so the checkpoint must not be set aside."""
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, _TRANSIENT_TYPES) or any(
                status in str(chain) for status in _TRANSIENT_STATUS):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


class CorruptCheckpointError(Exception):
    """A file of a checkpoint does not match its recorded size or checksum."""


class UnreadableCheckpointError(UserInputError):
    """The last checkpoint left could not be read and nothing proves it damaged (no
    checksums): it stays where it is, and the run stops instead of starting from step 0."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the message names the last complete one."""


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


# Files are read this many at a time: one stream from gs:// reads a few hundred MB/s, so
# the state of a 7B run (about 84 GB with its Adam moments) read in one would take much of
# the time orbax gives a save to commit (`commit_timeout_secs`), and the other processes
# wait at its barrier meanwhile. zlib releases the GIL while it sums a chunk.
READERS = 16


def _measure(root: epath.Path, rels: list[str], expected: dict[str, int] | None = None
             ) -> list[tuple[int | None, int | None]]:
    """(size, CRC32) of each file, read `READERS` at a time; (None, None) for a missing
    one, (size, None) for one whose size is not `expected`'s (not read)."""
    def one(rel: str) -> tuple[int | None, int | None]:
        path = root / rel
        if expected is not None and not path.exists():
            return None, None
        size = path.stat().length
        if expected is not None and size != expected[rel]:
            return size, None
        return size, _crc32(path)

    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        return list(pool.map(one, rels))


def write_checksums(root: epath.Path) -> None:
    """Records the size and CRC32 of every file under the step directory `root`."""
    rels = _files(root)
    files = {rel: list(measured) for rel, measured in zip(rels, _measure(root, rels))}
    # Whole or not at all: a crash mid-write must not leave a truncated record, which the
    # next restore would read as a corrupt checkpoint and set aside.
    partial = root / f"{CHECKSUMS}.partial"
    partial.write_text(json.dumps({"crc32": files}))
    partial.rename(root / CHECKSUMS)


def verify_checksums(root: epath.Path) -> bool:
    """Raises CorruptCheckpointError on a mismatch (the first file in the record's order
    that differs); False if nothing was recorded."""
    manifest = root / CHECKSUMS
    if not manifest.exists():
        return False
    try:
        recorded = dict(json.loads(manifest.read_text())["crc32"])
        expected = {rel: int(size) for rel, (size, _) in recorded.items()}
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CorruptCheckpointError(f"{CHECKSUMS} is unreadable ({e})") from None
    rels = list(recorded)
    for rel, (size, crc) in zip(rels, _measure(root, rels, expected)):
        if size is None:
            raise CorruptCheckpointError(f"{rel} is missing")
        if crc is None:
            raise CorruptCheckpointError(f"{rel} has {size} bytes, not {expected[rel]}")
        if crc != recorded[rel][1]:
            raise CorruptCheckpointError(f"{rel} does not match its checksum")
    return True


def finished_steps(directory: str) -> list[int]:
    """The steps under `directory` whose save finished, oldest first.

    Orbax renames a finished save into its `<step>` folder where the file system can
    (local disks), but on gs:// it writes the folder in place and marks the end with
    `commit_success.txt`: a digit folder without one there is a save still being written,
    or one cut off. `ocp.step.is_path_finalized` tells them apart for either kind."""
    root = orbax_path(directory)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and ocp.step.is_path_finalized(p))


T = TypeVar("T")
_READ, _CORRUPT, _FAILED = 0, 1, 2


def agreed(read: Callable[[], T], what: str, together: bool = True) -> T:
    """`read()` (a part of reading one checkpoint step, on this process), its outcome agreed
    by every process of the job (`distributed.gather`): a step any process found corrupt
    raises CorruptCheckpointError on all of them, and an error of another kind on any
    process raises on all (its own there, a RuntimeError naming it elsewhere). So the
    processes read the same step or none, and set a step aside all together or not at all.

    Every process must call it at the same point, and outside orbax's own calls: orbax
    meets the processes at barriers of its own, which a process that failed before one
    never reaches. `together` False (each process reads for itself alone): `read()`."""
    if not together:
        return read()
    try:
        value, code = read(), _READ
    except CorruptCheckpointError as e:
        value, code = e, _CORRUPT
    except Exception as e:  # pylint: disable=broad-except  # Re-raised below, on every process.
        value, code = e, _FAILED
    codes = distributed.gather(code)
    if not set(codes) <= {_READ, _CORRUPT, _FAILED}:
        raise RuntimeError(f"{what}: the processes are out of step (a collective of another "
                           f"kind answered: {codes}); a process failed inside orbax?")
    worst = max(codes)
    if worst == _READ:
        return value
    if code == worst:
        raise value
    if worst == _FAILED:
        raise RuntimeError(f"{what} failed on process {codes.index(_FAILED)} (its log says "
                           "why); this process stops with it.")
    raise CorruptCheckpointError(f"process {codes.index(_CORRUPT)} could not read it")


def orbax_path(directory: str) -> epath.Path:
    """`directory` as orbax's path (absolute); UserInputError on a file system orbax cannot use.

    Orbax reads and writes through etils.epath and tensorstore: local folders, gs:// and
    s3://. TensorFlow-only schemes (ram://, the tests' in-memory one) are not among them.
    """
    try:
        return epath.Path(fs.abspath(directory))  # Cloud paths are absolute already.
    except KeyError:
        scheme = str(directory).split("://", 1)[0]
        raise UserInputError(
            f"checkpoints cannot be written to {directory!r}: orbax does not speak "
            f"{scheme}:// (it writes local folders, gs:// and s3://). Give a MODEL_DIR "
            "there.") from None


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

    Used by the three trainers (decoder, image tokenizer, retriever): each passes its own
    state, its data position (or None) and any `items` of its own.

    Args:
        directory: where checkpoints live (the trainer passes MODEL_DIR/checkpoints).
        save_every: save when the step is a multiple of this (and at the end of the run,
            and on preemption).
        keep: how many of the latest checkpoints to keep.
        async_save: write in a background thread (training goes on meanwhile).
        checksums: record and verify every file's CRC32 (see the module docstring).
        items: extra items saved beside the state, name -> orbax handler (e.g.
            {"config": ocp.JsonCheckpointHandler()}); `save(..., extras=)` gives their args.
        commit_timeout_secs: how long the processes of a pod wait at orbax's barrier for
            an asynchronous save to commit (process 0 writes the checksums meanwhile);
            orbax's default, 20 minutes, unless bound.
    """

    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True, checksums: bool = True,
                 items: dict[str, ocp.CheckpointHandler] | None = None,
                 commit_timeout_secs: int = 1200):
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpointer: save_every and keep must be >= 1; got "
                             f"{save_every}, {keep}.")
        self.directory = orbax_path(directory)
        self.checksums, self._async = checksums, async_save
        self._items = dict(items or {})
        self._saving: int | None = None  # The step being written (orbax saves one at a time).
        policies = ocp.checkpoint_managers  # No save at the first step (orbax's default).
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy()]),
            async_options=ocp.AsyncOptions(
                timeout_secs=commit_timeout_secs,
                post_finalization_callback=self._before_commit if checksums else None)
            if async_save else None)
        self._manager = self._new_manager()
        self.last_good_step: int | None = None

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options,
            item_names=("state", "data", *self._items),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": DataIteratorHandler(), **self._items})

    def describe_last_good(self) -> str:
        """The newest checkpoint known complete (waits for a save in flight to finish)."""
        try:
            self.wait()
        except CheckpointSaveError:
            pass  # `last_good_step` now names the newest committed one.
        if self.last_good_step is None:
            return "none (no checkpoint was saved or restored in this run)"
        return f"step {self.last_good_step} in {self.directory / str(self.last_good_step)}"

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (the step is a multiple of save_every)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data: Any, force: bool = False,
             extras: dict[str, ocp.args.CheckpointArgs] | None = None) -> bool:
        """Saves if `step` is due (or `force`); returns whether it started a save.

        `state` None saves no state (a params-only checkpoint of `extras`); `data` None
        saves no data position. Raises CheckpointSaveError if this save, or the previous
        asynchronous one, failed.
        """
        if self._manager.latest_step() == step or not (force or self.due(step)):
            return False
        unknown = set(extras or {}) - set(self._items)
        if unknown:
            raise ValueError(f"Checkpointer.save: extras {sorted(unknown)} were not declared "
                             f"in items= (declared: {sorted(self._items)}).")
        args = dict(extras or {})
        if state is not None:
            args["state"] = ocp.args.StandardSave(state)
        if data is not None:
            args["data"] = DataIteratorSave(data)
        self.wait()  # orbax would too; then no callback is pending.
        self._saving = step
        try:
            saved = self._manager.save(step, force=force, args=ocp.args.Composite(**args))
            if saved and self.checksums and not self._async and jax.process_index() == 0:
                self._before_commit()  # Already committed: record right after.
        except Exception as e:  # pylint: disable=broad-except  # Named, then re-raised.
            raise self._save_failed(step, e) from e
        if saved and not self._async:
            self.last_good_step = step
        return saved

    def _before_commit(self) -> None:
        """Runs on process 0 once every process has written `self._saving`."""
        step = self._saving
        staged = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        write_checksums(staged[0] if staged else self.directory / str(step))

    def wait(self) -> None:
        """Blocks until every started save is on disk; CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except  # Named, then re-raised.
            raise self._save_failed(self._saving, e) from e
        if self._saving is not None and self._saving in self._manager.all_steps():
            self.last_good_step = max(self._saving, self.last_good_step or 0)

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
        """The error that tells a user which checkpoint is still there to resume from."""
        self._manager.reload()  # What is committed on disk, not what this run meant to write.
        steps = [s for s in self._manager.all_steps() if s != step]
        last = (f"step {max(steps)} in {self.directory / str(max(steps))}, untouched"
                if steps else f"none in {self.directory}")
        self.last_good_step = max(steps) if steps else None
        return CheckpointSaveError(
            f"writing the checkpoint of step {step} failed ({type(error).__name__}: "
            f"{_first_line(error)}). The last complete checkpoint is {last}. Fix the storage "
            "(free space, permissions), then rerun the same command to resume from it.")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def restore(self, abstract_state: Any, data: Any) -> Any | None:
        """The newest readable checkpoint, restored onto `abstract_state`'s shardings.

        `data`'s iterators are moved to the saved position (`data` None: the run saves no
        data position). A corrupt checkpoint (checksum mismatch, truncated or unreadable
        files) is reported with a warning, moved aside to `corrupt.<step>` and the previous
        one is tried. One that does not fit `abstract_state` (shapes, dtypes) or `data`'s
        layout, or that another trainer wrote (it lacks the state or the data position this
        run keeps), raises CheckpointMismatchError and changes nothing on disk; so does a
        data position the input pipeline refuses (UserInputError), verified or not. After
        any failed read `data` is back at its first batch. Returns None if there is no
        checkpoint.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            try:
                verified = self._verify(step)
            except CorruptCheckpointError as e:  # Its checksums say so: damaged.
                self._corrupt(step, e)
                continue
            what = f"restoring the checkpoint at step {step} in {self.directory}"
            restoring = False
            try:  # First what this process reads alone, then orbax's (collective) restore.
                agreed(functools.partial(self._check_step, step, verified, abstract_state,
                                         data), what)
                restoring = True
                state = agreed(functools.partial(self._restore_step, step, verified,
                                                 abstract_state, data), what)
            except Exception as e:
                if restoring and data is not None:  # Moved here, then another process failed.
                    data.restart()
                if not isinstance(e, CorruptCheckpointError):
                    raise
                if step == steps[-1]:  # Unverified, and no earlier one: nothing set aside.
                    raise UnreadableCheckpointError(
                        f"the checkpoint at step {step} in {self.directory} could not be read "
                        f"({_first_line(e)[:300]}) and there is no earlier one; without "
                        "checksums it cannot be told from a read that failed, so it is left "
                        "in place: rerun, or move it aside yourself to train from step 0.") from e
                self._corrupt(step, e)
                continue
            self.last_good_step = step
            return state
        return None

    def _check_step(self, step: int, verified: bool, abstract_state: Any, data: Any) -> None:
        """Whether the step holds what this run restores, readable and fitting
        (CheckpointMismatchError); CorruptCheckpointError when its files are damaged."""
        self._check_holds(step, data)
        try:
            stored = self._stored_shapes(step)
            layout = _layout_difference(data, self.directory / str(step) / "data")
        except Exception as e:  # pylint: disable=broad-except  # Only reading files here.
            if verified or isinstance(e, UserInputError) or _transient(e):  # Not corruption:
                raise  # as written, another kind of run's, or the storage failing now.
            raise CorruptCheckpointError(f"{type(e).__name__}: {_first_line(e)}") from e
        self._check_fits(step, stored, abstract_state, layout)

    def _restore_step(self, step: int, verified: bool, abstract_state: Any, data: Any) -> Any:
        """The state of one step (and `data` moved to its position); CorruptCheckpointError
        when its files are damaged (`data` back at its first batch, a fresh manager)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data is not None:
            args["data"] = DataIteratorRestore(data)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**args)).state
        except Exception as e:  # pylint: disable=broad-except
            if data is not None:  # Some iterators may have moved before the failure.
                data.restart()
            if verified or isinstance(e, UserInputError) or _transient(e):
                raise  # Not corruption: as written, the config changed, or storage failing.
            self._manager = self._fresh_manager()  # A failed read can leave it broken.
            raise CorruptCheckpointError(f"{type(e).__name__}: {_first_line(e)}") from e

    def _check_holds(self, step: int, data: Any) -> None:
        """CheckpointMismatchError if the step lacks what this run restores: the state, or
        (with `data`) a data position. Another trainer's MODEL_DIR (an image tokenizer's or
        a retriever's, which save no data position) is not a corrupt one."""
        folder = self.directory / str(step)
        missing = [name for name, wanted in (("state", True), ("data", data is not None))
                   if wanted and not (folder / name).exists()]
        if missing:
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} holds no "
                f"{' and no '.join(missing)} item (it holds {found}): another kind of run "
                "wrote it (an image tokenizer's or a retriever's MODEL_DIR?). Give this run "
                "its own MODEL_DIR; the checkpoints were left untouched.")

    def _corrupt(self, step: int, error: CorruptCheckpointError) -> None:
        log.warning("checkpoint at step %d in %s is unreadable (%s); moving it to %s and "
                    "trying the previous one.", step, self.directory, _first_line(error)[:300],
                    self._set_aside(step))

    def _verify(self, step: int) -> bool:
        """Whether the step's checksums were checked (they match, or this raises)."""
        if not self.checksums:
            return False
        error, verified = "", False
        if jax.process_index() == 0:
            try:
                verified = verify_checksums(self.directory / str(step))
                if not verified:
                    log.warning("checkpoint at step %d has no %s; restoring it unverified.",
                                step, CHECKSUMS)
            except CorruptCheckpointError as e:
                error = str(e)
        if jax.process_count() > 1:  # Every process must agree on which step to restore.
            flags = multihost_utils.broadcast_one_to_all(np.int32([bool(error), verified]))
            error = error or ("corrupt (process 0 says)" if int(flags[0]) else "")
            verified = bool(flags[1])
        if error:
            raise CorruptCheckpointError(error)
        return verified

    def _stored_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{"params/token_embed/embedding": (shape, dtype)} of the saved state (metadata
        only)."""
        return _flat_shapes(self._manager.item_metadata(step)["state"])

    def _check_fits(self, step: int, stored: dict[str, tuple[tuple[int, ...], str]],
                    abstract_state: Any, layout: str | None) -> None:
        problems = _shape_problems(stored, _flat_shapes(abstract_state))
        if layout:
            problems.append(f"the data layout differs ({layout})")
        if not problems:
            return
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        model_dir = self.directory.parent if self.directory.name == "checkpoints" \
            else self.directory
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} does not fit this run's config: "
            + "; ".join(problems[:3]) + f"{more}. Give this config another MODEL_DIR, or rerun "
            f"with the config the checkpoint was trained with (see {model_dir}/config.gin); "
            "the checkpoints were left untouched.")

    def _fresh_manager(self) -> ocp.CheckpointManager:
        try:
            self._manager.close()
        except Exception as e:  # pylint: disable=broad-except  # It is being replaced.
            log.warning("closing the checkpoint manager after a failed read: %s", e)
        return self._new_manager()

    def _set_aside(self, step: int) -> str:
        """Renames the step's folder to a free `corrupt.<step>[.n]` name; returns it."""
        # Out of the way, so that this step can be saved again when training reaches it.
        name = f"corrupt.{step}"
        if jax.process_index() == 0:
            n = 1
            while (self.directory / name).exists():  # Never overwrite an earlier one.
                n += 1
                name = f"corrupt.{step}.{n}"
            (self.directory / str(step)).rename(self.directory / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return name


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """A state or its orbax metadata -> {"params/layers/mlp/wi/kernel": (shape, dtype)}."""
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_problems(stored: dict[str, tuple[tuple[int, ...], str]],
                    wanted: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """What differs (shape or dtype: a restore would cast a float32 checkpoint to bfloat16
    without a word), parameters before optimizer moments (they repeat the parameters)."""
    show = lambda v: f"{v[0]} {v[1]}"  # noqa: E731
    problems = [f"{k} is {show(stored[k])} in the checkpoint but {show(wanted[k])} in this "
                "config" for k in wanted if k in stored and stored[k] != wanted[k]]
    problems += [f"{k} ({show(wanted[k])}) is not in the checkpoint"
                 for k in wanted if k not in stored]
    problems += [f"{k} ({show(stored[k])}) is in the checkpoint but not in this config"
                 for k in stored if k not in wanted]
    return sorted(problems, key=lambda p: not p.startswith("params/"))


def _layout_difference(data: Any, directory: epath.Path) -> str | None:
    """How the saved data iterator's layout differs from `data`'s (None: it fits)."""
    check = getattr(data, "layout_difference", None)  # `data.ShardedBatches` has one.
    return check(os.fspath(directory)) if check is not None else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PreemptionSignal:
    """Notices a preemption (SIGTERM), so the trainer can save and exit cleanly.

    With one process, a SIGTERM handler sets a flag. Python lets only the main thread
    install a handler, so the first `PreemptionSignal` entered there installs it (and its
    exit puts the previous one back), and every one open meanwhile, in any thread, sees
    the same flag: trainers run side by side in threads (the demo's `run_together`)
    stop together, each saving its state, when an outer one holds the handler. With
    several processes, JAX's coordination service already watches for SIGTERM, and
    `reached_preemption_sync_point` makes every process agree on the same step to stop at
    (a host cannot save alone).
    """

    # Shared by every instance: the flag the handler sets, and who installed the handler.
    _flag = threading.Event()
    _lock = threading.Lock()
    _installer: "PreemptionSignal | None" = None
    _previous: Any = None

    def __enter__(self) -> "PreemptionSignal":
        cls = PreemptionSignal
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            with cls._lock:
                if cls._installer is None:
                    cls._flag.clear()  # A SIGTERM seen by an earlier, finished run.
                    cls._previous = signal.signal(signal.SIGTERM, lambda *_: cls._flag.set())
                    cls._installer = self
        return self

    def __exit__(self, *exc) -> None:
        cls = PreemptionSignal
        with cls._lock:
            if cls._installer is self:
                signal.signal(signal.SIGTERM, cls._previous)
                cls._installer, cls._previous = None, None
                cls._flag.clear()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
                return False
        return PreemptionSignal._flag.is_set()
