"""The demo's sft stage: a short supervised fine-tuning of the pretrained decoder on the
SFT mixture of the built-in corpus (paper Table 5 families: editing, grounded generation
from condition maps and boxes, how-to-write, captioning, VQA, segmentation).

    MODEL_DIR/sft_data/   every family's tokenized examples (Beam; sft_preprocess)
    MODEL_DIR/sft/        the fine-tuned decoder: checkpoints, metrics.jsonl, TensorBoard

`finetune` runs the `sft` run mode (cm3leon_jax/sft.py) on the built-in corpus' SFT shards
under the demo's model, batch and mesh; `sft_stage` sizes it (gin) and reports it. The SFT
scenes are the corpus' train scenes, so the evaluate stage's test scenes stay held out.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin

from cm3leon_jax import fs, sft
from cm3leon_jax.data import sft_preprocess
from cm3leon_jax.train import run_config

_DEFAULT_SPLIT_SIZES = {"train": 1000, "validation": 50, "test": 50}


@gin.configurable
def sft_scenes(split_sizes: dict | None = None, seed: int = 0) -> tuple[dict, int]:
    """The corpus scenes every SFT family is built from, for both demo SFT stages: scenes
    per split, e.g. {"train": 1000, ...}, and the corpus seed."""
    return dict(split_sizes or _DEFAULT_SPLIT_SIZES), seed


@gin.configurable(denylist=["model_dir", "pretrain_dir", "data_dir", "image_tokenizer_fn",
                            "image_size"])
def sft_stage(model_dir: str, pretrain_dir: str, data_dir: str,
              image_tokenizer_fn: Callable[[], Any], image_size: int, num_steps: int = 200,
              peak_lr: float = 1e-3, warmup_steps: int = 30,
              task: str = "cm3leon_sft_mix", loss_per: str = "token",
              optimizer: str | None = None) -> dict:
    """Writes the SFT shards (if the sft_data stage has not) and fine-tunes pretrain_dir's
    decoder into model_dir/sft.

    Args:
      model_dir: MODEL_DIR (sft_data/ and sft/ go under it).
      pretrain_dir, data_dir: the pretrain stage's run and the preprocess stage's data.
      num_steps, peak_lr, warmup_steps: the fine-tuning schedule. The paper's 5e-5 suits
        7B models after 1.4T tokens; the demo's small decoder, pretrained at 6e-3 for a few
        minutes, needs a larger step to learn the new templates in a few hundred steps.
      task: the SFT mixture, "cm3leon_sft_mix" (the families alone) or
        "cm3leon_sft_replay_mix" (with the pretraining documents at `sft_replay.rate`).
      loss_per: how the SFT loss averages, "token" (the paper's) or "example" (each
        example the same weight: `train/step.py loss_weighting`).
      optimizer: the SFT's `make_optimizer.kind` ("adamw", "muon"); None: pretraining's.
    The scenes are `sft_scenes`'.
    """
    sizes, seed = sft_scenes()
    result = finetune(model_dir, base_model_dir=pretrain_dir, pretrain_data_dir=data_dir,
                      image_tokenizer_fn=image_tokenizer_fn, image_size=image_size,
                      split_sizes=sizes, num_steps=num_steps, peak_lr=peak_lr,
                      warmup_steps=warmup_steps, seed=seed, task=task,
                      loss_per=loss_per, optimizer=optimizer)
    train = result["train"]
    return {"steps": train["step"], "final_eval": train.get("eval", {}),
            "eval_loss": _eval_losses(os.path.join(model_dir, "sft")),
            "train_examples": _train_examples(result["data"]),
            "base_step": train["base"]["step"],
            **({"preempted": True} if train.get("preempted") else {})}


def sft_data_stage(model_dir: str, data_dir: str, image_tokenizer_fn: Callable[[], Any],
                   image_size: int) -> dict:
    """The SFT shards alone (`sft_data_dir(model_dir)`) of `sft_scenes`' scenes: a
    stage of its own (its time shows apart from training's); the sft stage then finds them
    written."""
    sizes, seed = sft_scenes()
    manifest = write_sft_data(model_dir, pretrain_data_dir=data_dir,
                              image_tokenizer_fn=image_tokenizer_fn, image_size=image_size,
                              split_sizes=sizes, seed=seed)
    return _train_examples(manifest)


def sft_data_dir(model_dir: str) -> str:
    """Where `write_sft_data` writes a run's SFT shards (and `finetune` reads them)."""
    return os.path.join(model_dir, "sft_data")


def write_sft_data(model_dir: str, *, pretrain_data_dir: str, image_tokenizer_fn: Any,
             image_size: int, split_sizes: dict, seq_len: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    """The SFT shards of the built-in corpus in `model_dir/sft_data` (Beam), with the
    pretraining data's vocabulary; shards already written are kept. It needs no decoder.
    Returns the manifest."""
    return sft_preprocess.sft_preprocess(
        sft_data_dir(model_dir), vocab_dir=os.path.join(pretrain_data_dir, "vocab"),
        source=sft_preprocess.SyntheticSftSource(image_size, dict(split_sizes), seed),
        image_tokenizer_fn=image_tokenizer_fn,
        seq_len=seq_len or gin.query_parameter("train.seq_len"))


def finetune(model_dir: str, *, base_model_dir: str, pretrain_data_dir: str,
             image_tokenizer_fn: Any, image_size: int, split_sizes: dict, num_steps: int,
             peak_lr: float, warmup_steps: int, seq_len: int | None = None, seed: int = 0,
             task: str = "cm3leon_sft_mix", loss_per: str = "token",
             optimizer: str | None = None) -> dict[str, Any]:
    """SFT as one stage of a larger run (the demo, `benchmarks/sft_families.py`): the SFT
    shards of the built-in corpus (`model_dir/sft_data`, Beam), then the sft run
    (`model_dir/sft`), both under
    the caller's gin config (its DecoderConfig, mesh and batch) with the SFT task, steps
    and schedule bound here. `task` is a built-in SFT mixture (tasks/sft.py); the replay
    one reads the pretraining documents from `pretrain_data_dir`; `loss_per` is the SFT
    run's `loss_weighting` ("token" or "example"); `optimizer` its `make_optimizer.kind`
    (None: the caller's, as pretraining's). Finished parts are reused. Returns both
    results."""
    seq_len = seq_len or gin.query_parameter("train.seq_len")
    data_dir = sft_data_dir(model_dir)
    data = write_sft_data(model_dir, pretrain_data_dir=pretrain_data_dir,
                    image_tokenizer_fn=image_tokenizer_fn, image_size=image_size,
                    split_sizes=split_sizes, seq_len=seq_len, seed=seed)
    bindings = {"sft_data_dirs.synthetic": data_dir, "data_dirs.synthetic": pretrain_data_dir,
                "train.task": task,
                "train.num_steps": num_steps, "train.seq_len": seq_len,
                "learning_rate_schedule.peak_lr": peak_lr,
                "learning_rate_schedule.warmup_steps": warmup_steps,
                "loss_weighting.per": loss_per}
    if optimizer is not None:
        bindings["make_optimizer.kind"] = optimizer
    with gin.unlock_config():
        for key, value in bindings.items():
            gin.bind_parameter(key, value)
    # The run's own config.gin, as `main.run` writes one: later runs read its sizes.
    run_config.bind_decoder_config(base_model_dir, "this SFT run")
    run_config.write(os.path.join(model_dir, "sft"))
    result = sft.sft(os.path.join(model_dir, "sft"), base_model_dir=base_model_dir,
                 base_vocab_dir=os.path.join(pretrain_data_dir, "vocab"))
    return {"data": data, "train": result}


def _train_examples(manifest: dict) -> dict[str, int]:
    """Training examples written per family, from the SFT shards' manifest."""
    return {family: splits["train"]["written"]
            for family, splits in manifest["families"].items()}


def _eval_losses(run_dir: str) -> list:
    """(step, held-out loss) of every evaluation the run logged (a resumed run's last)."""
    losses: dict[int, float] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if fs.exists(path):
        with fs.open(path) as f:
            for line in f:
                entry = json.loads(line)
                if "eval/loss" in entry:
                    losses[entry["step"]] = entry["eval/loss"]
    return sorted(losses.items())


def summary(result: dict) -> str:
    loss = result["final_eval"].get("loss")
    said = f"{result['steps']} steps from pretrain step {result['base_step']}"
    return said + (f", held-out loss {loss:.3f}" if loss is not None else "")
