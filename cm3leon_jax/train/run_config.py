"""The decoder a train run was trained with, read back from its MODEL_DIR/config.gin.

`main.run` writes the resolved gin config to MODEL_DIR/config.gin before a run starts
(the demo's stages write their own: `write`). Its `DecoderConfig.<field> = <value>` lines
are the model's shape, so the runs that read a trained MODEL_DIR (generate, eval, export,
sft) take the decoder from there and their run files bind no size: one run file serves
every size. A shape the user binds explicitly (a flag or an included size file) must
agree with the stored one, or the run stops with one error naming the field and both
values. How a model runs (`RUNTIME_FIELDS`: dtype, attention implementation, ...) is not
its shape: a binding wins over the stored value.

A MODEL_DIR without config.gin (written by code, not the command line) keeps the old way:
`DecoderConfig()` as gin binds it, checked against the checkpoint's shapes on restore.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable

import gin

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.train import params_checkpoint as pc

CONFIG_FILE = "config.gin"
# How a model runs, not what it is: a run may choose these freely.
RUNTIME_FIELDS = ("dtype", "remat_policy", "scan_unroll", "attention_impl", "custom_grads",
                  "loss_chunk", "loss_impl")
_BINDING = re.compile(r"^DecoderConfig\.(\w+)\s*=\s*(.+)$")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DecoderConfig)}


def write(model_dir: str) -> str:
    """Writes the current gin config to MODEL_DIR/config.gin; returns its path.

    `main.run` calls this before every run, and code that starts a run itself (a demo
    stage) calls it too. A different earlier config.gin is first kept as config.<n>.gin:
    it records how the checkpoints already there were trained.
    """
    return write_undoable(model_dir)[0]


def write_undoable(model_dir: str) -> tuple[str, Callable[[], None]]:
    """`write`, and a function that puts MODEL_DIR's config.gin back as it was before (for
    a run its checkpoints refuse: they were trained with the earlier config)."""
    try:
        fs.makedirs(model_dir)
    except OSError as e:
        raise UserInputError(f"cannot create MODEL_DIR {model_dir!r} ({e.strerror or e}); "
                             "give a folder this user can write.") from None
    path = fs.join(model_dir, CONFIG_FILE)
    text = gin.config_str()
    kept, existed = None, fs.exists(path)
    if existed:
        with fs.open(path) as f:
            if f.read() != text:
                n = 1
                while fs.exists(f"{path[:-len('.gin')]}.{n}.gin"):
                    n += 1
                kept = f"{path[:-len('.gin')]}.{n}.gin"
                fs.rename(path, kept)
    with fs.open(path, "w") as f:
        f.write(text)

    def undo() -> None:
        if kept is not None:
            fs.rename(kept, path, overwrite=True)
        elif not existed:
            fs.remove(path)
    return path, undo


def check_apart(model_dir: str, mode: str, reads: dict[str, Any]) -> None:
    """For a run mode's `preflight` (`main.run` calls it before it writes config.gin):
    refuses a MODEL_DIR that is, holds or lies inside a folder the run reads (`reads`:
    {"generate.checkpoint": path, ...}; None values skipped). Writing there would replace
    a trained run's config.gin, which later runs read its model's sizes from."""
    for name, path in reads.items():
        if path and fs.overlap(model_dir, str(path)):
            raise UserInputError(
                f"{mode} MODEL_DIR {model_dir!r} is, holds or lies inside {name} {path!r}: give "
                f"the {mode} run a folder of its own; what it reads is left untouched.")


_MODE = re.compile(r"^run\.mode\s*=\s*@([\w./]+)\s*$")


def check_same_mode(model_dir: str, mode: str) -> None:
    """Refuses a MODEL_DIR whose config.gin another run mode wrote (`main.run` calls it
    before it writes its own): that file is what later runs read the earlier run's
    settings from (a demo's, a trained decoder's), and it would be replaced."""
    path = fs.join(model_dir, CONFIG_FILE)
    if not fs.exists(path):
        return
    with fs.open(path) as f:
        found = [m.group(1) for line in f if (m := _MODE.match(line.strip()))]
    other = found[-1].replace("/", ".").split(".")[-1] if found else None
    if other is not None and other != mode:
        raise UserInputError(
            f"MODEL_DIR {model_dir!r} holds a {other!r} run (its config.gin: run.mode = "
            f"@{found[-1]}); give this {mode!r} run a folder of its own, so that run's "
            "config.gin stays as it is.")


def stored_bindings(model_dir: str) -> dict[str, Any] | None:
    """`DecoderConfig` fields bound in MODEL_DIR/config.gin (None: there is no config.gin).

    Raises UserInputError when a bound value is not a literal (e.g. a macro reference
    left unresolved), naming the line.
    """
    path = fs.join(model_dir, CONFIG_FILE)
    if not fs.exists(path):
        return None
    out = {}
    with fs.open(path) as f:
        for line in f:
            if m := _BINDING.match(line.strip()):
                try:
                    out[m.group(1)] = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    raise UserInputError(
                        f"{path!r} binds {line.strip()!r}, which is not a literal value; bind "
                        "DecoderConfig with plain values in the run that trained it.") from None
    unknown = sorted(set(out) - set(_DEFAULTS))
    if unknown:
        raise UserInputError(f"{path!r} binds DecoderConfig fields this code does not have: "
                             f"{unknown}; was it written by another version of cm3leon-jax?")
    return out


def decoder_config(model_dir: str, what: str = "this run") -> DecoderConfig:
    """The `DecoderConfig` the train run in `model_dir` was trained with.

    Shape fields come from its config.gin (DecoderConfig's defaults for fields it does not
    bind); runtime fields from the current gin bindings where bound, else from the file.
    Without a config.gin: `DecoderConfig()` as gin binds it.

    Args:
      model_dir: a trainer's MODEL_DIR (holding config.gin and checkpoints/), or an
        export (its manifest's config, but for `param_dtype`: how it was stored).
      what: how the error names the current run (e.g. "this SFT run").
    Raises:
      UserInputError: a shape field bound in gin (explicitly, by a flag or an included
        file) differs from the stored one.
    """
    export = pc.is_export(model_dir)
    # An export's param_dtype is how it was stored (bfloat16 by default), not the model's:
    # a run on it keeps its own, as for the runtime fields.
    free = (*RUNTIME_FIELDS, "param_dtype") if export else RUNTIME_FIELDS
    if export:
        stored = pc.config_to_dict(pc.config_from_dict(
            pc.read_manifest(model_dir)["decoder_config"], model_dir))
        stored.pop("param_dtype")
    else:
        stored = stored_bindings(model_dir)
    if stored is None:
        return DecoderConfig()
    explicit = gin.get_bindings(DecoderConfig)
    diffs = [f"{k}: trained {stored.get(k, _DEFAULTS[k])!r}, bound {v!r}"
             for k, v in sorted(explicit.items())
             if k not in free and _norm(v) != _norm(stored.get(k, _DEFAULTS[k]))]
    if diffs:
        source = f"{model_dir}/{pc.MANIFEST if export else CONFIG_FILE}"
        raise UserInputError(
            f"model config mismatch between the run in {model_dir!r} and {what}: "
            f"{'; '.join(diffs[:4])}. The sizes come from {source}: drop "
            "those DecoderConfig bindings (or the size file that binds them), or give a "
            "run trained with them.")
    kwargs = {**stored, **{k: v for k, v in explicit.items() if k in free}}
    return DecoderConfig(**kwargs)


def bind_decoder_config(model_dir: str, what: str = "this run") -> DecoderConfig:
    """`decoder_config(model_dir)`, also bound in gin, for code that builds `DecoderConfig()`
    itself (the trainer of an SFT run) and for the config.gin this run writes."""
    config = decoder_config(model_dir, what)
    with gin.unlock_config():
        for field in dataclasses.fields(DecoderConfig):
            value = getattr(config, field.name)
            if value != field.default:
                gin.bind_parameter(f"DecoderConfig.{field.name}", value)
    return config


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value

