"""The sampling loop: prefill the prompts into the KV cache, then one token per step.

    prompts = left_pad([ids_1, ids_2, ...])                  # int32[batch, P], <pad> = 0
    out = sample(DecoderStep(config), params, prompts, jax.random.key(0), max_new_tokens=64,
                 processors=(ImageCodesOnly(layout), TopP(0.9)), stop=ImageCodesOnly(layout))
    out.tokens   # int32[batch, 64], <pad> after a row's stop
    out.lengths  # int32[batch], tokens each row wrote (its stop token included)

The model is a `tokens_to_logits`-style object (as in t5x's `temperature_sample`):
`model.init_cache(rows, length) -> cache` and
`model(params, cache, tokens, segment_ids, positions) -> (float32[rows, vocab], cache)`,
the logits at each row's last given token. Optional hooks: `model.prepare(params)`, run
once inside the compiled function before the prefill (the weights' decode layout), and
`model.check(prompts, max_new_tokens)` to refuse prompts. `model/decode_step.py`'s
`DecoderStep` is the decoder's; a test stub with a known next token, a sharded model or
an imported one plug in the same way. A `DecoderConfig` is accepted too and means
`DecoderStep(config)`.

Everything from the prefill to the last step is one jit-compiled function with fixed
shapes: the cache holds `P + max_new_tokens` slots, the loop is a `lax.while_loop` that
ends when every row has stopped (or after `max_new_tokens`). Prompts of different
lengths are left-padded with `<pad>` (segment id 0, which no real token attends to), so
every row writes its new tokens into the same cache slot, and each row's positions
restart at 0 on its first real token: a row gives the same result alone or in a batch.

Guidance streams (CFG, CD-K) are more rows of the same batch: `prompts` holds
`num_streams` blocks of `batch` rows (block 0 conditional, block 1 unconditional),
run in one forward pass; the token chosen for row i is fed to row i of every block.

Rows with the same prompt share its prefill: best-of-N draws N rows of each prompt, and
every row of a guidance stream that masks the query reads the same few tokens. With a
model that has `select_rows(cache, rows) -> cache` (`DecoderStep` has), the prefill runs
on the distinct prompts only (their number rounded up to a power of two, and to a
multiple of the mesh's devices, so few shapes compile) and each row's cache and logits
are gathered from its prompt's. 8 samples of a caption with CFG prefill 2 rows instead
of 16 (benchmarks/decode.py --parts=shared).

Randomness: row i draws its token at step t from `fold_in(fold_in(key, row_ids[i]), t)`,
so a row's sample depends on the key and its id only, not on the batch around it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.decode.processors import DecodeState
from cm3leon_jax.errors import UserInputError, check_count
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decode_step import DecoderStep
from cm3leon_jax.vocab.layout import PAD_ID


class Samples(NamedTuple):
    """tokens: int32[batch, max_new_tokens] (`<pad>` after a row's stop); lengths:
    int32[batch] tokens written, stop token included; finished: bool[batch], whether
    the row's stop rule ended it (False: it ran out of `max_new_tokens`)."""

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array


def left_pad(rows: Sequence[Sequence[int]], length: int | None = None,
             multiple: int = 1) -> np.ndarray:
    """Prompts of any lengths -> int32[n, P], right-aligned after `<pad>`s.

    P is `length`, or the longest prompt rounded up to `multiple` (fewer distinct
    shapes, fewer compilations).
    """
    rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
    for i, r in enumerate(rows):
        if r.size == 0 or (r == PAD_ID).any():
            raise ValueError(f"prompt {i} is empty or holds <pad> (id {PAD_ID}); every "
                             "prompt needs at least one real token and no padding.")
    longest = max((r.size for r in rows), default=1)
    width = length if length is not None else -(-longest // multiple) * multiple
    if width < longest:
        raise ValueError(f"left_pad: a prompt has {longest} tokens, more than length={width}.")
    out = np.full((len(rows), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        out[i, width - r.size:] = r
    return out


def sample(model: Any, params: Any, prompts, key: jax.Array, *,
           max_new_tokens: int, processors: Sequence[Any] = (), stop: Any = None,
           greedy: bool = False, num_streams: int = 1, row_ids=None,
           share_prefill: bool = True) -> Samples:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      model, params: a `tokens_to_logits` model (see the module docstring; a
        `DecoderConfig` means `DecoderStep(config)`) and its parameters.
      prompts: int32[num_streams * batch, P], left-padded with `<pad>` (see `left_pad`).
      key: a `jax.random` key; the same key (and row_ids) gives the same tokens.
      max_new_tokens: length of the output buffer and most steps the loop runs.
      processors: applied in order to float32[num_streams, batch, vocab] scores each
        step (see processors.py); guidance must merge the streams when there are two.
      stop: an object with `stop(token, state) -> bool[batch]` (a constraint or
        `StopOnTokens`); None runs every row to `max_new_tokens`.
      greedy: take the highest score instead of sampling.
      num_streams: 1, or 2 for guidance (conditional rows first).
      row_ids: int[batch], each row's id for its random stream (default 0..batch-1).
      share_prefill: prefill each distinct prompt once (see the module docstring); False
        prefills every row (the same tokens, more work).
    """
    if isinstance(model, DecoderConfig):
        model = DecoderStep(model)
    prompts = np.asarray(prompts)
    _check_prompts(prompts, max_new_tokens, num_streams)
    if getattr(stop, "exact_length", False) and max_new_tokens < stop.max_new_tokens:
        raise UserInputError(
            f"max_new_tokens={max_new_tokens} is fewer than the {stop.max_new_tokens} tokens "
            f"{type(stop).__name__} writes: every row would be cut short (an image of too few "
            "codes); give max_new_tokens=stop.max_new_tokens.")
    if hasattr(model, "check"):
        model.check(prompts, max_new_tokens)
    batch = prompts.shape[0] // num_streams
    row_ids = np.arange(batch) if row_ids is None else np.asarray(row_ids)
    if row_ids.shape != (batch,):
        raise ValueError(f"row_ids must be int[{batch}] (one per row of a stream), got "
                         f"shape {row_ids.shape}.")
    fn = _compiled(model, bool(greedy), num_streams, max_new_tokens)
    shared = distinct_prompts(prompts) if share_prefill and hasattr(model, "select_rows") \
        else None
    return fn(params, jnp.asarray(prompts, jnp.int32), key, jnp.asarray(row_ids, jnp.uint32),
              tuple(processors), stop, shared)


def distinct_prompts(prompts: np.ndarray) -> tuple[jax.Array, jax.Array] | None:
    """(int32[d, P] the distinct rows of `prompts` in the order they first appear, padded
    with copies of the last to d rows, a power of two and a multiple of the current
    mesh's devices; int32[rows] each row's index among them), or None when d would not
    be fewer than the rows (nothing to share)."""
    _, first, inverse = np.unique(prompts, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts the rows; keep their first appearances'.
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    devices = max(jax.sharding.get_abstract_mesh().size, 1)
    width = 1 << (order.size - 1).bit_length()
    width = -(-width // devices) * devices
    if width >= prompts.shape[0]:
        return None
    rows = first[order]
    rows = np.concatenate([rows, np.full(width - rows.size, rows[-1])])
    return (jnp.asarray(prompts[rows], jnp.int32),
            jnp.asarray(rank[inverse.reshape(-1)], jnp.int32))


def _check_prompts(prompts: np.ndarray, max_new_tokens: int, num_streams: int) -> None:
    if prompts.ndim != 2 or prompts.dtype.kind not in "iu" or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be int[rows, length], got {prompts.dtype}"
                         f"{list(prompts.shape)}; build them with sampler.left_pad.")
    if num_streams < 1 or prompts.shape[0] % num_streams:
        raise ValueError(f"{prompts.shape[0]} prompt rows cannot form num_streams="
                         f"{num_streams} equal blocks.")
    check_count("max_new_tokens", max_new_tokens)
    real = prompts != PAD_ID
    if not real[:, -1].all() or (np.diff(real.astype(np.int8), axis=1) < 0).any():
        row = int(np.flatnonzero(~real[:, -1] | (np.diff(real.astype(np.int8), axis=1) < 0)
                                 .any(axis=1))[0])
        raise ValueError(f"prompt row {row} is not left-padded (or is empty): <pad> may "
                         "only come before the first real token; use sampler.left_pad.")


def draw(keys: jax.Array, scores: jax.Array) -> jax.Array:
    """One token per row from softmax(scores): int32[rows], given one key per row.

    By inverse CDF: one uniform per row, and the first token whose cumulative probability
    reaches it. Tokens of probability 0 (score -inf) are never drawn. The same law as
    `jax.random.categorical` with a quarter of its cost here: that draws Gumbel noise for
    every token of every row (0.50 against 0.14 ms a step for 4 x 9216 scores,
    `benchmarks/RESULTS_decode.md`).
    """
    cdf = jnp.cumsum(jax.nn.softmax(scores.astype(jnp.float32), axis=-1), axis=-1)
    u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # In (0, 1]: never below a leading 0.
    chosen = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
    return jnp.minimum(chosen, scores.shape[-1] - 1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _compiled(model: Any, greedy: bool, num_streams: int, max_new_tokens: int):
    """The jitted loop. Processors and the stop rule are pytree arguments: their numbers
    are traced, their kinds and static fields select (and cache) the compiled program."""
    forward = model

    def choose(scores, state, keys, processors):
        scores = scores.reshape(num_streams, -1, scores.shape[-1])
        for processor in processors:
            scores = processor(scores, state)
        if scores.ndim == 3:
            if scores.shape[0] != 1:
                raise ValueError(f"{num_streams} streams but no guidance processor merged "
                                 "them; add ClassifierFreeGuidance or ContrastiveDecoding.")
            scores = scores[0]
        if greedy:
            return jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return draw(jax.vmap(jax.random.fold_in, (0, None))(keys, state.step), scores)

    def prefill(params, prompts):
        """(logits at each row's last token, the cache holding the rows' prompts)."""
        length = prompts.shape[1]
        real = prompts != PAD_ID
        positions = jnp.maximum(jnp.arange(length, dtype=jnp.int32)[None]
                                - (length - real.sum(axis=1))[:, None], 0)
        cache = model.init_cache(prompts.shape[0], length + max_new_tokens)
        return forward(params, cache, prompts, real.astype(jnp.int32), positions)

    def run(params, prompts, key, row_ids, processors, stop, shared=None):
        rows = prompts.shape[0]
        batch = rows // num_streams
        prompt_lengths = (prompts != PAD_ID).sum(axis=1).astype(jnp.int32)
        if hasattr(model, "prepare"):  # Once, before the loop: the layout its steps read.
            params = model.prepare(params)
        if shared is None:
            last, cache = prefill(params, prompts)
        else:  # Each distinct prompt once, then every row's from its prompt's.
            distinct, index = shared
            last, cache = prefill(params, distinct)
            last, cache = jnp.take(last, index, axis=0), model.select_rows(cache, index)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
        state = DecodeState(step=jnp.zeros([], jnp.int32),
                            tokens=jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32),
                            done=jnp.zeros([batch], bool))
        lengths = jnp.zeros([batch], jnp.int32)

        def keep_going(carry):
            state = carry[0]
            return (state.step < max_new_tokens) & ~state.done.all()

        def step(carry):
            state, lengths, last, cache = carry
            token = jnp.where(state.done, PAD_ID, choose(last, state, keys, processors))
            ended = stop.stop(token, state) if stop is not None else jnp.zeros_like(state.done)
            lengths = jnp.where(state.done, lengths, state.step + 1)
            new_state = DecodeState(step=state.step + 1,
                                    tokens=state.tokens.at[:, state.step].set(token),
                                    done=state.done | ended)
            fed = jnp.tile(token, num_streams)[:, None]
            positions = (prompt_lengths + state.step)[:, None]
            last, cache = forward(params, cache, fed, jnp.ones_like(fed), positions)
            return new_state, lengths, last, cache

        state, lengths, _, _ = jax.lax.while_loop(keep_going, step,
                                                  (state, lengths, last, cache))
        return Samples(tokens=state.tokens, lengths=lengths, finished=state.done)

    return jax.jit(run)
