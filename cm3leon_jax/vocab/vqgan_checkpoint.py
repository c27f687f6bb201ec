"""The image tokenizer's checkpoints: the shared checkpointer's layout, plus two items.

Written by `train/checkpoints.Checkpointer` (the decoder trainer's: asynchronous saves,
checksums, a save on SIGTERM, corrupt checkpoints set aside on resume), one folder per
saved step::

    MODEL_DIR/checkpoints/<step>/
        config/   JSON, the VQGANConfig: a checkpoint is self-describing, so
                  loading it needs no gin file
        params/   the weights to tokenize with (the EMA weights when EMA is on)
        state/    everything to resume training exactly: params, optimizer states,
                  discriminator, EMA, codebook usage, step (the data position
                  follows from the step, see vqgan_train.py); absent from a
                  params-only checkpoint (an export, `save_params`)
        data/     run_record.json: the batch and image size the data position
                  assumes (a resume with others is refused) and the schedule's
                  length (`vqgan_train.RunRecord`; checkpoints before 6 Dec lack it)
        checksums.json

`ImageTokenizer.from_checkpoint` reads config + params only (`restore_params`), after
checking their checksums; a corrupt newest checkpoint is passed over, with a warning, for
the one before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.train import checkpoints
from cm3leon_jax.vocab.vqgan import VQGANConfig

log = logging.getLogger(__name__)


def checkpoint_dir(model_dir: str) -> str:
    """MODEL_DIR/checkpoints; `model_dir` itself when it is already that folder
    (named `checkpoints`, or holding step folders and no `checkpoints/`)."""
    model_dir = fs.abspath(model_dir).rstrip("/")
    sub = fs.join(model_dir, "checkpoints")
    if os.path.basename(model_dir) == "checkpoints":
        return model_dir
    if fs.isdir(sub):
        return sub
    if fs.isdir(model_dir) and any(n.isdigit() for n in fs.listdir(model_dir)):
        return model_dir
    return sub


def checkpointer(model_dir: str, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True) -> checkpoints.Checkpointer:
    """The shared checkpointer over `checkpoint_dir(model_dir)`, with the config and
    params items."""
    return checkpoints.Checkpointer(
        checkpoint_dir(model_dir), save_every=save_every, keep=keep, async_save=async_save,
        items={"config": ocp.JsonCheckpointHandler(),
               "params": ocp.StandardCheckpointHandler()})


def items(cfg: VQGANConfig, params: Any) -> dict[str, ocp.args.CheckpointArgs]:
    """The `extras` of `Checkpointer.save`: the config and the weights to tokenize with."""
    return {"config": ocp.args.JsonSave(cfg.to_dict()), "params": ocp.args.StandardSave(params)}


def save_params(model_dir: str, step: int, cfg: VQGANConfig, params: Any) -> None:
    """A params-only checkpoint (no training state) that `restore_params` reads."""
    ckpt = checkpointer(model_dir, async_save=False)
    try:
        ckpt.save(step, None, None, force=True, extras=items(cfg, params))
    finally:
        ckpt.close()


def steps(model_dir: str) -> list[int]:
    """The complete checkpoints' steps, oldest first (in-progress saves are not listed)."""
    directory = checkpoint_dir(model_dir)
    if not fs.isdir(directory):
        return []
    return checkpoints.finished_steps(directory)


def restore_params(model_dir: str, step: int | None = None, every_process: bool = False
                   ) -> tuple[Any, VQGANConfig, int]:
    """(params, config, step) of a saved tokenizer; the newest readable step by default.

    Each process reads its own copy. `every_process`: every process of the job calls this
    at the same point (an export), and a step that one of them cannot read is passed over
    by all (`checkpoints.agreed`), so that they all hold the same weights."""
    available = steps(model_dir)
    if step is None and not available or step is not None and step not in available:
        raise MissingInputError(
            f"no checkpoint{'' if step is None else f' for step {step}'} under {model_dir!r} "
            f"(steps there: {available}); train one with run.mode = @train_image_tokenizer")
    candidates = [step] if step is not None else available[::-1]
    directory = checkpoints.orbax_path(checkpoint_dir(model_dir))
    for i, candidate in enumerate(candidates):
        try:
            params, cfg = _read(directory / str(candidate), every_process)
            return params, cfg, candidate
        except checkpoints.CorruptCheckpointError as e:
            if i + 1 == len(candidates):
                raise UserInputError(
                    f"the image tokenizer checkpoint at step {candidate} in {model_dir!r} is "
                    f"unreadable ({e}) and there is no earlier one to use.") from e
            log.warning("image tokenizer checkpoint at step %d in %s is unreadable (%s); "
                        "using step %d.", candidate, model_dir, e, candidates[i + 1])
    raise AssertionError("unreachable")


def read_config(model_dir: str) -> VQGANConfig | None:
    """The newest saved tokenizer's config, without its weights (a few hundred bytes); None
    if there is no checkpoint or its config does not read (the restore then says why)."""
    available = steps(model_dir)
    if not available:
        return None
    step_dir = checkpoints.orbax_path(checkpoint_dir(model_dir)) / str(available[-1])
    try:
        return _config_at(step_dir)
    except Exception as e:  # pylint: disable=broad-except  # The restore reports it.
        log.warning("could not read the image tokenizer config at %s (%s)", step_dir, e)
        return None


def _config_at(step_dir: epath.Path) -> VQGANConfig:
    """The VQGANConfig saved in one step's folder."""
    stored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        step_dir / "config", args=ocp.args.JsonRestore())
    return VQGANConfig.from_dict(dict(stored))


def _read(step_dir: epath.Path, together: bool) -> tuple[Any, VQGANConfig]:
    """(params, config) of one step; CorruptCheckpointError if its files are damaged.
    `together`: every process reads it, and they agree on the outcome of each part."""
    from cm3leon_jax.vocab.chameleon_vqgan_weights import abstract_params

    what = f"reading the image tokenizer checkpoint {step_dir}"

    def check() -> None:
        if not checkpoints.verify_checksums(step_dir):
            log.warning("image tokenizer checkpoint %s has no %s; loading it unverified.",
                        step_dir, checkpoints.CHECKSUMS)

    def load() -> tuple[Any, VQGANConfig]:
        try:
            cfg = _config_at(step_dir)
            # Onto this process's first device, whichever devices saved it: every process of
            # a pod holds its own copy (without a target sharding orbax refuses another
            # topology).
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree_util.tree_map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                abstract_params(cfg))
            with ocp.StandardCheckpointer() as reader:
                params = reader.restore(step_dir / "params", target)
        except Exception as e:  # pylint: disable=broad-except  # Checksums fit: the files do not.
            raise checkpoints.CorruptCheckpointError(f"{type(e).__name__}: {e}") from e
        return params, cfg

    checkpoints.agreed(check, what, together)
    return checkpoints.agreed(load, what, together)
