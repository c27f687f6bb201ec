"""Orbax checkpoints of the image tokenizer.

Layout, one folder per saved step (t5x-like)::

    MODEL_DIR/checkpoints/<step>/
        config/   JSON, the VQGANConfig: a checkpoint is self-describing, so
                  loading it needs no gin file
        params/   the weights to tokenize with (the EMA weights when EMA is on)
        state/    everything to resume training exactly: params, optimizer states,
                  discriminator, EMA, codebook usage, step (the data position
                  follows from the step, see vqgan_train.py)

`ImageTokenizer.from_checkpoint` reads config + params only.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cm3leon_jax import fs
from cm3leon_jax.vocab.vqgan import VQGANConfig

ITEMS = ("config", "params", "state")


def checkpoint_dir(model_dir: str) -> str:
    """MODEL_DIR/checkpoints; `model_dir` itself when it is already that folder
    (named `checkpoints`, or holding step folders and no `checkpoints/`)."""
    model_dir = fs.abspath(model_dir)
    sub = os.path.join(model_dir, "checkpoints")
    if os.path.basename(model_dir) == "checkpoints" or fs.isdir(sub):
        return model_dir if os.path.basename(model_dir) == "checkpoints" else sub
    if fs.isdir(model_dir) and any(n.isdigit() for n in fs.listdir(model_dir)):
        return model_dir
    return sub


def manager(model_dir: str, max_to_keep: int | None = 3, read_only: bool = False
            ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(model_dir), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, cfg: VQGANConfig, params: Any,
         state: Any | None = None) -> None:
    """Saves one step (asynchronously; `mngr.wait_until_finished()` to block)."""
    items = {"config": ocp.args.JsonSave(cfg.to_dict()), "params": ocp.args.StandardSave(params)}
    if state is not None:
        items["state"] = ocp.args.StandardSave(state)
    mngr.save(step, args=ocp.args.Composite(**items))


def _latest(mngr: ocp.CheckpointManager, step: int | None, where: str) -> int:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint{'' if step is None else f' for step {step}'} under {where!r} "
            f"(steps there: {list(mngr.all_steps())}); train one with "
            "run.mode = @train_image_tokenizer")
    return step


def restore_config(mngr: ocp.CheckpointManager, step: int) -> VQGANConfig:
    got = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return VQGANConfig.from_dict(dict(got["config"]))


def restore_params(model_dir: str, step: int | None = None) -> tuple[Any, VQGANConfig, int]:
    """(params, config, step) of a saved tokenizer; the latest step by default."""
    from cm3leon_jax.vocab.chameleon_vqgan_weights import abstract_params

    mngr = manager(model_dir, max_to_keep=None, read_only=True)
    step = _latest(mngr, step, model_dir)
    cfg = restore_config(mngr, step)
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(cfg))
    got = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    mngr.close()
    return got["params"], cfg, step


def restore_state(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
                  ) -> tuple[Any, int]:
    """(train state, step) to resume from, laid out like `abstract_state`
    (ShapeDtypeStructs with shardings, so each array lands where it is used)."""
    step = _latest(mngr, step, str(mngr.directory))
    got = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return got["state"], step
