"""The one file-system layer: every user path (MODEL_DIR, data, vocabularies, exports) goes here.

A path with a scheme (`gs://bucket/run`, `s3://...`, `ram://...`: TensorFlow's in-memory
file system, which the tests use) is handled by `tf.io.gfile`; a plain path by the
operating system, directly (no TensorFlow import, and exactly the behavior of `os`).
So the same command runs with a local folder or a bucket:

    fs.makedirs(model_dir)
    with fs.open(fs.join(model_dir, "config.gin"), "w") as f: ...
    fs.write_json(fs.join(model_dir, "manifest.json"), manifest)   # atomic

Orbax checkpoints speak `gs://` through their own layer (etils.epath), which has no
`ram://`; `abspath` leaves remote paths alone and makes local ones absolute, as orbax
wants. Libraries that only read or write local files get them through `local_copy` (a
local copy of a remote file or folder to read) and `staged_dir` (a local folder, uploaded whole when
it is written).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator

from cm3leon_jax.errors import UserInputError


def is_remote(path: str) -> bool:
    """Whether `path` names a file system other than the local one (it has a scheme)."""
    return "://" in str(path)


def _gfile():
    import tensorflow as tf  # Only for remote paths: TensorFlow is slow to import.
    return tf.io.gfile


def join(path: str, *parts: str) -> str:
    """`os.path.join` that keeps `gs://` paths intact."""
    path = str(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def abspath(path: str) -> str:
    """Local paths made absolute; remote ones unchanged (`os.path.abspath` breaks `gs://`)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def overlap(a: str, b: str) -> bool:
    """Whether folder `a` is folder `b`, or one holds the other: local paths compared after
    resolving symbolic links, remote ones by their normalized text. For runs that must not
    write into a folder they read (a fine-tuning run's base, an export's checkpoint)."""
    return within(a, b) or within(b, a)


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, compared as `overlap` compares them."""
    if is_remote(path) != is_remote(folder):
        return False
    if is_remote(path):
        def norm(p):
            scheme, rest = str(p).split("://", 1)
            return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
        path, folder, sep = norm(path), norm(folder), "/"
    else:
        path, folder, sep = os.path.realpath(path), os.path.realpath(folder), os.sep
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


def open(path: str, mode: str = "r") -> IO:  # noqa: A001 (the file system's own open)
    """A file object for `path`; `mode` as Python's ("r", "w", "rb", "wb", "a").

    Text is UTF-8 on every file system (as tf.io.gfile reads and writes it), whatever
    the machine's locale.
    """
    if is_remote(path):
        return _gfile().GFile(str(path), mode)
    return builtins.open(path, mode, encoding=None if "b" in mode else "utf-8")


def exists(path: str) -> bool:
    return _gfile().exists(str(path)) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(str(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return exists(path) and not isdir(path)


def makedirs(path: str) -> None:
    """Creates `path` and its parents; an existing folder is fine."""
    if is_remote(path):
        _gfile().makedirs(str(path))
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names in the folder `path` (not paths), sorted; folders without a trailing '/'."""
    names = _gfile().listdir(str(path)) if is_remote(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (`*`, `?`, `[...]` within one folder level), sorted."""
    if is_remote(pattern):
        return sorted(_gfile().glob(str(pattern)))
    import glob as glob_lib
    return sorted(glob_lib.glob(pattern))


def size_and_mtime(path: str) -> tuple[int, int | None]:
    """A file's size in bytes and, on the local disk, its modification time in ns (None on
    a bucket, where an object's time is its upload's)."""
    if is_remote(path):
        return getsize(path), None
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def getsize(path: str) -> int:
    return _gfile().stat(str(path)).length if is_remote(path) else os.path.getsize(path)


def remove(path: str) -> None:
    if is_remote(path):
        _gfile().remove(str(path))
    else:
        os.remove(path)


def rmtree(path: str, ignore_errors: bool = False) -> None:
    """Deletes the folder `path` and everything in it (`ignore_errors`: a missing one too)."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    import tensorflow as tf
    try:
        _gfile().rmtree(str(path))
    except tf.errors.NotFoundError:
        if not ignore_errors:
            raise


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk`: (folder, subfolder names, file names) for `top` and every folder below."""
    if not is_remote(top):
        yield from os.walk(top)
        return
    for folder, dirs, files in _gfile().walk(str(top)):
        yield folder, [d.rstrip("/") for d in dirs], files


def rename(src: str, dst: str, overwrite: bool = True) -> None:
    """Moves the file or folder `src` to `dst` (atomic on local file systems, not on buckets)."""
    if (is_remote(src) or is_remote(dst)) and isdir(src):
        if exists(dst) and not overwrite:  # buckets have no folder rename: copy, then delete
            raise FileExistsError(dst)
        copy_tree(src, dst)
        rmtree(src)
    elif is_remote(src) or is_remote(dst):
        _gfile().rename(str(src), str(dst), overwrite=overwrite)
    elif overwrite:
        os.replace(src, dst)
    else:
        if os.path.exists(dst):
            raise FileExistsError(dst)
        os.rename(src, dst)


def copy(src: str, dst: str, overwrite: bool = True) -> None:
    """Copies the file `src` to `dst`, across file systems."""
    if is_remote(src) or is_remote(dst):
        _gfile().copy(str(src), str(dst), overwrite=overwrite)
    else:
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(dst)
        shutil.copyfile(src, dst)


def read_text(path: str) -> str:
    with open(path, "r") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically: readers see the old file or the whole new one."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

    The one write-then-rename of the codebase: a killed process leaves `path` whole or
    absent (atomic on local file systems; on buckets an object appears only when its
    upload completes). A failed block removes the temporary file and leaves `path` as it
    was. The name is unique, so concurrent writers of one path never share a temporary.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        if exists(tmp):
            remove(tmp)
        raise
    rename(tmp, path, overwrite=True)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (`atomic_write`)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def np_load(path: str, mmap_mode: str | None = None) -> Any:
    """`np.load` of a .npy/.npz file; memory-mapped (`mmap_mode`) only where local."""
    import numpy as np
    if not is_remote(path):
        return np.load(path, mmap_mode=mmap_mode)
    return np.load(io.BytesIO(read_bytes(path)))


def np_save(path: str, array: Any) -> None:
    """`np.save` to `path` (no ".npy" appended)."""
    import numpy as np
    with open(path, "wb") as f:
        np.save(f, array)


def np_savez(path: str, **arrays: Any) -> None:
    """`np.savez` to `path` (no ".npz" appended)."""
    import numpy as np
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file. A line that is not
    JSON gives its `json.JSONDecodeError` as the value: the caller skips it or stops.

    The file is UTF-8, with or without a byte-order mark (Windows editors write one; it is
    not part of line 1's JSON). Bytes that are not UTF-8 (a Latin-1 file) are a
    `UserInputError` naming the file and line: the whole file is in the wrong encoding, not
    one record bad."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # utf-8-sig, with columns
                raw = raw[3:]  # counted from the text's first byte
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserInputError(
                    f"{path!r} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x}, the line's byte "
                    f"{e.start + 1}): save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, e


def write_json(path: str, value: Any, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`value` as JSON at `path`, atomically; a float that is not finite (a mean over no
    examples) is written as null, which every JSON reader parses (NaN is not JSON)."""
    write_text(path, json.dumps(finite(value), indent=indent, sort_keys=sort_keys,
                                allow_nan=False))


def finite(value: Any) -> Any:
    """`value` with every float that is NaN or infinite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding `path` (a file or a folder): itself if local, else a download."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, posixpath.basename(str(path).rstrip("/")) or "data")
        copy_tree(path, local) if isdir(path) else copy(path, local)
        yield local


def copy_tree(src: str, dst: str) -> None:
    """Copies the folder `src` into `dst` (created; files there are overwritten), across
    file systems."""
    if not isdir(src):
        raise FileNotFoundError(f"{src!r} is not a folder.")
    makedirs(dst)
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        copy_tree(s, d) if isdir(s) else copy(s, d)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local folder to write into; on success its files end up in `path`.

    For libraries that write only local folders (a ScaNN index): local `path`s are used
    directly; remote ones get a temporary folder uploaded when the block ends.
    """
    if not is_remote(path):
        makedirs(path)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        copy_tree(tmp, path)


# safetensors' dtype names; bfloat16 and the float8s are ml_dtypes' (`safetensors.numpy`
# cannot read them, so the format is parsed here).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str) -> dict[str, Any]:
    """Every tensor of a safetensors file (any dtype, bfloat16 included), by name, as numpy
    arrays. A missing or truncated file is a UserInputError naming it."""
    from cm3leon_jax.errors import MissingInputError
    if not exists(path):
        raise MissingInputError(f"{path}: missing.")
    return parse_safetensors(read_bytes(path), path)


def parse_safetensors(data: bytes, where: str) -> dict[str, Any]:
    """The format: an 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and byte range, then the bytes."""
    import ml_dtypes
    import numpy as np

    def bad(why: str) -> UserInputError:
        return UserInputError(f"{where}: not a complete safetensors file ({why}); write or "
                              "download it again.")
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or 8 + size > len(data):
        raise bad(f"{len(data)} bytes, header length {size}")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header: {e}") from None
    out, body = {}, len(data) - 8 - size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise bad(f"{name}: dtype {info.get('dtype')!r} not read")
        dtype = np.dtype(getattr(ml_dtypes, _SAFETENSORS_DTYPES[info["dtype"]], None)
                         or _SAFETENSORS_DTYPES[info["dtype"]])
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end > body or end - begin != count * dtype.itemsize:
            raise bad(f"{name}: bytes {begin}-{end} of {body}")
        out[name] = np.frombuffer(data, dtype, count, 8 + size + begin).reshape(shape)
    return out
