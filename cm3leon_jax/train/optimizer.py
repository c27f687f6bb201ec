"""The optimizer: AdamW behind global-norm clipping, with warm-up then decay.

One builder for the three trainers (decoder, VQGAN `vocab/vqgan_train.py`, CLIP
`retrieval/clip_train.py`): `warmup_then_decay` and `adamw` are plain functions
each trainer calls with its own settings; `learning_rate_schedule` and
`make_optimizer` are their gin-configurable forms for the decoder's trainer (so a
decoder binding never leaks into the other two).

CM3Leon states only warm-up (1500 steps) and the per-size peak learning rates; the
rest follows its successor (Chameleon): AdamW with beta1 0.9, beta2 0.95, weight
decay 0.1, gradient clipping at global norm 1.0. Every knob is a gin binding::

    learning_rate_schedule.peak_lr = 6e-4          # gin_configs/train/<size>.gin
    learning_rate_schedule.warmup_steps = 1500
    learning_rate_schedule.decay = 'cosine'        # or 'linear', 'constant'
    make_optimizer.eps = 1e-5

Weight decay is decoupled (`p -= lr * wd * p`, as PyTorch's AdamW) and skips norm
scales and biases (`decay_mask`): decaying a LayerNorm gain towards 0 only fights
the normalization. CM3Leon's decoder has neither, so there it touches every weight.

Not the paper's, for small decoders trained for few steps: `make_optimizer.kind =
'muon'` steps each layer's projection matrices by Muon (momentum orthogonalized by a
Newton-Schulz iteration, `optax.contrib.scale_by_muon`; Jordan et al. 2024, Liu et al.
2025) and everything else (embeddings, the output head, norms) by the AdamW above. The
matrices are found from the parameters' logical axes (`muon_dimensions`), and each
update is scaled to AdamW's typical size (`update_rms`), so AdamW's learning rate
carries over.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
_NO_DECAY_NAMES = ("scale", "bias")


@gin.configurable
def learning_rate_schedule(peak_lr: float = gin.REQUIRED, warmup_steps: int = 1500,
                           decay: str = "cosine", decay_steps: int | None = None,
                           final_lr_fraction: float = 0.1,
                           total_steps: int | None = None) -> optax.Schedule:
    """The decoder's schedule: `warmup_then_decay` with gin-bound settings."""
    return warmup_then_decay(peak_lr, warmup_steps, decay, decay_steps, final_lr_fraction,
                             total_steps)


def warmup_then_decay(peak_lr: float, warmup_steps: int, decay: str = "cosine",
                      decay_steps: int | None = None, final_lr_fraction: float = 0.1,
                      total_steps: int | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_lr`, then `decay` down to `final_lr_fraction * peak_lr`.

    Args:
        peak_lr: the learning rate at the end of warm-up (paper: 6e-4 / 5e-4 / 1.2e-4
            for 350M / 760M / 7B).
        warmup_steps: length of the linear warm-up (paper: 1500).
        decay: "cosine", "linear" or "constant" (hold the peak after warm-up).
        decay_steps: the step at which the decay reaches its floor; None: `total_steps`
            (the trainer passes its `num_steps`). Bind it explicitly to keep the schedule
            fixed while a run's length changes (e.g. a run continued in pieces).
        final_lr_fraction: the floor, as a fraction of the peak.
        total_steps: filled in by the trainer; not a user setting.
    Returns:
        step -> learning rate, an optax schedule (jit-safe).
    """
    if decay not in DECAYS:
        raise ValueError(f"learning_rate_schedule.decay={decay!r}; choose one of {DECAYS}.")
    if peak_lr <= 0 or warmup_steps < 0 or not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(f"learning_rate_schedule: need peak_lr > 0, warmup_steps >= 0 and "
                         f"0 <= final_lr_fraction <= 1; got {peak_lr}, {warmup_steps}, "
                         f"{final_lr_fraction}.")
    end = decay_steps if decay_steps is not None else total_steps
    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    if decay == "constant":
        after = optax.constant_schedule(peak_lr)
    else:
        if end is None:
            raise ValueError("learning_rate_schedule: bind decay_steps (or run it from the "
                             "trainer, which passes its num_steps).")
        length = max(end - warmup_steps, 1)
        floor = peak_lr * final_lr_fraction
        after = (optax.cosine_decay_schedule(peak_lr, length, alpha=final_lr_fraction)
                 if decay == "cosine" else optax.linear_schedule(peak_lr, floor, length))
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for every parameter that gets weight decay: all but norm scales and biases."""
    def keep(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name not in _NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(keep, params)


@gin.configurable(denylist=["schedule", "param_axes"])
def make_optimizer(schedule: optax.Schedule, kind: str = "adamw", b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, moments_dtype: str | None = None,
                   param_axes: Any = None, muon_momentum: float = 0.95,
                   muon_ns_steps: int = 5, muon_update_rms: float = 0.2
                   ) -> optax.GradientTransformation:
    """The decoder's optimizer with gin-bound settings: `adamw`, or `muon` (`kind`).

    Args:
        schedule: step -> learning rate.
        kind: "adamw" (the paper-size configs', with the successor's settings: CM3Leon's
            paper does not state its optimizer) or "muon" (Muon on the layers' projection
            matrices, this AdamW on the rest).
        b1, b2, eps, weight_decay, clip_norm, moments_dtype: see `adamw` (with "muon",
            they are its AdamW part's, and weight decay and clipping apply to all).
        param_axes: the parameters' logical axes (`partitioning.logical_axes`), which
            "muon" needs to find the matrices; the trainer passes them.
        muon_momentum, muon_ns_steps, muon_update_rms: see `muon`.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"make_optimizer.kind={kind!r}; choose one of {OPTIMIZERS}.")
    if kind == "adamw":
        return adamw(schedule, b1, b2, eps, weight_decay, clip_norm, moments_dtype)
    if param_axes is None:
        raise ValueError("make_optimizer.kind='muon' needs the parameters' logical axes "
                         "(param_axes) to find the matrices it orthogonalizes.")
    return muon(schedule, param_axes, muon_momentum, muon_ns_steps, muon_update_rms, b1, b2,
                eps, weight_decay, clip_norm, moments_dtype)


def muon_dimensions(param_axes: Any) -> Any:
    """For each parameter, how Muon reads it as a matrix, or None (AdamW's instead).

    A matrix is a projection kernel (a leaf named "kernel") of `embed` to other axes or
    back: its input axes are the matrix's rows and its output axes its columns (`[embed,
    heads, kv]` -> embed by heads * kv; `[heads, kv, embed]` -> heads * kv by embed);
    a stacked `layers` axis is a batch of matrices, each orthogonalized alone. Kernels
    of the vocabulary (an untied output head) stay with AdamW, as embeddings do.

    Args:
        param_axes: a tree of logical `PartitionSpec`s, as the parameters.
    Returns:
        The same tree with `optax.contrib.MuonDimensionNumbers` or None leaves.
    """
    def dims(path, spec):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        axes = tuple(spec)
        if name != "kernel" or "vocab" in axes or "embed" not in axes:
            return None
        own = [i for i, a in enumerate(axes) if a != "layers"]
        if len(own) < 2 or axes.count("embed") != 1:
            return None
        at = axes.index("embed")
        if at == own[0]:
            return optax.contrib.MuonDimensionNumbers(reduction_axis=at,
                                                      output_axis=tuple(own[1:]))
        if at == own[-1]:
            return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(own[:-1]),
                                                      output_axis=at)
        return None
    return jax.tree_util.tree_map_with_path(
        dims, param_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def muon(schedule: optax.Schedule, param_axes: Any, momentum: float = 0.95,
         ns_steps: int = 5, update_rms: float = 0.2, b1: float = 0.9, b2: float = 0.95,
         eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float | None = 1.0,
         moments_dtype: str | None = None) -> optax.GradientTransformation:
    """`clip_by_global_norm(clip_norm)`, then Muon on the matrices and `adamw` on the rest.

    Muon keeps a momentum of each matrix's gradient, orthogonalizes it (`ns_steps`
    Newton-Schulz iterations: every singular value near 1) and steps along it, scaled to
    `update_rms` times `sqrt(max(fan_in, fan_out))`, so that its root mean square is
    `update_rms` whatever the matrix's shape.

    Args:
        schedule: step -> learning rate, for both parts.
        param_axes: the parameters' logical axes (`muon_dimensions` finds the matrices).
        momentum: Muon's (Nesterov) momentum.
        ns_steps: Newton-Schulz iterations.
        update_rms: the root mean square of a matrix's update before the learning rate
            (0.2, about AdamW's, lets one learning rate serve both parts).
        b1, b2, eps, moments_dtype: the AdamW part's (`moments_dtype` also Muon's momentum).
        weight_decay: decoupled, on both parts, skipping norm scales and biases.
        clip_norm: the global gradient norm is clipped to this first; 0 or None: no clipping.
    """
    return muon_on(schedule, muon_dimensions(param_axes), momentum, ns_steps, update_rms, b1,
                   b2, eps, weight_decay, clip_norm, moments_dtype)


def muon_on(schedule: optax.Schedule, dims: Any, momentum: float = 0.95, ns_steps: int = 5,
            update_rms: float = 0.2, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
            weight_decay: float = 0.1, clip_norm: float | None = 1.0,
            moments_dtype: str | None = None) -> optax.GradientTransformation:
    """`muon` with the matrices named directly: `dims` is the parameters' tree with an
    `optax.contrib.MuonDimensionNumbers` for each parameter Muon steps and None for the
    rest (AdamW's); for models without logical axes, such as the image tokenizer."""
    if not 0.0 <= momentum < 1.0 or ns_steps < 1 or update_rms <= 0:
        raise ValueError(f"muon: need 0 <= momentum < 1, ns_steps >= 1 and update_rms > 0; "
                         f"got {momentum}, {ns_steps}, {update_rms}.")
    is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
    if all(d is None for d in jax.tree.leaves(dims, is_leaf=is_dims)):
        raise ValueError("muon: no parameter is a matrix for Muon (for the decoder: a "
                         "'kernel' from or to 'embed'); use AdamW (make_optimizer.kind='adamw').")
    labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims, is_leaf=is_dims)
    # Inside `partition` the Muon part sees only its own leaves (the rest are MaskedNode).
    masked = jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims,
                          is_leaf=is_dims)
    mu_dtype = None if moments_dtype is None else jnp.dtype(moments_dtype)
    matrices = optax.chain(
        optax.contrib.scale_by_muon(ns_steps=ns_steps, beta=momentum, mu_dtype=mu_dtype,
                                    nesterov=True, weight_dimension_numbers=masked),
        _scale_to_rms(masked, update_rms),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(schedule))
    rest = adamw(schedule, b1, b2, eps, weight_decay, None, moments_dtype)
    tx = optax.partition({"muon": matrices, "adamw": rest}, labels)
    if not clip_norm:
        return tx
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def _scale_to_rms(dims: Any, rms: float) -> optax.GradientTransformation:
    """Scales each orthogonalized update by `rms * sqrt(max(fan_in, fan_out))`."""
    def scale(update, d):
        axes = lambda a: (a,) if isinstance(a, int) else tuple(a)  # noqa: E731
        fan_in = np.prod([update.shape[i] for i in axes(d.reduction_axis)])
        fan_out = np.prod([update.shape[i] for i in axes(d.output_axis)])
        return update * (rms * float(np.sqrt(max(fan_in, fan_out))))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates, dims,
                            is_leaf=lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)
                            ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def adamw(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: float | None = 1.0,
          moments_dtype: str | None = None,
          mask: Callable[[Any], Any] | None = decay_mask) -> optax.GradientTransformation:
    """`clip_by_global_norm(clip_norm)` then AdamW(schedule, b1, b2, eps, weight_decay).

    Args:
        schedule: step -> learning rate (`warmup_then_decay`).
        b1, b2, eps: Adam's (successor: 0.9, 0.95, 1e-5).
        weight_decay: decoupled, multiplied by the learning rate; 0 turns it off.
        clip_norm: the global gradient norm is clipped to this; 0 or None: no clipping.
        moments_dtype: dtype of the first moment ("bfloat16" halves its memory on a
            big model); None keeps the parameters' dtype.
        mask: params -> a tree of bools, True where weight decay applies; None: everywhere.
    """
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0 or eps <= 0:
        raise ValueError(f"adamw: need 0 <= b1, b2 < 1 and eps > 0; got b1={b1}, "
                         f"b2={b2}, eps={eps}.")
    mu_dtype = None if moments_dtype is None else jnp.dtype(moments_dtype)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=mask, mu_dtype=mu_dtype)
    if not clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
