"""The train and eval steps: pure functions of (state, batch), jitted with shardings.

A batch is the packed feature-converter layout (`train/feature_converter.py`), every
feature `[global_batch, length]`. The train step

  1. splits the batch into `num_microbatches` micro-batches and accumulates float32
     gradients over them with `lax.scan` (one optimizer update per global batch; the
     activations of only one micro-batch are alive at a time);
  2. weights each micro-batch's mean loss by its share of the batch's loss weights,
     so the accumulated gradient is exactly the gradient of the whole batch's
     token-mean loss, whatever the split;
  3. applies the optimizer, unless the loss or the gradient norm is not finite and
     `on_nonfinite="skip"`, in which case the state is kept (the step still counts).

Micro-batch `m` takes rows `m, m + M, m + 2M, ...`: every device's block of rows
holds rows of every micro-batch, so splitting moves no data between devices.

`loss_weighting.per = "example"` (gin) first gives each packed example the same share of
the batch's loss weight (`per_example_weights`), for SFT mixtures whose outputs differ
in length by 30x; the default weighs every token the same, as pretraining does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import loss as loss_lib
from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
NONFINITE_POLICIES = ("stop", "skip")
BATCH_AXES = ("batch", "length")
# Per-token means, summed over micro-batches. Token accuracy is left to the eval step:
# its argmax over the vocabulary cost ~4% of a CPU train step, and unused it is compiled out.
_SUMMED = ("cross_entropy", "z_loss")


def _weights(batch: Batch) -> jax.Array:
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] != 0).astype(jnp.float32)


@gin.configurable
def loss_weighting(per: str = "token") -> str:
    """How the training loss averages over a batch: "token" (every target token weighs
    the same: the paper's, and the reported losses' everywhere) or "example" (each packed
    example weighs the same in total, shared by its tokens: a two-token VQA answer counts
    as much as a 64-code image)."""
    if per not in ("token", "example"):
        raise UserInputError(f"loss_weighting.per={per!r}; use 'token' or 'example'.")
    return per


def per_example_weights(weights: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """`[B, L]` token weights -> the same total, every example (a row's segment with any
    weight; the whole row without segment ids) an equal share of it, spread over its
    tokens in proportion to their weights."""
    if segment_ids is None:
        segment_ids = jnp.ones(weights.shape, jnp.int32)
    length = weights.shape[1]
    sums = jax.vmap(lambda w, s: jax.ops.segment_sum(w, s, num_segments=length))(
        weights, segment_ids)
    own = jnp.take_along_axis(sums, segment_ids, axis=1)
    examples = jnp.sum((sums > 0).astype(jnp.float32))
    share = jnp.sum(weights) / jnp.maximum(examples, 1.0)
    return jnp.where(own > 0, weights * share / jnp.where(own > 0, own, 1.0), 0.0)


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """`[B, L]` features -> `[M, B/M, L]`, micro-batch m holding rows m, m+M, ... ."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"the global batch ({x.shape[0]} rows) does not split into "
                             f"num_microbatches={num_microbatches}; pick a divisor.")
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(v) for k, v in batch.items()}


def make_train_step(model: Decoder, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, num_microbatches: int = 1,
                    on_nonfinite: str = "stop", z_loss: float | None = None,
                    loss_per: str | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`(state, batch) -> (state, metrics)` (not jitted; see `jit_train_step`).

    Args:
        model: the decoder.
        tx: the optimizer (`optimizer.make_optimizer`).
        schedule: reported as `learning_rate` in the metrics; optional.
        num_microbatches: gradient accumulation steps per update (divides the batch).
        on_nonfinite: "stop" (the caller raises: metrics carry `finite`) or "skip"
            (keep the old params and optimizer state for this step).
        z_loss: coefficient of the z-loss; None takes the gin binding of
            `cross_entropy_loss.z_loss`.
        loss_per: "token" or "example" (see `loss_weighting`); None takes its gin binding.
    Metrics (scalars): loss, cross_entropy, z_loss (means under the step's weights:
    per token, or per example with `loss_per="example"`),
    loss_weight (tokens that carry loss), grad_norm (before clipping), param_norm,
    learning_rate, finite (1.0 or 0.0).
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise UserInputError(f"on_nonfinite={on_nonfinite!r}; choose one of {NONFINITE_POLICIES}.")
    if num_microbatches < 1:
        raise UserInputError(f"num_microbatches must be >= 1, got {num_microbatches}.")
    per_example = (loss_weighting() if loss_per is None else loss_weighting(loss_per)
                   ) == "example"

    def loss_fn(params, micro: Batch, total_weight: jax.Array):
        loss, metrics = loss_lib.decoder_loss(model, params, micro, z_loss=z_loss,
                                              accuracy=False)
        # decoder_loss divides by max(weight_sum, 1); undo it and divide by the
        # whole batch's weight instead, so micro-batch gradients add up exactly.
        share = jnp.maximum(metrics["weight_sum"], 1.0) / jnp.maximum(total_weight, 1.0)
        sums = {k: metrics[k] * share for k in _SUMMED}
        return loss * share, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if per_example:
            batch = {**batch, "decoder_loss_weights": per_example_weights(
                _weights(batch), batch.get("decoder_segment_ids"))}
        total_weight = jnp.sum(_weights(batch))
        if num_microbatches == 1:
            (loss, sums), grads = grad_fn(state.params, batch, total_weight)
        else:
            def body(carry, micro):
                micro = {k: partitioning.with_logical_constraint(v, BATCH_AXES[:v.ndim])
                         for k, v in micro.items()}
                (l, s), g = grad_fn(state.params, micro, total_weight)
                acc_g, acc_l, acc_s = carry
                acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
                return (acc_g, acc_l + l, jax.tree.map(jnp.add, acc_s, s)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zero_sums = {k: jnp.zeros([], jnp.float32) for k in _SUMMED}
            (grads, loss, sums), _ = jax.lax.scan(
                body, (zeros, jnp.zeros([], jnp.float32), zero_sums),
                split_microbatches(batch, num_microbatches))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if on_nonfinite == "skip":
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": loss, **sums, "loss_weight": total_weight, "grad_norm": grad_norm,
                   "param_norm": optax.global_norm(params),
                   "finite": finite.astype(jnp.float32)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(model: Decoder, z_loss: float | None = None
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`(params, batch) -> {"loss_sum", "cross_entropy_sum", "accuracy_sum", "weight"}`.

    Sums, not means, so batches (and hosts) combine exactly: loss = loss_sum / weight.
    """
    def step(params, batch: Batch) -> dict[str, jax.Array]:
        loss, metrics = loss_lib.decoder_loss(model, params, batch, z_loss=z_loss)
        n = jnp.maximum(metrics["weight_sum"], 1.0)
        return {"loss_sum": loss * n, "cross_entropy_sum": metrics["cross_entropy"] * n,
                "accuracy_sum": metrics["accuracy"] * n, "weight": metrics["weight_sum"]}
    return step


def check_batch(mesh: Mesh, global_batch_size: int, num_microbatches: int,
                rules=None) -> None:
    """Refuses a batch that does not split into micro-batches, or whose micro-batch rows do
    not split over the mesh axes the `batch` rule names: `logical_to_mesh_axes` would drop
    those axes, so every device would compute the whole batch (no data parallelism)."""
    if num_microbatches < 1 or global_batch_size % num_microbatches:
        raise UserInputError(f"train.global_batch_size={global_batch_size} does not split into "
                             f"train.num_microbatches={num_microbatches}; pick a divisor.")
    names = nn.logical_to_mesh_axes(("batch",), rules or partitioning.axis_rules())[0]
    axes = (names,) if isinstance(names, str) else tuple(a for a in names or () if a)
    ways = math.prod(dict(mesh.shape).get(a, 1) for a in axes)
    rows = global_batch_size // num_microbatches
    if rows % ways:
        raise UserInputError(
            f"train.global_batch_size={global_batch_size} / num_microbatches="
            f"{num_microbatches} = {rows} rows per micro-batch do not split over the {ways} "
            f"devices of the mesh axes {axes}: every device would compute all of them; make "
            f"the rows a multiple of {ways} (or change make_mesh).")


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], rules=None) -> NamedSharding:
    """Where a batch lives: rows split by the `batch` rule, the rest whole.

    A `[batch, length]` feature names its axes `BATCH_AXES`; any other rank (e.g. the
    tokenizer's images `[batch, h, w, 3]`) names only its first.
    """
    names = BATCH_AXES if len(shape) == 2 else ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, partitioning.logical_to_mesh_axes(names, rules, shape, mesh))


def jit_train_step(step_fn: Callable, state_shardings: TrainState, batch_sharding: NamedSharding,
                   mesh: Mesh) -> Callable:
    """`jax.jit` with in/out shardings and the state donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn: Callable, param_shardings: Any, batch_sharding: NamedSharding,
                  mesh: Mesh) -> Callable:
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=replicated)
