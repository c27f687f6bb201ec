"""A trained decoder's parameters, read from a trainer's MODEL_DIR.

    config, params, step = restore_decoder("runs/demo/pretrain")   # sizes from its config.gin
    restore_decoder("runs/demo/pretrain", vocab=vocab)  # and refuses another run's vocabulary

The trainer checkpoints the whole `TrainState` (step, params, optimizer moments) under
`MODEL_DIR/checkpoints/<step>/state`; generation needs only the parameters, so only
they are read (orbax partial restore: the optimizer state, twice the parameters' size,
stays on disk). The checkpoint does not record the model's shape: the `DecoderConfig`
comes from the run's MODEL_DIR/config.gin (`train/run_config.py`; gin bindings must agree
with it), or from gin alone when there is none, and is checked against the stored shapes
first, so a mismatch is reported by name instead of as a failed restore. A damaged newest checkpoint
falls back to the previous one, with a warning.

`model_dir` may also be a params-only export (`train/params_checkpoint.py`, written by
the `export` run mode or an import): its manifest gives the config and the step.
`mesh` places the parameters by their logical axes instead of on one device.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import abstract_variables
from cm3leon_jax.retrieval.retriever import RETRIEVAL_JSON
from cm3leon_jax.train import checkpoints, params_checkpoint, run_config, vocab_record
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

log = logging.getLogger(__name__)


def checkpoint_steps(model_dir: str) -> list[int]:
    """Steps with a committed checkpoint under MODEL_DIR/checkpoints (or the folder given);
    a save still being written is not one (`checkpoints.finished_steps`)."""
    return checkpoints.finished_steps(str(_checkpoints_dir(model_dir)))


def check_checkpoint(model_dir: str, step: int | None = None) -> list[int]:
    """What `restore_decoder` refuses before it reads anything, from the folder listing
    alone: no train run (or export) there, no committed checkpoint yet, no checkpoint at
    `step`. Returns the committed steps ([] for an export)."""
    if params_checkpoint.is_export(model_dir):
        return []
    steps = checkpoint_steps(model_dir)
    if not steps:
        raise MissingInputError(f"{model_dir!r} has no committed checkpoint yet; train first "
                                "(or wait for the first save).")
    if step is not None and step not in steps:
        raise UserInputError(f"no checkpoint at step {step} in {model_dir!r}; there are "
                             f"{steps}.")
    return steps


def _checkpoints_dir(model_dir: str) -> epath.Path:
    """MODEL_DIR/checkpoints, or the folder given when it holds the step folders itself. A
    folder with neither is refused, naming the runs inside it (a demo's MODEL_DIR holds one
    per stage), rather than taken for a run that has not saved yet."""
    path = epath.Path(fs.abspath(model_dir))
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise MissingInputError(f"no checkpoints in {model_dir!r}: give the MODEL_DIR of a "
                             "train run (it holds checkpoints/<step>/state).")
    if path.name != "checkpoints" and not any(p.name[:1].isdigit() for p in path.iterdir()):
        runs = [f"{model_dir.rstrip('/')}/{p.name}" for p in sorted(path.iterdir())
                if _is_train_run(p) or params_checkpoint.is_export(str(p))]
        raise MissingInputError(
            f"{model_dir!r} holds neither checkpoints/ nor step folders: not a train run's "
            f"MODEL_DIR{f'; the runs and exports inside it: {runs}' if runs else ''}. Give a "
            "train run's own MODEL_DIR (a demo's MODEL_DIR/<stage>, such as "
            "runs/demo/pretrain) or an export.")
    return path


def _is_train_run(path: epath.Path) -> bool:
    """Whether `path` looks like a decoder's train run: checkpoints/ and the config.gin its
    sizes are read from (a demo's image tokenizer and retriever have no config.gin)."""
    return (path / "checkpoints").is_dir() and (path / run_config.CONFIG_FILE).is_file()


def restore_decoder(model_dir: str, step: int | None = None,
                    config: DecoderConfig | None = None,
                    mesh: jax.sharding.Mesh | None = None, every_process: bool = False,
                    vocab: MultimodalVocabulary | None = None
                    ) -> tuple[DecoderConfig, Any, int]:
    """(config, params, step) of a train run's checkpoint; the newest readable unless `step`.

    A corrupt newest checkpoint (checksum mismatch, unreadable files) is skipped with a
    warning for the one before it, as training does (nothing is moved: generation only
    reads); a checkpoint without checksums loads with a warning. A config that does not
    fit raises UserInputError naming the parameter and both shapes.

    Args:
      model_dir: the trainer's MODEL_DIR (or its checkpoints/ folder), or an export.
      step: which checkpoint (no fallback: it is the one asked for); None: the newest.
      config: the decoder's shape; None: the one in MODEL_DIR/config.gin, which gin
        bindings must agree with (`run_config.decoder_config`; without one, `DecoderConfig()`
        as gin binds it; for an export: the manifest's).
      mesh: shard the parameters over this mesh by the logical rules; None: one device.
        With a mesh every process of the job must call this (the read is collective), and
        a step that one process cannot read is passed over by all (`checkpoints.agreed`).
      every_process: without a mesh, every process of the job calls this at the same point
        (an export) and they must agree on the step, as with one.
      vocab: the vocabulary the caller will generate with: refused before anything is read
        unless it is the model's (`check_vocabulary`).
    """
    if params_checkpoint.is_export(model_dir):
        if vocab is not None:
            manifest = params_checkpoint.read_manifest(model_dir)
            check_vocabulary(model_dir, vocab, params_checkpoint.config_from_dict(
                manifest["decoder_config"], f"{model_dir}/{params_checkpoint.MANIFEST}"))
        return _restore_export(model_dir, step, config, mesh)
    config = run_config.decoder_config(model_dir) if config is None else config
    if vocab is not None:
        check_vocabulary(model_dir, vocab, config)
    steps = check_checkpoint(model_dir, step)
    expected = nn.unbox(abstract_variables(config)["params"])
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, expected)
    else:
        shardings = partitioning.logical_to_sharding(
            partitioning.logical_axes(abstract_variables(config)["params"]), mesh, None, expected)
    target = {"params": jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), expected, shardings)}
    candidates = [step] if step is not None else steps[::-1]
    # With a mesh every process restores its part, with every_process a copy: they must
    # read the same step, or none.
    together = mesh is not None or every_process
    for i, candidate in enumerate(candidates):
        try:
            return config, _read_params(model_dir, candidate, target, together), candidate
        except checkpoints.CorruptCheckpointError as e:
            if step is not None:  # The one asked for: no fallback.
                raise UserInputError(f"the checkpoint at step {step} in {model_dir!r} is "
                                     f"unreadable ({e}); ask for another of {steps}, or for "
                                     "none (the newest readable).")
            if i + 1 == len(candidates):
                raise UserInputError(f"the checkpoint at step {candidate} in {model_dir!r} is "
                                     f"unreadable ({e}) and there is no earlier one to use.")
            log.warning("checkpoint at step %d in %s is unreadable (%s); using step %d.",
                        candidate, model_dir, e, candidates[i + 1])
    raise AssertionError("unreachable")


def _read_params(model_dir: str, step: int, target: Any, together: bool) -> Any:
    """The params of one step onto `target` ({"params": ShapeDtypeStructs with shardings});
    CorruptCheckpointError if its files are damaged. `together`: every process reads it,
    and they agree on the outcome of each part (`checkpoints.agreed`)."""
    step_dir = _checkpoints_dir(model_dir) / str(step)
    state_dir = step_dir / "state"
    handler = ocp.PyTreeCheckpointer()
    what = f"reading the checkpoint at step {step} in {model_dir!r}"

    def check() -> None:
        if not checkpoints.verify_checksums(step_dir):
            log.warning("checkpoint at step %d in %s has no %s; loading it unverified.", step,
                        model_dir, checkpoints.CHECKSUMS)
        try:
            stored = handler.metadata(state_dir).item_metadata.tree["params"]
        except Exception as e:  # pylint: disable=broad-except  # Only reading files here.
            raise checkpoints.CorruptCheckpointError(f"its metadata is unreadable: {e}") from e
        _check_shapes(stored, target["params"], model_dir, step)

    def load() -> Any:
        try:
            return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        except Exception as e:  # pylint: disable=broad-except  # Shapes fit: the files do not.
            raise checkpoints.CorruptCheckpointError(f"{type(e).__name__}: {e}") from e

    checkpoints.agreed(check, what, together)
    return checkpoints.agreed(load, what, together)["params"]


def saved_config(model_dir: str) -> DecoderConfig:
    """The decoder a train run (its config.gin) or an export (its manifest) holds, read
    without its parameters."""
    if params_checkpoint.is_export(model_dir):
        manifest = params_checkpoint.read_manifest(model_dir)
        return params_checkpoint.config_from_dict(manifest["decoder_config"], model_dir)
    return run_config.decoder_config(model_dir)


def data_folders(checkpoint: str, data_dir: str | None, vocab_dir: str | None,
                 retrieval_dir: str | None, who: str, run_file: str) -> tuple[str, str | None]:
    """(vocab_dir, retrieval_dir) of a run that reads the decoder in `checkpoint` (`who`: its
    configurable; `run_file`: gin_configs/runs/<run_file>.gin binds the demo's folders), the
    unbound ones from `data_dir`'s (a preprocess MODEL_DIR) vocab/ and retrieval/; a
    `data_dir` other than the one the model was trained on is refused (`check_data_dir`)."""
    if data_dir:
        if not fs.exists(fs.join(data_dir, "vocab", "layout.json")):
            what = "does not exist" if not fs.exists(data_dir) else "holds no vocab/"
            raise MissingInputError(f"{who}.data_dir {data_dir!r} {what}: give the folder the "
                                    "model's data was preprocessed into (preprocess's "
                                    "MODEL_DIR, DATA_DIR in the user gin files).")
        for name, given, own in (("vocab_dir", vocab_dir, "vocab"),
                                 ("retrieval_dir", retrieval_dir, "retrieval")):
            if given and (fs.abspath(given).rstrip("/")
                          != fs.abspath(fs.join(data_dir, own)).rstrip("/")):
                raise UserInputError(
                    f"{who}.data_dir={data_dir!r} and {who}.{name}={given!r} name different "
                    f"folders (gin_configs/runs/{run_file}.gin binds the demo's {name}): bind "
                    f"{who}.{name}=None to take {data_dir}/{own}, as "
                    f"gin_configs/runs/{run_file}_user.gin does, or leave data_dir unbound.")
        check_data_dir(checkpoint, data_dir, who)
        vocab_dir = vocab_dir or fs.join(data_dir, "vocab")
        retrieval_dir = retrieval_dir or fs.join(data_dir, "retrieval")
    if not vocab_dir:
        raise UserInputError(f"{who} needs the training data's vocabulary: bind "
                             f"{who}.vocab_dir (or {who}.data_dir, a preprocess MODEL_DIR).")
    return vocab_dir, retrieval_dir


def check_data_dir(model_dir: str, data_dir: str | None, who: str) -> None:
    """Refuses a `data_dir` (a preprocess MODEL_DIR) other than the one the model in
    `model_dir` was trained on, by its run's record (`vocab_record.data_mismatch`): its
    retrieval bank, held-out split and document layout (which caption prompt it takes) are
    another run's. Models saved before the record are not checked (an export carries its
    run's record)."""
    mismatch = (model_dir and data_dir
                and vocab_record.data_mismatch(vocabulary_record(model_dir), data_dir))
    if mismatch:
        raise UserInputError(
            f"{who}.data_dir {data_dir!r} is not the data of {who}.checkpoint {model_dir!r}: "
            f"{mismatch}. Give the folder it was trained on; to retrieve from another bank, "
            f"bind {who}.vocab_dir and {who}.retrieval_dir instead of {who}.data_dir (a "
            "fine-tuned model was trained on its SFT data).")


def vocabulary_record(model_dir: str) -> dict | None:
    """The record of the vocabulary the model in `model_dir` was trained on: a train run's
    `vocabulary.json` (the trainer's) or an export's manifest entry; None for a model saved
    without one (before records)."""
    if params_checkpoint.is_export(model_dir):
        return params_checkpoint.read_manifest(model_dir).get("vocabulary")
    return vocab_record.read(model_dir)


def vocabulary_mismatch(model_dir: str, vocab: MultimodalVocabulary) -> str | None:
    """How `vocab` is not the one the model in `model_dir` was trained on, or None."""
    return vocab_record.mismatch(vocabulary_record(model_dir), vocab)


def check_vocabulary(model_dir: str, vocab: MultimodalVocabulary,
                     config: DecoderConfig | None = None, *,
                     names: tuple[str, str] = ("vocabulary", "model_dir"),
                     advice: str = "Give the vocabulary of the data the model was trained on"
                     ) -> None:
    """Refuses `vocab` for the model in `model_dir`: ids its `config` cannot embed or place,
    or another vocabulary than the one its run recorded (another text model of the same
    size reads every word as other tokens, silently). `names`: the settings the user gave
    the vocabulary and the model by ("evaluate.vocab_dir", "evaluate.checkpoint")."""
    mismatch = ((config.vocabulary_mismatch(vocab.layout) if config is not None else None)
                or vocabulary_mismatch(model_dir, vocab))
    if mismatch:
        raise UserInputError(f"{names[0]} {vocab.directory!r} does not fit the model of "
                             f"{names[1]} {model_dir!r}: {mismatch}. {advice}.")


def retrieval_vocabulary_mismatch(retrieval_dir: str, vocab: MultimodalVocabulary
                                  ) -> str | None:
    """How `vocab` is not the one the retrieval folder's documents were tokenized with, or
    None. The record is its retrieval.json's `vocabulary` (preprocessing writes it); a folder
    built before records, inside a preprocessed data folder, is taken to hold that folder's
    vocab/ (the pipeline tokenizes with it); one built by build_retrieval from other
    documents has none and is not checked."""
    meta_path = fs.join(retrieval_dir, RETRIEVAL_JSON)
    record = fs.read_json(meta_path).get("vocabulary") if fs.exists(meta_path) else None
    if record is None:
        sibling = fs.join(posixpath.dirname(retrieval_dir.rstrip("/")), "vocab")
        if not fs.exists(fs.join(sibling, "layout.json")):
            return None
        record = vocab_record.of(MultimodalVocabulary(sibling))
    if record.get("fingerprint") == vocab.fingerprint:
        return None
    return (f"its documents were tokenized with the vocabulary in {record.get('directory')!r} "
            f"(fingerprint {record.get('fingerprint')}), not this one ({vocab.fingerprint}): "
            "the model would read their words and image codes as other tokens")


def check_retrieval_vocabulary(
        retrieval_dir: str, vocab: MultimodalVocabulary, *,
        names: tuple[str, str] = ("the retrieval folder", "the vocabulary"),
        advice: str = "Give the retrieval folder of the model's own training data") -> None:
    """Refuses a retrieval folder whose documents were tokenized with another vocabulary
    than `vocab` (`retrieval_vocabulary_mismatch`); `names`: the settings the user gave the
    two by ("generate.retrieval_dir", "generate.vocab_dir")."""
    documents = retrieval_vocabulary_mismatch(retrieval_dir, vocab)
    if documents:
        raise UserInputError(f"{names[0]} {retrieval_dir!r} does not fit {names[1]} "
                             f"{vocab.directory!r}: {documents}. {advice}.")


def _restore_export(path: str, step: int | None, config: DecoderConfig | None,
                    mesh: jax.sharding.Mesh | None) -> tuple[DecoderConfig, Any, int]:
    stored, params, stored_step = params_checkpoint.load_decoder(path, mesh=mesh)
    if step is not None and step != stored_step:
        raise UserInputError(f"{path!r} is an export of step {stored_step}, not {step}; "
                             "leave the step unset (None) for an export.")
    if config is None:
        return stored, params, stored_step
    runtime = {k: getattr(config, k) for k in run_config.RUNTIME_FIELDS}
    if stored.replace(**runtime) != config:
        raise UserInputError(f"the export in {path!r} was made with {stored}, not the "
                             f"DecoderConfig given ({config}); pass config=None to use its own.")
    return config, params, stored_step


def _check_shapes(stored: Any, expected: Any, model_dir: str, step: int) -> None:
    flat_stored = {jax.tree_util.keystr(p): tuple(m.shape)
                   for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    flat_expected = {jax.tree_util.keystr(p): tuple(s.shape)
                     for p, s in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f"{k}: missing in the checkpoint" for k in flat_expected if k not in flat_stored]
    problems += [f"{k}: checkpoint {flat_stored[k]}, DecoderConfig {flat_expected[k]}"
                 for k in flat_expected if k in flat_stored and flat_stored[k] != flat_expected[k]]
    problems += [f"{k}: in the checkpoint, not in DecoderConfig" for k in flat_stored
                 if k not in flat_expected]
    if problems:
        raise UserInputError(
            f"the checkpoint at step {step} in {model_dir!r} does not fit DecoderConfig(): "
            + "; ".join(problems[:4]) + ". Bind DecoderConfig as the run was trained (include "
            "its gin_configs/models/<size>.gin and overrides; its MODEL_DIR/config.gin lists "
            "them), or give the MODEL_DIR of a run trained with this config.")
