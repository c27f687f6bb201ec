"""Params-only checkpoints: the folder `export` writes and `decode.restore` reads.

A training checkpoint holds the whole `TrainState` (Adam's moments are twice the
parameters) and no record of the model's shape. A params-only checkpoint is what a
user ships: the decoder's parameters in one dtype, and a manifest that makes the
folder self-describing::

    EXPORT_DIR/
        manifest.json      format, version, the DecoderConfig, dtype, step, source,
                           the vocabulary and image tokenizer sub-folders (or null),
                           and the size and sha256 of every other file
        params/            the parameters (an orbax PyTree: OCDBT + zarr, sharded)
        vocab/             the vocabulary folder (`layout.json` + text tokenizer), optional
        image_tokenizer/   an image tokenizer checkpoint (`vocab/vqgan_checkpoint.py`
                           layout, readable by `load_image_tokenizer.checkpoint`), optional

    config, params, step = load_decoder("gs://bucket/export")              # one device
    config, params, step = load_decoder(path, mesh=mesh)                    # any mesh
    config, params, step = load_decoder(path, mesh=mesh, dtype="bfloat16")  # recast

Restoring takes the target shardings from the decoder's logical axis names and the
mesh given, so an export written from a 64-chip FSDP run loads on one CPU, or on a
tensor-parallel slice, without gathering anything on one host. This module sits in
`train/` (below `decode/`) because both the export run mode and `decode.restore`
need it; the writing side (the run mode, other layouts) lives in `export/`, the
complete-or-absent folder writes in `staging.py` beside this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.model.config import DTYPES, DecoderConfig
from cm3leon_jax.model.decoder import abstract_variables

MANIFEST = "manifest.json"
FORMAT = "cm3leon_jax.params_checkpoint"
VERSION = 1
PARAMS, VOCAB, IMAGE_TOKENIZER = "params", "vocab", "image_tokenizer"


class CorruptExportError(UserInputError):
    """A file of an export is missing or does not match the manifest's sha256: the user's
    copy to mend (one `error:` line, exit status 2), not a bug."""


def config_to_dict(config: DecoderConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(fields: dict[str, Any], where: str = "manifest") -> DecoderConfig:
    known = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where}: decoder_config has fields this version of DecoderConfig "
                         f"does not know: {unknown}; upgrade cm3leon_jax or remove them.")
    return DecoderConfig(**fields)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(identity: dict[str, Any], params: Any) -> str:
    """16 hex digits of sha256 over `identity` (sorted-key JSON: a config, a tokenizer's
    kind) and every parameter's key path, dtype, shape and bytes: what a model computes with,
    not where it was loaded from. preprocess's plan.json records the image tokenizer and the
    retrieval encoder by it (a folder copied elsewhere is the same model; a retrained one of
    the same shape is another)."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def list_files(root: str) -> list[str]:
    """Relative paths ('/'-separated) of every file under `root`, sorted."""
    out = []
    for dirpath, _, names in fs.walk(root):
        rel = posixpath.relpath(dirpath.replace("\\", "/"), root.rstrip("/"))
        out += [n if rel == "." else f"{rel}/{n}" for n in names]
    return sorted(out)


def write_manifest(root: str, config: DecoderConfig, *, step: int | None, source: str,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hashes every file under `root` and writes `root/manifest.json`; returns it."""
    files = {rel: {"bytes": fs.getsize(f"{root}/{rel}"),
                   "sha256": sha256(f"{root}/{rel}")}
             for rel in list_files(root) if rel != MANIFEST}
    manifest = {
        "format": FORMAT, "version": VERSION, "decoder_config": config_to_dict(config),
        "dtype": config.param_dtype, "step": step, "source": source,
        "vocab": VOCAB if any(r.startswith(VOCAB + "/") for r in files) else None,
        "image_tokenizer": IMAGE_TOKENIZER if any(r.startswith(IMAGE_TOKENIZER + "/")
                                                  for r in files) else None,
        **(extra or {}), "files": files,
    }
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def is_export(path: str) -> bool:
    """Whether `path` is a params-only checkpoint folder: it holds a manifest.json that is
    not another tool's JSON object (one without this format and without a decoder_config,
    as preprocess writes). A cut-short or newer manifest counts, so that `read_manifest`
    says what is wrong with it (a partial download was taken for a train run without
    checkpoints, or for no layout at all)."""
    manifest = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(manifest):
        return False
    try:
        with fs.open(manifest) as f:
            found = json.load(f)
    except ValueError:  # Not JSON (cut short, or not text): read_manifest names it.
        return True
    return (not isinstance(found, dict) or found.get("format") == FORMAT
            or "decoder_config" in found)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the export at `path`; a UserInputError (a ValueError) naming the file
    when it is missing, cut short, of another format or of a newer version."""
    manifest = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(manifest):
        raise MissingInputError(f"{path!r} has no {MANIFEST}: not a params-only export "
                                "(make one with the `export` run mode).")
    with fs.open(manifest) as f:
        try:
            out = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not text.
            raise UserInputError(f"{manifest}: not valid JSON ({e}); the export is incomplete "
                                 "or damaged: copy it (or export it) again.") from None
    found = out if isinstance(out, dict) else {}
    if found.get("format") != FORMAT or found.get("version", 0) > VERSION:
        newer = found.get("format") == FORMAT
        raise UserInputError(
            f"{manifest}: format {found.get('format')!r} version {found.get('version')!r}; "
            f"this code reads {FORMAT!r} up to version {VERSION}: "
            + ("upgrade cm3leon_jax to read this export." if newer else
               "give the folder of a params-only export (the `export` run mode writes one)."))
    return out


def verify(path: str, manifest: dict[str, Any] | None = None) -> None:
    """Checks every file the manifest lists (size and sha256); raises CorruptExportError."""
    manifest = manifest or read_manifest(path)
    root = path.rstrip("/")
    for rel, want in manifest["files"].items():
        full = f"{root}/{rel}"
        if not fs.exists(full):
            raise CorruptExportError(f"{full}: listed in {MANIFEST} but missing; the export "
                                     "is incomplete, copy it again.")
        size = fs.getsize(full)
        if size != want["bytes"] or sha256(full) != want["sha256"]:
            raise CorruptExportError(f"{full}: {size} bytes whose sha256 does not match "
                                     f"{MANIFEST} ({want['bytes']} bytes); the file is damaged, "
                                     "copy the export again.")


def _absolute(path: str) -> epath.Path:
    return epath.Path(path if "://" in path else epath.Path(path).resolve())


def save_params(directory: str, params: Any) -> None:
    """Writes `params` (jax or numpy, sharded or not) as an orbax PyTree at `directory`."""
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(_absolute(directory), nn.unbox(params))


def restore_params(path: str, config: DecoderConfig, mesh: jax.sharding.Mesh | None = None,
                   rules=None) -> Any:
    """The params of `config` under `path/params`, placed on `mesh` by the logical rules
    (None: on the first local device), in `config.param_dtype`."""
    boxed = abstract_variables(config)["params"]
    shapes = nn.unbox(boxed)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = partitioning.logical_to_sharding(partitioning.logical_axes(boxed), mesh,
                                                     rules, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    params_dir = _absolute(f"{path.rstrip('/')}/{PARAMS}")
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(params_dir).item_metadata.tree
    _check_shapes(stored, shapes, str(params_dir))
    args = ocp.checkpoint_utils.construct_restore_args(target)
    return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(stored: Any, expected: Any, where: str) -> None:
    got, want = _flat_shapes(stored), _flat_shapes(expected)
    problems = [f"{k}: stored {got.get(k, 'nothing')}, config {v}" for k, v in want.items()
                if got.get(k) != v]
    problems += [f"{k}: stored, not in the config" for k in got if k not in want]
    if problems:
        raise ValueError(f"{where} does not fit the manifest's decoder_config: "
                         + "; ".join(problems[:4]) + ". The export is inconsistent; "
                         "export it again.")


def load_decoder(path: str, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                 dtype: str | None = None, check: bool = True
                 ) -> tuple[DecoderConfig, Any, int | None]:
    """(config, params, step) of a params-only export.

    Args:
      path: the export folder (local or gs://).
      mesh, rules: where the parameters go (see `restore_params`); None: one device.
      dtype: cast the parameters to this dtype on restore (None: as exported).
      check: verify every file's sha256 first (reads the export twice).
    """
    manifest = read_manifest(path)
    if check:
        verify(path, manifest)
    config = config_from_dict(manifest["decoder_config"], f"{path}/{MANIFEST}")
    stored_dtype = config.param_dtype
    params = restore_params(path, config, mesh, rules)
    if dtype is not None and dtype != stored_dtype:
        if dtype not in DTYPES:
            raise ValueError(f"load_decoder: dtype={dtype!r}; choose one of {tuple(DTYPES)}.")
        params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
        config = config.replace(param_dtype=dtype)
    return config, params, manifest.get("step")
