"""The `import_weights` run mode: weights from elsewhere -> a params-only export.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/import.gin \
        --gin.MODEL_DIR="'runs/import'" --gin.import_weights.source="'/data/chameleon'"

Layouts (`layout="auto"` tells them apart by their files):
    "params"     our own export (manifest.json): re-exported, e.g. in another dtype
    "hf"         a transformers folder (config.json with model_type opt or chameleon,
                 safetensors weights): `hf_import.py`
    "chameleon"  the original Chameleon release: models/<size>/params.json +
                 consolidated*.pth, tokenizer/{vqgan.ckpt, vqgan.yaml, text_tokenizer.json}
                 (`chameleon_release.py`)
The result (MODEL_DIR/import, or `output_dir`) loads with `restore_decoder` and
generates with the `generate` run mode (checkpoint, vocab_dir and image tokenizer all
inside it). Staged: a failed import leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

import gin

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.export import chameleon_release, hf_import, params_export
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.train import run_config, staging

LAYOUTS = ("params", "hf", "chameleon")


def detect_layout(path: str) -> str:
    """Which known layout the folder `path` is in; raises naming what it found."""
    path = path.rstrip("/")
    if not fs.isdir(path):
        raise MissingInputError(f"{path!r} is not a folder; give the folder of the weights.")
    if pc.is_export(path):
        return "params"
    if hf_import.is_hf_folder(path):
        return "hf"
    if chameleon_release.find_model_dir(path, required=False) is not None:
        return "chameleon"
    found = sorted(fs.listdir(path))[:12]
    raise UserInputError(f"{path!r} is in no layout this importer knows (found {found}). Known: "
                         "a params-only export (manifest.json); a transformers folder (config.json "
                         "with model_type 'opt' or 'chameleon' + model.safetensors); the Chameleon "
                         "release (params.json + consolidated*.pth, under models/<size>/ or "
                         "directly, with tokenizer/ beside).")


def read(path: str, layout: str = "auto", **kwargs: Any):
    """(config, params, extras) of the weights at `path`; extras as in `hf_import.read_hf`."""
    layout = detect_layout(path) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise UserInputError(f"import_weights.layout={layout!r}; choose 'auto' or one of "
                             f"{LAYOUTS}.")
    if layout == "params":
        config, params, step = pc.load_decoder(path)
        manifest = pc.read_manifest(path)
        root = path.rstrip("/")
        extras = {"vocab_dir": f"{root}/{manifest['vocab']}" if manifest["vocab"] else None,
                  "image_tokenizer": None, "step": step,
                  "image_tokenizer_dir": (f"{root}/{manifest['image_tokenizer']}"
                                          if manifest["image_tokenizer"] else None)}
        return config, params, extras
    if layout == "hf":
        return hf_import.read_hf(path)
    return chameleon_release.read_release(path, **kwargs)


@gin.configurable(denylist=["model_dir"])
def import_weights(model_dir: str, *, source: str = gin.REQUIRED, layout: str = "auto",
                   output_dir: str | None = None, dtype: str | None = None,
                   overwrite: bool = False, model_size: str | None = None) -> dict[str, Any]:
    """Imports `source` into a params-only export; returns its manifest.

    Args:
      model_dir: this run's folder; the export goes to `output_dir` or MODEL_DIR/import.
      source: the folder to import (local or gs://).
      layout: "auto", or one of LAYOUTS.
      dtype: cast the parameters ("float32", "bfloat16", "float16"); None: as stored.
      overwrite: replace an existing output folder.
      model_size: for a Chameleon release holding several models/<size>/, which one.
    """
    output_dir = staging.check_target(output_dir or f"{model_dir.rstrip('/')}/import", overwrite,
                                      reads={"import_weights.source": source})
    kwargs = {"model_size": model_size} if model_size else {}
    layout = detect_layout(source) if layout == "auto" else layout
    config, params, extras = read(source, layout, **kwargs)
    params, config = params_export.cast(params, config, dtype, "import_weights")
    tokenizer = extras.get("image_tokenizer")
    if tokenizer is None and extras.get("image_tokenizer_dir"):
        from cm3leon_jax.vocab import vqgan_checkpoint
        vq_params, vq_config, _ = vqgan_checkpoint.restore_params(
            extras["image_tokenizer_dir"], every_process=True)
        tokenizer = (vq_config, vq_params)
    manifest = params_export.write_export(
        output_dir, config, params, step=extras.get("step"), source=source,
        vocab_dir=extras.get("vocab_dir"), write_vocab=extras.get("write_vocab"),
        image_tokenizer=tokenizer, overwrite=overwrite,
        extra={"imported_from": layout})
    print(f"[import_weights] {source} -> {output_dir} ({config.param_dtype})", flush=True)
    if not (extras.get("vocab_dir") or extras.get("write_vocab")):
        print(f"[import_weights] warning: {source} carries no vocabulary (no "
              "cm3leon_vocab/, no Chameleon tokenizer.json), so the export has none: give "
              "generate and eval the vocab_dir of the data the model was trained on.",
              flush=True)
    return manifest


def _preflight(model_dir: str) -> None:
    """Before main.run writes config.gin there: refuses a MODEL_DIR that is, holds or lies
    inside the source, an output_dir that is or holds MODEL_DIR, and a dtype the export
    cannot store."""
    bindings = gin.get_bindings(import_weights)
    params_export.check_dtype(bindings.get("dtype"), "import_weights")
    params_export.check_output_dir(bindings.get("output_dir"), model_dir, "import_weights")
    source = bindings.get("source")
    if isinstance(source, str):  # Not yet bound (gin.REQUIRED): the run itself says so.
        run_config.check_apart(model_dir, "import", {"import_weights.source": source})


import_weights.preflight = _preflight
