"""Write a folder completely or not at all: stage it beside the target, rename at the end.

    with staged("gs://bucket/export", overwrite=False) as tmp:
        ...write everything under tmp...
    # now gs://bucket/export exists, complete; on any error nothing is left behind

A reader never sees a half-written export: until the rename, the target either does
not exist or still holds the previous complete version (with `overwrite=True` the old
one is moved aside first and deleted only after the new one is in place).
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from typing import Iterator

import tensorflow as tf

from cm3leon_jax.train import params_checkpoint as pc


def check_target(path: str, overwrite: bool) -> str:
    """`path` without a trailing slash; raises FileExistsError unless it is free or
    `overwrite` is set. Call it before the expensive work, to fail fast."""
    path = path.rstrip("/")
    if not path:
        raise ValueError("the output folder is empty; give a path.")
    if tf.io.gfile.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists; choose another output folder or set "
                              "overwrite=True (export.overwrite / import_weights.overwrite) "
                              "to replace it.")
    return path


@contextlib.contextmanager
def staged(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder that becomes `path` when the block succeeds."""
    path = check_target(path, overwrite)
    parent = posixpath.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        tf.io.gfile.rmtree(tmp)
        raise
    old = None
    if tf.io.gfile.exists(path):
        check_target(path, overwrite)  # It may have appeared while we were writing.
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        tf.io.gfile.rename(path, old)
    tf.io.gfile.rename(tmp, path)
    if old is not None:
        tf.io.gfile.rmtree(old)


def copy_folder(src: str, dst: str) -> None:
    """Copies every file under `src` to `dst` (any file systems tf.io.gfile speaks)."""
    if not tf.io.gfile.isdir(src):
        raise FileNotFoundError(f"{src!r} is not a folder.")
    for rel in pc.list_files(src):
        tf.io.gfile.makedirs(posixpath.dirname(f"{dst}/{rel}"))
        tf.io.gfile.copy(f"{src}/{rel}", f"{dst}/{rel}", overwrite=True)
