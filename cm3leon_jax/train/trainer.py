"""The `train` run mode: the training loop, in t5x's shape and big_vision's size.

    python -m cm3leon_jax.main --gin_file=gin_configs/train/cm3leon_350m.gin \
        --gin.MODEL_DIR="'gs://bucket/350m'" [--gin_file=gin_configs/meshes/<mesh>.gin]

(`gin_configs/train/<size>.gin` includes `runs/pretrain.gin`, the model and a mesh file.)

One iteration (`_Run.loop`): read the next global batch, dispatch the jitted step
(state donated), then look at the *previous* step's metrics (`_Reporter.submit`);
reading them one step late keeps a step queued on the devices while the host works.
A non-finite loss or gradient norm stops the run naming the step and the last good
checkpoint (or is skipped, by gin). Before a checkpoint is written the step's own
metrics are checked, so a saved state is always finite. Restarting the same command
resumes from the newest readable checkpoint, data position included, and reproduces
the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from typing import Any, Callable, Mapping

import gin
import jax
import numpy as np
import seqio
from jax.sharding import Mesh

from cm3leon_jax.errors import UserInputError, check_count
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import Decoder, count_params
from cm3leon_jax.train import checkpoints, distributed, optimizer, vocab_record
from cm3leon_jax.train import data as data_lib
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import state as state_lib
from cm3leon_jax.train import step as step_lib
from cm3leon_jax.train.state import TrainState

log = logging.getLogger(__name__)


def _check_task(task: str, eval_split: str) -> None:
    """The task is registered and declares the split the run evaluates on (a typo there
    failed only at the first evaluation, eval_every steps in)."""
    try:
        found = seqio.get_mixture_or_task(task)
    except ValueError:
        names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(task, names, n=3)
        raise UserInputError(
            f"train.task={task!r} is not a registered SeqIO task or mixture"
            f"{'; did you mean ' + ' or '.join(map(repr, close)) if close else ''}. "
            f"{len(names)} are registered (`import tasks` registers the project's: "
            "tasks/).") from None
    subtasks = found.tasks if isinstance(found, seqio.Mixture) else [found]
    splits = sorted({split for sub in subtasks for split in sub.splits})
    if splits and eval_split not in splits:
        raise UserInputError(
            f"train.eval_split={eval_split!r}: task {task!r} has the splits {splits}; the run "
            "evaluates on it every train.eval_every steps and at the end.")


def _check_vocabulary(task: str, config: DecoderConfig) -> None:
    """A token id past the embedding table would be clamped silently on TPU and GPU."""
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    if vocab.vocab_size > config.vocab_size:
        raise UserInputError(
            f"task {task!r} uses a vocabulary of {vocab.vocab_size} ids but "
            f"DecoderConfig.vocab_size={config.vocab_size}; bind DecoderConfig.vocab_size "
            f"to at least {vocab.vocab_size} (the vocabulary's padded size).")
    layout = getattr(vocab, "layout", None)
    mismatch = layout is not None and config.vocabulary_mismatch(layout)
    if mismatch:
        raise UserInputError(f"{mismatch} (task {task!r}): bind those values (grid: the "
                             "square root of the codes per image).")


def _vocabulary_record(model_dir: str, task: str, resumed: bool) -> None:
    """A resumed run must read the vocabulary its checkpoints were trained on (MODEL_DIR's
    record, train/vocab_record.py): one of the same size but another text model passes
    every other check and trains on with each id read as another piece. A fresh run (no
    checkpoint) records the task's. Vocabularies without a fingerprint are not recorded."""
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    if not hasattr(vocab, "fingerprint"):
        return
    mismatch = resumed and vocab_record.mismatch(vocab_record.read(model_dir), vocab)
    if mismatch:
        raise UserInputError(
            f"MODEL_DIR {model_dir!r} holds checkpoints, and {mismatch}; task {task!r} reads "
            f"{vocab.directory!r}. Give the task the vocabulary of the run's data, or train "
            "into a new MODEL_DIR.")
    if not resumed and jax.process_index() == 0:
        vocab_record.write(model_dir, vocab)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def _to_host(tree: Any) -> dict[str, float]:
    """Replicated scalars -> floats; works when the arrays span several processes."""
    return {k: float(np.asarray(v.addressable_data(0))) for k, v in tree.items()}


@gin.configurable
def train(model_dir: str, *, task: str = gin.REQUIRED, num_steps: int = gin.REQUIRED,
          global_batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED, seed: int = 0,
          num_microbatches: int = 1, num_data_shards: int | None = None,
          log_every: int = 50, eval_every: int = 0, eval_steps: int = 4,
          eval_split: str = "validation", on_nonfinite: str = "stop",
          progress_bar: bool = True,
          init_params_from: Callable[[Mesh], Any] | None = None) -> dict[str, Any]:
    """Trains `DecoderConfig()` on a seqio task; resumes from MODEL_DIR/checkpoints.

    Args:
        model_dir: checkpoints, TensorBoard events and metrics.jsonl go here.
        task: a seqio task or mixture name (e.g. "cm3leon_synthetic_mix").
        num_steps: optimizer updates in the whole run (also the default decay length).
        global_batch_size: rows per update across all devices (paper: 8M tokens =
            2048 rows of 4096). seq_len: tokens per packed row.
        seed: parameter initialization and data order.
        num_microbatches: gradient accumulation: the batch is split in this many parts.
        num_data_shards: see `data.py`; default: the number of processes. Keep it fixed
            for the life of a run.
        log_every: write metrics every this many steps. eval_every: held-out loss every
            this many steps (0: only at the end), over `eval_steps` batches of `eval_split`.
        on_nonfinite: "stop" (raise, naming the step and last good checkpoint) or "skip".
        init_params_from: for fine-tuning: `init_params_from(mesh)` returns the parameters
            to start from (a pytree shaped like the model's, best laid out over the run's
            mesh by the logical rules: with several processes, arrays on one host's devices
            cannot be put onto the run's shardings) when MODEL_DIR has no checkpoint yet;
            the optimizer state and step stay fresh. Ignored on resume.
    Returns:
        {"step": the final step, "preempted": whether a SIGTERM cut the run short,
         "eval": the last held-out metrics}.
    """
    distributed.initialize()
    # From here on a SIGTERM (preemption) lets the loop save before it exits.
    with checkpoints.PreemptionSignal() as preemption:
        config = DecoderConfig()
        if seq_len > config.max_length:
            raise UserInputError(f"train.seq_len={seq_len} > DecoderConfig.max_length="
                                 f"{config.max_length}; lower one or raise the other.")
        _check_task(task, eval_split)
        _check_vocabulary(task, config)
        _check_counts(num_steps=num_steps, log_every=log_every, eval_steps=eval_steps,
                      eval_every=eval_every, global_batch_size=global_batch_size)
        run = _Run(model_dir, config, task, num_steps, global_batch_size, seq_len, seed,
                   num_microbatches, num_data_shards, eval_steps, eval_split, on_nonfinite)
        reporter = _Reporter(run.writer, run.ckpt, num_steps, log_every, on_nonfinite,
                             run.peak, run.flops_per_step, global_batch_size * seq_len)
        try:
            with jax.set_mesh(run.mesh):
                return run.loop(reporter, preemption, eval_every, progress_bar,
                                init_params_from)
        finally:
            run.close()


def _check_counts(**counts: int) -> None:
    """Step counts of `train` that must be positive (eval_every: 0 is "only at the end")."""
    for name, value in counts.items():
        check_count(f"train.{name}", value, 0 if name == "eval_every" else 1, " (4, not '4')")


class _Run:
    """Everything one training run holds: model, optimizer, mesh, data, steps, outputs."""

    def __init__(self, model_dir: str, config: DecoderConfig, task: str, num_steps: int,
                 global_batch_size: int, seq_len: int, seed: int, num_microbatches: int,
                 num_data_shards: int | None, eval_steps: int, eval_split: str,
                 on_nonfinite: str):
        self.config, self.num_steps, self.seed = config, num_steps, seed
        self.model_dir, self.task = model_dir, task
        self.mesh = distributed.train_mesh()
        step_lib.check_batch(self.mesh, global_batch_size, num_microbatches)
        self.peak = metrics_lib.peak_flops_per_device()  # Measured on CPU: before data threads.
        self.flops_per_step = metrics_lib.train_flops_per_step(config, global_batch_size, seq_len)
        self.model = Decoder(config)
        schedule = optimizer.learning_rate_schedule(total_steps=num_steps)
        self.tx = optimizer.make_optimizer(
            schedule, param_axes=state_lib.param_axes(self.model.config))
        shardings = state_lib.state_shardings(self.model, self.tx, self.mesh)
        self.param_shardings = shardings.params
        self.abstract = state_lib.abstract_train_state(self.model, self.tx, self.mesh)
        batch_sharding = step_lib.batch_sharding(self.mesh, (global_batch_size, seq_len))
        # Each data shard's seed comes from `seed` (`data.shard_seed`).
        make_data = functools.partial(data_lib.seqio_shard_dataset, task=task, seq_len=seq_len)
        self.data = data_lib.ShardedBatches(make_data, global_batch_size, seq_len,
                                            batch_sharding, num_data_shards, seed)
        self.train_step = step_lib.jit_train_step(
            step_lib.make_train_step(self.model, self.tx, schedule, num_microbatches,
                                     on_nonfinite),
            shardings, batch_sharding, self.mesh)
        eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(self.model),
                                           shardings.params, batch_sharding, self.mesh)
        self.evaluate = _Evaluator(eval_step, functools.partial(make_data, split=eval_split,
                                                                shuffle=False),
                                   global_batch_size, seq_len, batch_sharding, eval_steps,
                                   num_data_shards, seed)
        self.writer = metrics_lib.MetricsWriter(model_dir)
        self.ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))

    def restore_or_init(self, init_params_from: Callable[[Mesh], Any] | None = None
                        ) -> tuple[TrainState, int]:
        """The newest readable checkpoint (data position included), else a fresh state
        (with `init_params_from(mesh)`'s parameters, when given)."""
        state = self.ckpt.restore(self.abstract, self.data)
        _vocabulary_record(self.model_dir, self.task, resumed=state is not None)
        if state is None:
            state = state_lib.create_train_state(self.model, self.tx, self.mesh, self.seed)
            if init_params_from is not None:
                state = state.replace(params=jax.device_put(init_params_from(self.mesh),
                                                            self.param_shardings))
        step = int(np.asarray(state.step.addressable_data(0)))
        log.info("model: %s parameters; state %.3f GiB on the fullest device; mesh %s; "
                 "starting at step %d of %d", f"{count_params(self.config):,}",
                 state_lib.bytes_per_device(self.abstract) / 2**30, dict(self.mesh.shape),
                 step, self.num_steps)
        return state, step

    def loop(self, reporter: "_Reporter", preemption: checkpoints.PreemptionSignal,
             eval_every: int, progress_bar: bool,
             init_params_from: Callable[[Mesh], Any] | None = None) -> dict[str, Any]:
        """Steps until `num_steps` or a preemption; saves, evaluates; returns the summary."""
        state, step = self.restore_or_init(init_params_from)
        start = step
        if step >= self.num_steps:
            log.warning("the checkpoint is at step %d, train.num_steps=%d: nothing to train "
                        "(raise num_steps to train on).", step, self.num_steps)
        bar = _progress(progress_bar, self.num_steps, step)
        preempted, eval_metrics = False, {}
        while step < self.num_steps and not preempted:
            state, metrics = self.train_step(state, next(self.data))
            step += 1
            reporter.submit(step, metrics)
            preempted = preemption.reached(step)
            last = preempted or step == self.num_steps
            if last or self.ckpt.due(step):
                reporter.flush()  # Never save a non-finite state.
                self.ckpt.save(step, state, self.data, force=last)
                reporter.timer.restart()  # Time training only.
            if (eval_every and step % eval_every == 0 and step != self.num_steps
                    and not preempted):  # A preemption's grace period is for the save.
                eval_metrics = self.evaluate_and_write(step, state, reporter)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if preempted:
            log.warning("preempted: saved step %d; rerun the same command to resume.", step)
        elif step == start:  # A finished run rerun: its evaluation is written already.
            eval_metrics = self.evaluate(state.params)
        else:
            eval_metrics = self.evaluate_and_write(step, state, reporter)
        return {"step": step, "preempted": preempted, "eval": eval_metrics}

    def evaluate_and_write(self, step: int, state: TrainState,
                           reporter: "_Reporter") -> dict[str, float]:
        eval_metrics = self.evaluate(state.params)
        self.writer.write(step, eval_metrics, prefix="eval/")
        reporter.timer.restart()
        return eval_metrics

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()
        self.data.close()
        self.evaluate.close()


class _Reporter:
    """Looks at each step's metrics: stops on a non-finite loss, writes every `log_every`.

    `submit(step, metrics)` looks at the *previous* step's metrics and holds these:
    reading them one step late keeps a step queued on the devices while the host
    works. `flush()` looks at the held ones now (before a checkpoint is written, so a
    saved state is always finite).
    """

    def __init__(self, writer: metrics_lib.MetricsWriter, ckpt: checkpoints.Checkpointer,
                 num_steps: int, log_every: int, on_nonfinite: str, peak: float | None,
                 flops_per_step: float, tokens_per_step: int):
        self.writer, self.ckpt = writer, ckpt
        self.num_steps, self.log_every, self.on_nonfinite = num_steps, log_every, on_nonfinite
        self.peak, self.flops, self.tokens = peak, flops_per_step, tokens_per_step
        self.timer = metrics_lib.StepTimer()
        self.skipped = 0
        self._held: tuple[int, Mapping[str, jax.Array]] | None = None

    def submit(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self.flush()  # Blocks on the previous step only.
        self._held = (step, metrics)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._look(*held)

    def _look(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        values = _to_host(metrics)
        self.timer.step_done()
        if values.pop("finite") < 1.0:
            if self.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step} (loss={values['loss']}, "
                    f"grad_norm={values['grad_norm']}). Last good checkpoint: "
                    f"{self.ckpt.describe_last_good()}. Resume from it with a lower learning "
                    "rate, or bind train.on_nonfinite='skip' to skip such steps.")
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient; update skipped.", step)
        if step % self.log_every and step != self.num_steps:
            return
        values["perplexity"] = float(np.exp(min(values["cross_entropy"], 50.0)))
        values["skipped_steps"] = float(self.skipped)
        seconds = self.timer.lap()
        if seconds:
            values.update(metrics_lib.throughput(self.flops, self.tokens, seconds, self.peak,
                                                 jax.device_count()))
        self.writer.write(step, values)


class _Evaluator:
    """Token-weighted held-out metrics over the first `num_batches` batches of `make_data`.

    The eval pipeline is built at the first evaluation and restarted for each later one.
    """

    def __init__(self, eval_step, make_data, global_batch_size: int, seq_len: int, sharding,
                 num_batches: int, num_data_shards: int | None, seed: int):
        self._step, self._num_batches = eval_step, num_batches
        self._make = functools.partial(data_lib.ShardedBatches, make_data, global_batch_size,
                                       seq_len, sharding, num_data_shards, seed)
        self._batches: data_lib.ShardedBatches | None = None

    def __call__(self, params: Any) -> dict[str, float]:
        if self._batches is None:
            self._batches = self._make()
        else:
            self._batches.restart()
        total: dict[str, float] = {}
        for _ in range(self._num_batches):  # At least one: train() checks eval_steps.
            for k, v in _to_host(self._step(params, next(self._batches))).items():
                total[k] = total.get(k, 0.0) + v
        n = max(total["weight"], 1.0)
        loss = total["cross_entropy_sum"] / n
        return {"loss": total["loss_sum"] / n, "cross_entropy": loss,
                "perplexity": float(np.exp(min(loss, 50.0))),
                "accuracy": total["accuracy_sum"] / n}

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
