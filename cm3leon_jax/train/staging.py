"""Write a folder completely or not at all: stage it beside the target, rename at the end.

    with staged("gs://bucket/export", overwrite=False) as tmp:
        ...write everything under tmp...
    # now gs://bucket/export exists, complete; on any error nothing is left behind

A reader never sees a half-written export: until the rename, the target either does
not exist or still holds the previous complete version (with `overwrite=True` the old
one is moved aside first and deleted only after the new one is in place).

With several processes (a pod), every process writes into the same staging folder
(orbax saves are collective) and process 0 alone creates, commits or removes it. After
the block and after the commit the processes agree on the outcome
(`distributed.all_agree`): a part that failed on one process only (process 0's copies,
manifest or rename) raises on every process instead of leaving the others waiting at a
barrier until the job is killed (tests/train/test_multihost.py).
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from typing import Iterator, Sequence

import jax
from jax.experimental import multihost_utils

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.train import distributed
from cm3leon_jax.train import params_checkpoint as pc

# What marks a folder as an export this package wrote (params layout; `transformers` layout).
EXPORT_MARKERS = (pc.MANIFEST, "cm3leon_export.json")


def check_target(path: str, overwrite: bool, reads: dict[str, str | None] | None = None,
                 markers: Sequence[str] = EXPORT_MARKERS) -> str:
    """`path` without a trailing slash, if it may be written: it is free, or `overwrite` is
    set and it holds an export (one of `markers`; never any other folder: a training run, a
    data folder); and it is none of the folders the export `reads` ({"export.checkpoint":
    path, ...}), holds none and lies inside none. Raises UserInputError otherwise. Call it
    before the expensive work, to fail fast. Other folders written whole (a retrieval build)
    pass their own `markers`."""
    path = path.rstrip("/")
    if not path:
        raise UserInputError("the output folder is empty; give a path.")
    for name, source in (reads or {}).items():
        if source and fs.overlap(path, source):
            raise UserInputError(
                f"the output folder {path!r} is, holds or lies inside {name} {source!r}, which "
                "this run reads: choose an output folder apart from it.")
    if fs.isdir(path) and not fs.listdir(path):
        return path  # An empty folder holds nothing to lose.
    if fs.exists(path):
        if not any(_holds(path, m) for m in markers):
            raise UserInputError(
                f"{path!r} exists and is not an export (it holds no {' or '.join(markers)}"
                "): overwrite=True replaces only an earlier export; choose another output "
                "folder.")
        if not overwrite:
            raise UserInputError(
                f"{path!r} holds an earlier export; choose another output folder or set "
                "overwrite=True (export.overwrite / import_weights.overwrite) to replace it.")
    return path


def _holds(path: str, marker: str) -> bool:
    """Whether `path` holds `marker`; a manifest.json only when it is an export's (the
    preprocessed data and SFT data folders hold a manifest.json of their own)."""
    if marker == pc.MANIFEST:
        return pc.is_export(path)
    return fs.exists(fs.join(path, marker))


def is_primary() -> bool:
    """Whether this process writes the files that are not collective (manifests, copies)."""
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def staged(path: str, overwrite: bool = False,
           markers: Sequence[str] = EXPORT_MARKERS) -> Iterator[str]:
    """Yields a fresh temporary folder that becomes `path` when the block succeeds.

    `overwrite` replaces only a folder that holds one of `markers` (`check_target`)."""
    path = check_target(path, overwrite, markers=markers)
    # One name for every process of a pod; a unique one otherwise (concurrent writers).
    single = jax.process_count() == 1
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if single else f"{path}.tmp-staging"
    if is_primary():
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent)
        if fs.exists(tmp):  # Left by a crashed pod run of the same export.
            fs.rmtree(tmp)
        fs.makedirs(tmp)
    _barrier(f"staged_start:{path}")
    try:
        yield tmp
    except BaseException:
        if is_primary():
            fs.rmtree(tmp)
        distributed.all_agree(False)  # The others learn of it instead of waiting.
        raise
    if not distributed.all_agree(True):
        if is_primary():
            fs.rmtree(tmp)
        raise RuntimeError(f"another process failed while writing {path}: nothing was "
                           "written there; its log says why.")
    failure = None
    if is_primary():
        try:
            _commit(tmp, path, overwrite, markers)
        except BaseException as e:  # pylint: disable=broad-except  # Raised below, agreed.
            failure = e
    if not distributed.all_agree(failure is None):
        if failure is not None:
            raise failure
        raise RuntimeError(f"process 0 could not put {path} in place; its log says why.")


def _commit(tmp: str, path: str, overwrite: bool, markers: Sequence[str]) -> None:
    old = None
    if fs.exists(path):
        try:
            # It may have appeared while we were writing.
            check_target(path, overwrite, markers=markers)
        except UserInputError:
            fs.rmtree(tmp)
            raise
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        fs.rename(path, old)
    fs.rename(tmp, path)
    if old is not None:
        fs.rmtree(old)


