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
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

DECAYS = ("cosine", "linear", "constant")
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


@gin.configurable(denylist=["schedule"])
def make_optimizer(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float = 1.0,
                   moments_dtype: str | None = None) -> optax.GradientTransformation:
    """The decoder's optimizer: `adamw` with gin-bound settings."""
    return adamw(schedule, b1, b2, eps, weight_decay, clip_norm, moments_dtype)


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
