"""The `export` run mode: a training checkpoint -> a params-only export (or the HF layout).

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/export.gin \
        --gin.MODEL_DIR="'runs/export'" --gin.export.checkpoint="'runs/demo/pretrain'"

Reads only the parameters of the training checkpoint (the optimizer state stays on
disk), sharded over the gin-bound mesh so nothing larger than a shard lands on one
host, casts them to `dtype`, and writes a folder that is complete or absent
(`train/staging.py`): the params-only layout of `train/params_checkpoint.py` with a
manifest (DecoderConfig, dtype, step, source, sha256 of every file), plus a copy of
the vocabulary and of the image tokenizer when given. `layout="hf"` writes the
`transformers` layout instead (`hf_export.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3leon_jax import fs
from cm3leon_jax.decode import restore
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.model import hf_weights, partitioning
from cm3leon_jax.model.config import DTYPES, DecoderConfig
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.train import run_config, staging, vocab_record
from cm3leon_jax.vocab import vqgan_checkpoint
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.vqgan import VQGANConfig

log = logging.getLogger(__name__)
LAYOUTS = ("params", "hf")


def check_dtype(dtype: Any, mode: str = "export") -> None:
    """UserInputError unless `dtype` is None (as stored) or one of DTYPES."""
    if dtype is not None and dtype not in DTYPES:
        raise UserInputError(f"{mode}.dtype={dtype!r}; choose one of {tuple(DTYPES)}, or None "
                             "to keep the stored one.")


def cast(params: Any, config: DecoderConfig, dtype: str | None, mode: str = "export"
         ) -> tuple[Any, DecoderConfig]:
    """Params and config in `dtype` (None: unchanged); sharded arrays stay sharded. `mode`:
    the run mode whose `dtype` setting an error names."""
    check_dtype(dtype, mode)
    if dtype is None or dtype == config.param_dtype:
        return params, config
    params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
    return params, config.replace(param_dtype=dtype)


def write_image_tokenizer(dst: str, config: VQGANConfig, params: Any) -> None:
    """An image tokenizer checkpoint that `load_image_tokenizer.checkpoint=dst` reads."""
    vqgan_checkpoint.save_params(dst, 0, config, params)


def as_global(tree: Any) -> Any:
    """Every leaf as a jax.Array orbax can save from every process: imports hold numpy
    arrays, and a tokenizer (or `shard=False` parameters) restored on each host holds arrays
    on that host's devices only, which orbax refuses to save when there are several
    processes. Those become arrays replicated over every process's devices (each host puts
    its own copy, the same values); arrays already spanning processes stay as they are."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), tree)
    everywhere = NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, everywhere, lambda index: host[index])
    return jax.tree.map(put, tree)


def write_export(output_dir: str, config: DecoderConfig, params: Any, *, step: int | None,
                 source: str, vocab_dir: str | None = None,
                 image_tokenizer: tuple[VQGANConfig, Any] | None = None,
                 write_vocab=None, overwrite: bool = False,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes a params-only export folder, all or nothing; returns its manifest ({} on
    processes other than 0, which only take part in the collective parameter save).

    Args:
      vocab_dir: a vocabulary folder to copy into `vocab/`; or `write_vocab(dst)`, a
        function that writes one there (imports build theirs).
      image_tokenizer: (VQGANConfig, params) to store under `image_tokenizer/`.
    """
    params = as_global(params)
    with staging.staged(output_dir, overwrite) as tmp:
        pc.save_params(f"{tmp}/{pc.PARAMS}", params)  # Collective: every process.
        if image_tokenizer is not None:
            vq_config, vq_params = image_tokenizer
            write_image_tokenizer(f"{tmp}/{pc.IMAGE_TOKENIZER}", vq_config,
                                  as_global(vq_params))
        if not staging.is_primary():
            return {}
        if vocab_dir:
            fs.copy_tree(vocab_dir.rstrip("/"), f"{tmp}/{pc.VOCAB}")
        elif write_vocab is not None:
            write_vocab(f"{tmp}/{pc.VOCAB}")
        extra = dict(extra or {})
        if (vocab_dir or write_vocab is not None) and not extra.get("vocabulary"):
            # The bundled vocabulary's record (an import's, or an export of a run from
            # before records), where it will lie: runs that read the export with a
            # vocabulary of their own are checked against it (restore.vocabulary_record).
            bundled = vocab_record.of(MultimodalVocabulary(f"{tmp}/{pc.VOCAB}"))
            extra["vocabulary"] = {**bundled, "directory": f"{output_dir.rstrip('/')}/{pc.VOCAB}"}
        return pc.write_manifest(tmp, config, step=step, source=source, extra=extra)


@gin.configurable(denylist=["model_dir"])
def export(model_dir: str, *, checkpoint: str = gin.REQUIRED, output_dir: str | None = None,
           layout: str = "params", dtype: str | None = "bfloat16", step: int | None = None,
           vocab_dir: str | None = None, image_tokenizer_dir: str | None = None,
           overwrite: bool = False, shard: bool = True,
           config: DecoderConfig | None = None, hf_without_vq: bool = False) -> dict[str, Any]:
    """Exports a training checkpoint; returns the manifest (or the HF summary).

    Args:
      model_dir: this run's folder; the export goes to `output_dir` or MODEL_DIR/export.
      checkpoint: the trainer's MODEL_DIR; DecoderConfig comes from its config.gin
        (`train/run_config.py`; gin bindings must agree).
      layout: "params" (params-only orbax + manifest) or "hf" (safetensors for
        `transformers`: OPTForCausalLM or ChameleonForConditionalGeneration).
      dtype: "float32", "bfloat16" or "float16"; None keeps the trained param_dtype.
      step: which checkpoint (None: the newest).
      vocab_dir / image_tokenizer_dir: the vocabulary folder and the image tokenizer's
        MODEL_DIR, copied into the export so it is self-contained; refused unless they fit
        the model (and each other).
      overwrite: replace an existing output folder (otherwise refused).
      shard: restore over the gin-bound mesh (`make_mesh`) rather than one device.
      config: the decoder as trained; None: the one in the checkpoint's config.gin.
      hf_without_vq: for a Chameleon "hf" export whose image tokenizer transformers cannot
        describe: write config.json without its VQ model (recorded, with a warning) rather
        than refuse.
    """
    if layout not in LAYOUTS:
        raise UserInputError(f"export.layout={layout!r}; choose one of {LAYOUTS}.")
    check_dtype(dtype)
    output_dir = staging.check_target(
        output_dir or f"{model_dir.rstrip('/')}/export", overwrite,
        reads={"export.checkpoint": checkpoint, "export.vocab_dir": vocab_dir,
               "export.image_tokenizer_dir": image_tokenizer_dir})
    _check_folders(vocab_dir, image_tokenizer_dir)  # Before the (long) restore.
    tokenizer = _before_restoring(checkpoint, config, layout, vocab_dir, image_tokenizer_dir,
                                  hf_without_vq)
    mesh = partitioning.make_mesh() if shard else None
    # Every process restores (the same step: `every_process`), and saves its part.
    config, params, got_step = restore.restore_decoder(checkpoint, step, config, mesh,
                                                       every_process=True)
    params, config = cast(params, config, dtype)
    if layout == "hf":
        from cm3leon_jax.export import hf_export
        out = hf_export.write_hf(output_dir, config, params, vocab_dir=vocab_dir,
                                 image_tokenizer=tokenizer, overwrite=overwrite,
                                 source=checkpoint, step=got_step, without_vq=hf_without_vq)
    else:
        # What it was trained on, for runs that read the export with a vocabulary of their
        # own (restore.vocabulary_record): the checkpoint's record, else the one it bundles.
        record = restore.vocabulary_record(checkpoint)
        out = write_export(output_dir, config, params, step=got_step, source=checkpoint,
                           vocab_dir=vocab_dir, image_tokenizer=tokenizer, overwrite=overwrite,
                           extra={"vocabulary": record} if record else None)
    print(f"[export] step {got_step} of {checkpoint} -> {output_dir} ({layout}, "
          f"{config.param_dtype})", flush=True)
    return out


def _before_restoring(checkpoint: str, config: DecoderConfig | None, layout: str,
                      vocab_dir: str | None, image_tokenizer_dir: str | None,
                      hf_without_vq: bool) -> tuple[VQGANConfig, Any] | None:
    """What refuses an export before the (long) restore of the decoder: a model the "hf"
    layout cannot express, a vocabulary or image tokenizer that is not the model's, an image
    tokenizer transformers cannot describe. Returns the image tokenizer (config, params)."""
    model = None
    if layout == "hf" or vocab_dir or image_tokenizer_dir:
        model = config or restore.saved_config(checkpoint)
    if layout == "hf":
        _check_hf_layout(checkpoint, model)
    tokenizer = None
    if image_tokenizer_dir:  # Every process: the export saves it collectively.
        vq_params, vq_config, _ = vqgan_checkpoint.restore_params(image_tokenizer_dir,
                                                                  every_process=True)
        tokenizer = (vq_config, vq_params)
    if model is not None:
        check_fits(checkpoint, model, vocab_dir, image_tokenizer_dir,
                   tokenizer[0] if tokenizer else None)
    if layout == "hf" and tokenizer is not None:
        from cm3leon_jax.export import hf_export
        hf_export.check_vq(model, tokenizer[0], hf_without_vq)
    return tokenizer


def check_fits(checkpoint: str, model: DecoderConfig, vocab_dir: str | None,
               image_tokenizer_dir: str | None, vq_config: VQGANConfig | None) -> None:
    """Refuses a vocabulary or an image tokenizer that is not the model's (export.gin binds
    the demo's, which another checkpoint does not use): more ids than the model embeds, other
    image or sentinel ids than its image places, or another number of codes per image or
    codebook than the vocabulary (or, without one, the model's image ids) holds."""
    vocab = MultimodalVocabulary(vocab_dir) if vocab_dir else None
    layout = vocab.layout if vocab else None
    if vocab:
        restore.check_vocabulary(
            checkpoint, vocab, model, names=("export.vocab_dir", "export.checkpoint"),
            advice="Give the vocabulary it was trained with (its preprocess run's vocab/), "
                   "or None to leave it out")
    if vq_config is None:
        return
    got = (vq_config.codes_per_image, vq_config.codebook_size)
    start, end = model.image_code_ids
    if layout is not None:
        want = (layout.image_length, layout.image_codes)
        held_by = f"the vocabulary {vocab_dir!r} (export.vocab_dir) holds"
    elif end > start:  # No vocabulary: the model's own image ids, where it has them.
        want = (model.image_grid ** 2 or got[0], end - start)
        held_by = f"the model of export.checkpoint {checkpoint!r} has"
    else:
        return
    if got != want:
        raise UserInputError(
            f"export.image_tokenizer_dir {image_tokenizer_dir!r} gives {got[0]} codes per image "
            f"from a codebook of {got[1]}; {held_by} {want[0]} codes per image from {want[1]}. "
            "Give the image tokenizer the vocabulary was made with, or None to leave it out.")


def _check_hf_layout(checkpoint: str, config: DecoderConfig | None) -> None:
    """Refuses a decoder transformers cannot express (e.g. one with image places)."""
    from cm3leon_jax.export import hf_export
    wanted = config or restore.saved_config(checkpoint)
    hf_weights.check_expressible(wanted, hf_export.family_of(wanted))


def _check_folders(vocab_dir: str | None, image_tokenizer_dir: str | None) -> None:
    """Refuses a folder to copy into the export that is not one (on every process)."""
    for name, folder in (("vocab_dir", vocab_dir), ("image_tokenizer_dir", image_tokenizer_dir)):
        if folder and not fs.isdir(folder):
            raise MissingInputError(f"export.{name}={folder!r} is not a folder: give the one "
                                    "to copy into the export, or None to leave it out.")


def check_output_dir(output_dir: Any, model_dir: str, mode: str) -> None:
    """Refuses an `output_dir` that is or holds MODEL_DIR (where the run's config.gin goes);
    one inside it is fine (the default is MODEL_DIR/<mode>)."""
    if isinstance(output_dir, str) and fs.overlap(output_dir, model_dir) and not (
            fs.abspath(output_dir).startswith(fs.abspath(model_dir).rstrip("/") + "/")):
        default = "export" if mode == "export" else "import"
        raise UserInputError(
            f"{mode}.output_dir {output_dir!r} is or holds this run's MODEL_DIR {model_dir!r} "
            "(where its config.gin goes): give the output a folder of its own, or leave "
            f"output_dir unset for MODEL_DIR/{default}.")


def _preflight(model_dir: str) -> None:
    """Refuses a MODEL_DIR that is, holds or lies inside the checkpoint's run, and (before
    main.run writes config.gin there) a model the 'hf' layout cannot express, a vocabulary
    or image tokenizer folder that is missing or does not fit the checkpoint's saved model."""
    bindings = gin.get_bindings(export)
    check_dtype(bindings.get("dtype"))
    checkpoint = bindings.get("checkpoint")
    run_config.check_apart(model_dir, "export", {
        f"export.{name}": bindings.get(name) if isinstance(bindings.get(name), str) else None
        for name in ("checkpoint", "vocab_dir", "image_tokenizer_dir")})
    check_output_dir(bindings.get("output_dir"), model_dir, "export")
    if bindings.get("config") is not None or not isinstance(checkpoint, str):
        return  # The model is a gin reference until the run builds it: the run checks.
    if bindings.get("layout") == "hf":
        _check_hf_layout(checkpoint, None)
    folders = {name: bindings.get(name) for name in ("vocab_dir", "image_tokenizer_dir")}
    if not all(f is None or isinstance(f, str) for f in folders.values()):
        return
    _check_folders(folders["vocab_dir"], folders["image_tokenizer_dir"])
    saved = (pc.is_export(checkpoint)
             or fs.exists(fs.join(checkpoint, run_config.CONFIG_FILE)))
    if saved and any(folders.values()):
        tokenizer_dir = folders["image_tokenizer_dir"]
        check_fits(checkpoint, restore.saved_config(checkpoint), folders["vocab_dir"],
                   tokenizer_dir,
                   vqgan_checkpoint.read_config(tokenizer_dir) if tokenizer_dir else None)


export.preflight = _preflight
