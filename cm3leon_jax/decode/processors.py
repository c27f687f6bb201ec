"""Logits processors: the small pieces the sampler chains, each `(scores, state) -> scores`.

    processors = (ImageCodesOnly(layout),            # what may come next (both streams)
                  ClassifierFreeGuidance(3.0),       # [2, b, V] -> [b, V]
                  Temperature(1.0), TopP(0.9))       # reshape the one remaining stream

`scores` are float32[streams, batch, vocab] until a guidance processor merges the
conditional (stream 0) and unconditional (stream 1) rows into float32[batch, vocab];
every other processor works on the trailing axes, so it fits either side of guidance.
A token is excluded by a score of -inf. Processors are pytrees (`flax.struct`): their
numbers (temperature, top-p, guidance scale, alpha) are traced arguments of the compiled
loop, so sweeping a CFG scale reuses one compilation; what changes shapes (k, the id
layout, stop ids) is static, and a new value of it compiles again.

Constraints come first, before guidance: then both streams share the allowed set and
CD-K's threshold is taken among tokens that may actually follow. A constraint also says
when a row is finished (`stop`), so the same object keeps an image at exactly
`image_length` codes and ends it there.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from cm3leon_jax.errors import check_count
from cm3leon_jax.model import cpu_kernels
from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.layout import IdLayout

NEG_INF = -jnp.inf


class DecodeState(NamedTuple):
    """What a processor may look at when choosing the token at `step`.

    step: int32[], tokens generated so far by every unfinished row (all rows start
        together after the prompt).
    tokens: int32[batch, max_new_tokens], generated so far; `<pad>` after a row stops.
    done: bool[batch], rows that have stopped.
    """

    step: jax.Array
    tokens: jax.Array
    done: jax.Array


def _vocab_ids(scores: jax.Array) -> jax.Array:
    return jnp.arange(scores.shape[-1], dtype=jnp.int32)


def _given(x) -> bool:
    """Whether `x` is a Python number to validate (not a tracer inside the compiled loop)."""
    return isinstance(x, numbers.Real)


def _static():
    """A field that is part of the compiled program (a shape, a layout), not an input."""
    return flax.struct.field(pytree_node=False)


# -- reshaping one distribution ---------------------------------------------------------

@flax.struct.dataclass
class Temperature:
    """Divides the scores by `value` (> 0); greedy decoding is the sampler's `greedy=True`."""

    value: float

    def __post_init__(self):
        if _given(self.value) and not self.value > 0:
            raise ValueError(f"Temperature must be > 0, got {self.value}; use greedy "
                             "decoding for the zero-temperature limit.")

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        return scores / self.value


@flax.struct.dataclass
class TopK:
    """Keeps the `k` highest scores per row (ties with the k-th are kept too)."""

    k: int = _static()

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"TopK.k must be >= 1, got {self.k}; leave TopK out to keep all.")

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        k = min(self.k, scores.shape[-1])
        kth = jax.lax.top_k(scores, k)[0][..., -1:]
        return jnp.where(scores >= kth, scores, NEG_INF)


@flax.struct.dataclass
class TopP:
    """Nucleus: keeps the smallest set of most likely tokens whose probability is >= p.

    That is: a token is kept iff the tokens scored strictly above it hold less than `p`
    of the probability (so the most likely token always is, and ties with the last kept
    token are kept too). The kept set is every score at or above a threshold, found by
    `nucleus_threshold`'s bisection: no sort of the vocabulary each step.

    `cpu_kernel`: find the threshold with the C++ kernel (`model/cpu_kernels.py`; CPU, one
    device), the same bisection in one call; what `Generator(cpu_kernels=True)` uses.
    """

    p: float
    cpu_kernel: bool = flax.struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if _given(self.p) and not 0 < self.p <= 1:
            raise ValueError(f"TopP.p must be in (0, 1], got {self.p}.")

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        # p = 1 keeps every token. The bisection alone would not: a token whose
        # probability is below float32's resolution of 1 has a mass above it that sums to 1.
        if _given(self.p) and self.p >= 1:
            return scores
        keys = _order_keys(scores)
        threshold = cpu_kernels.nucleus_threshold if self.cpu_kernel else nucleus_threshold
        kept = keys >= threshold(keys, jax.nn.softmax(scores, axis=-1), self.p)
        if not _given(self.p):
            kept |= jnp.asarray(self.p) >= 1
        return jnp.where(kept, scores, NEG_INF)


def _order_keys(scores: jax.Array) -> jax.Array:
    """float32[..., V] -> int32[..., V] in the same order (-0.0 taken as 0.0, -inf lowest):
    the float's bits, with the magnitude bits of negatives flipped."""
    bits = jax.lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores).astype(jnp.float32),
                                        jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def nucleus_threshold(keys: jax.Array, probs: jax.Array, p) -> jax.Array:
    """int32[..., 1]: the smallest key k with `probs` of keys above k summing to < p.

    Keeping `keys >= k` is top-p's set. Why bisection: the mass above k only falls as k
    grows, so 32 halvings of the int32 key range find k exactly, each one masked sum over
    the row; on XLA:CPU that costs a fraction of sorting the vocabulary, which took
    most of a small model's step (benchmarks/RESULTS_decode.md).
    """
    def mass_above(k):
        return jnp.sum(jnp.where(keys > k, probs, 0.0), axis=-1, keepdims=True)

    # Invariant: the mass above `lo` is >= p (lo is below the set), above `hi` < p.
    lo = keys.min(axis=-1, keepdims=True) - 1
    hi = keys.max(axis=-1, keepdims=True)  # Nothing is above the best token.

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow.
        inside = mass_above(mid) < p
        return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


# -- guidance: two streams in, one out ----------------------------------------------------

def _check_finite(name: str, value: float) -> None:
    """A guidance scale that is NaN or inf turns every score to NaN: no token allowed."""
    if _given(value) and not math.isfinite(value):
        raise ValueError(f"{name}={value}: a guidance scale must be a finite number.")


@flax.struct.dataclass
class ClassifierFreeGuidance:
    """`uncond + scale * (cond - uncond)` over [cond, uncond] streams (paper: scale 3-5).

    Written `scale * cond + (1 - scale) * uncond`, which is the same number but exact at
    scale 1 (the conditional stream) and 0 (the unconditional one).
    """

    scale: float

    def __post_init__(self):
        _check_finite("ClassifierFreeGuidance.scale", self.scale)

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        cond, uncond = _two_streams(scores, "ClassifierFreeGuidance")
        mixed = self.scale * cond + (1.0 - self.scale) * uncond
        return jnp.where(jnp.isfinite(cond) & jnp.isfinite(uncond), mixed, NEG_INF)


@flax.struct.dataclass
class ContrastiveDecoding:
    """CD-K: `log p_cond - log p_uncond` over {t : p_cond(t) >= alpha * kth_largest(p_cond)}.

    Tokens outside that set get -inf. The paper leaves alpha and k open; alpha 0.5 is the
    usual choice, k = 1 compares with the most likely token.
    """

    alpha: float = 0.5
    k: int = flax.struct.field(pytree_node=False, default=1)

    def __post_init__(self):
        if (_given(self.alpha) and not 0 <= self.alpha <= 1) or self.k < 1:
            raise ValueError(f"ContrastiveDecoding needs 0 <= alpha <= 1 and k >= 1; got "
                             f"alpha={self.alpha}, k={self.k}.")

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        cond, uncond = _two_streams(scores, "ContrastiveDecoding")
        log_cond = jax.nn.log_softmax(cond, axis=-1)
        log_uncond = jax.nn.log_softmax(uncond, axis=-1)
        kth = jax.lax.top_k(log_cond, min(self.k, cond.shape[-1]))[0][..., -1:]
        keep = (log_cond >= jnp.log(self.alpha) + kth) & jnp.isfinite(log_cond)
        return jnp.where(keep, log_cond - log_uncond, NEG_INF)


def _two_streams(scores: jax.Array, who: str) -> tuple[jax.Array, jax.Array]:
    if scores.ndim != 3 or scores.shape[0] != 2:
        raise ValueError(f"{who} needs scores float32[2, batch, vocab] (conditional and "
                         f"unconditional streams), got shape {scores.shape}; sample with "
                         "num_streams=2 and put guidance once, after the constraints.")
    return scores[0], scores[1]


# -- modality constraints: what may follow the prompt, and when a row ends -----------------

@flax.struct.dataclass
class ImageCodesOnly:
    """Text -> image: after the prompt's `<break>`, exactly `image_length` image codes."""

    # Its rows are right only at their full length (`sampler.sample` refuses a shorter buffer).
    exact_length: ClassVar[bool] = True
    layout: IdLayout = _static()

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        ids = _vocab_ids(scores)
        image = (ids >= self.layout.image_start) & (ids < self.layout.used_size)
        return jnp.where(image, scores, NEG_INF)

    def stop(self, token: jax.Array, state: DecodeState) -> jax.Array:
        """bool[batch]: the row has just written its last code."""
        return jnp.broadcast_to(state.step + 1 >= self.layout.image_length, token.shape)

    @property
    def max_new_tokens(self) -> int:
        return self.layout.image_length


@flax.struct.dataclass
class TextOnly:
    """Image -> text: text pieces, then one of `stop_ids`, at most `max_tokens` in all.

    The first token must be text, so the result is never an empty (undecodable) segment.
    `stop_ids`: `<eos>`/`<break>` after an `image <break>` prompt, `<eoss>` for a CM3
    infill (`<sentinel:0> <break> image <sentinel:0>`).
    """

    layout: IdLayout = _static()
    max_tokens: int = flax.struct.field(pytree_node=False, default=32)
    stop_ids: tuple[int, ...] = flax.struct.field(
        pytree_node=False, default=(layout_lib.EOS_ID, layout_lib.BREAK_ID))

    def __post_init__(self):
        check_count("max_tokens", self.max_tokens)

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        ids = _vocab_ids(scores)
        text = (ids >= self.layout.text_start) & (ids < self.layout.image_start)
        ends = jnp.isin(ids, jnp.asarray(self.stop_ids, jnp.int32)) & (state.step >= 1)
        return jnp.where(text | ends, scores, NEG_INF)

    def stop(self, token: jax.Array, state: DecodeState) -> jax.Array:
        ended = jnp.isin(token, jnp.asarray(self.stop_ids, jnp.int32))
        return ended | (state.step + 1 >= self.max_tokens)

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens


@flax.struct.dataclass
class StopOnTokens:
    """A stop rule for unconstrained sampling: a row ends when it writes one of `ids`."""

    ids: tuple[int, ...] = flax.struct.field(pytree_node=False, default=(layout_lib.EOS_ID,))

    def stop(self, token: jax.Array, state: DecodeState) -> jax.Array:
        return jnp.isin(token, jnp.asarray(self.ids, jnp.int32))


# -- two-scale guidance for instruction editing (SFT; owned by the sft engineer) ----------

@flax.struct.dataclass
class TwoScaleGuidance:
    """InstructPix2Pix-style guidance over three streams [full, image only, neither]:

        neither + image_scale * (image - neither) + text_scale * (full - image)

    `full` sees the source image and the instruction, `image` the image with the
    instruction masked, `neither` both masked (paper: image 1.5, text 7.5). Text to image
    with negative captions merges [prompt, negative, unconditional] the same way
    (`SamplingConfig.negative_scale`). Written as
    `text_scale * full + (image_scale - text_scale) * image + (1 - image_scale) * neither`,
    the same number, exact at (1, 1) (the full stream).
    """

    image_scale: float = 1.5
    text_scale: float = 7.5

    def __post_init__(self):
        _check_finite("TwoScaleGuidance.image_scale", self.image_scale)
        _check_finite("TwoScaleGuidance.text_scale", self.text_scale)

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        if scores.ndim != 3 or scores.shape[0] != 3:
            raise ValueError(f"TwoScaleGuidance needs scores float32[3, batch, vocab] (full, "
                             f"image-only and unconditional streams), got shape "
                             f"{scores.shape}; sample with num_streams=3.")
        full, image, neither = scores[0], scores[1], scores[2]
        mixed = (self.text_scale * full + (self.image_scale - self.text_scale) * image
                 + (1.0 - self.image_scale) * neither)
        finite = jnp.isfinite(full) & jnp.isfinite(image) & jnp.isfinite(neither)
        return jnp.where(finite, mixed, NEG_INF)


@flax.struct.dataclass
class ImageSpan:
    """Image infilling: exactly `length` image codes, then the row ends (the codes of a
    masked span of an image, written after its `<sentinel:i>`)."""

    exact_length: ClassVar[bool] = True
    layout: IdLayout = _static()
    length: int = flax.struct.field(pytree_node=False, default=1)

    def __post_init__(self):
        check_count("ImageSpan.length", self.length)

    def __call__(self, scores: jax.Array, state: DecodeState) -> jax.Array:
        ids = _vocab_ids(scores)
        image = (ids >= self.layout.image_start) & (ids < self.layout.used_size)
        return jnp.where(image, scores, NEG_INF)

    def stop(self, token: jax.Array, state: DecodeState) -> jax.Array:
        return jnp.broadcast_to(state.step + 1 >= self.length, token.shape)

    @property
    def max_new_tokens(self) -> int:
        return self.length
