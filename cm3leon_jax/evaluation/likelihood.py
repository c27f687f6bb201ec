"""What a decoder believes: log p(target | prompt), and which of several prompts explains
a target best.

    ll = sequence_log_likelihoods(config, params, prompts, targets)   # f32[n]
    lp, alt = token_log_probs(config, params, prompts, targets, others)  # per token
    first = ranked_first(config, params, [[caption, swapped_1, ...], ...], image_ids)

`ranked_first` is a generative read-out: the decoder "reads" a word when the true
caption gives the true image a higher likelihood than every caption with that word
swapped for another (benchmarks/demo_decoders.py asks it of the demo's decoders for the
shape and the colour words). One forward pass scores a whole sequence, so it costs a
small fraction of sampling the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.decode import prompts as prompts_lib
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import loss
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.vocab.layout import PAD_ID


@functools.lru_cache(maxsize=8)
def _scorer(config: DecoderConfig):
    model = Decoder(config)

    @jax.jit
    def score(params, tokens, weights):
        logits = model.apply({"params": params}, tokens)
        log_z, target = loss.log_z_and_target(logits[:, :-1], tokens[:, 1:])
        return jnp.sum((target - log_z) * weights[:, 1:], axis=-1)

    return score


def _rows(config: DecoderConfig, prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray],
          start: int | None = prompts_lib.BOS_ID
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (prompt, target) pairs as int32 arrays, each checked to fit the decoder."""
    if len(prompts) != len(targets):
        raise ValueError(f"one target per prompt: {len(prompts)} prompts, {len(targets)} "
                         "targets.")
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        prompt = _token_ids(prompt, config.vocab_size, f"pair {i}'s prompt")
        target = _token_ids(target, config.vocab_size, f"pair {i}'s target")
        # As the model reads it: after `start` (an empty prompt is the target's
        # unconditional likelihood); without one, the first target token needs a prompt.
        prompt = prompts_lib.opened(prompt, start)
        if prompt.size == 0 or target.size == 0:
            raise ValueError(f"pair {i}: the target needs a token, and the prompt too when "
                             f"no opening token is given (got {prompt.size} and "
                             f"{target.size}).")
        if prompt.size + target.size > config.max_length:
            raise ValueError(f"pair {i}: {prompt.size} + {target.size} tokens (the prompt's "
                             f"opening one included), more than DecoderConfig.max_length="
                             f"{config.max_length}; shorten it.")
        rows.append((prompt, target))
    return rows


def _token_ids(tokens, vocab_size: int, where: str) -> np.ndarray:
    """`tokens` as int32, refused unless integer ids of the vocabulary (0 <= id <
    vocab_size): the embedding lookup would read a made-up row or NaN for any other."""
    array = np.asarray(tokens)
    if array.size and array.dtype.kind not in "iu":
        raise UserInputError(f"{where}: token ids must be integers, got dtype {array.dtype} "
                             f"(first {array.ravel()[0].item()!r}); pass the vocabulary's int ids.")
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        raise UserInputError(f"{where}: token id {array.ravel()[bad[0]]} at position "
                             f"{bad[0]} is outside the vocabulary [0, {vocab_size}) "
                             "(DecoderConfig.vocab_size); encode with the model's vocabulary.")
    return array.astype(np.int32)


def _width(rows: list, length_multiple: int, max_length: int) -> int:
    width = max(p.size + t.size for p, t in rows)
    return min(-(-width // length_multiple) * length_multiple, max_length)


def _batches(rows: list, batch_size: int, width: int):
    """(chunk of rows, int32[batch_size, width] of each row's prompt + target, right-padded)
    per `batch_size` rows: one shape, one compile."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.full([batch_size, width], PAD_ID, np.int32)
        for j, (prompt, target) in enumerate(chunk):
            tokens[j, :prompt.size + target.size] = np.concatenate([prompt, target])
        yield chunk, tokens


def sequence_log_likelihoods(config: DecoderConfig, params, prompts: Sequence[np.ndarray],
                             targets: Sequence[np.ndarray], *, batch_size: int = 64,
                             length_multiple: int = 16, start: int | None = prompts_lib.BOS_ID
                             ) -> np.ndarray:
    """f32[n]: sum over each target's tokens of log p(token | prompt, earlier tokens).

    Rows are right-padded (the decoder is causal, so padding after a row changes none of
    its logits) to a multiple of `length_multiple`, in batches of `batch_size` rows. Each
    prompt is read after `start` (`prompts.opened`: the vocabulary's `prompt_start_id`).
    """
    rows = _rows(config, prompts, targets, start)
    if not rows:
        return np.zeros([0], np.float32)
    score, out = _scorer(config), []
    for chunk, tokens in _batches(rows, batch_size, _width(rows, length_multiple,
                                                            config.max_length)):
        weights = np.zeros(tokens.shape, np.float32)
        for j, (prompt, target) in enumerate(chunk):
            weights[j, prompt.size:prompt.size + target.size] = 1.0
        out.append(np.asarray(score(params, tokens, weights))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _token_scorer(config: DecoderConfig):
    model = Decoder(config)

    @jax.jit
    def score(params, tokens, others):
        logits = model.apply({"params": params}, tokens)[:, :-1]
        log_z, target = loss.log_z_and_target(logits, tokens[:, 1:])
        _, other = loss.log_z_and_target(logits, others[:, 1:])
        return target - log_z, other - log_z

    return score


def token_log_probs(config: DecoderConfig, params, prompts: Sequence[np.ndarray],
                    targets: Sequence[np.ndarray], others: Sequence[np.ndarray] | None = None,
                    *, batch_size: int = 64, length_multiple: int = 16,
                    start: int | None = prompts_lib.BOS_ID
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Teacher-forced, token by token: (for each target f32[len(target)] of log p(token |
    prompt, the target's earlier tokens), and the same for `others`).

    `others` (one int array per target, of its length; None: the targets) are tokens to
    weigh at each place instead of the target's, with the target's own earlier tokens fed
    in: the eval run asks how likely an edit's source code is where the true edit keeps it.
    Padding and batching as `sequence_log_likelihoods`.
    """
    rows = _rows(config, prompts, targets, start)
    others = [t for _, t in rows] if others is None else \
        [_token_ids(o, config.vocab_size, f"others[{i}]") for i, o in enumerate(others)]
    if len(others) != len(rows) or any(o.shape != t.shape for o, (_, t) in zip(others, rows)):
        raise ValueError("others: one int array per target, each of its target's length; got "
                         f"{[o.shape for o in others]} for targets "
                         f"{[t.shape for _, t in rows]}.")
    if not rows:
        return [], []
    width = _width(rows, length_multiple, config.max_length)
    swapped = [(prompt, other) for (prompt, _), other in zip(rows, others)]
    score, mine, theirs = _token_scorer(config), [], []
    for (chunk, tokens), (_, alt) in zip(_batches(rows, batch_size, width),
                                         _batches(swapped, batch_size, width)):
        a, b = (np.asarray(x, np.float32) for x in score(params, tokens, alt))
        for j, (prompt, target) in enumerate(chunk):
            at = slice(prompt.size - 1, prompt.size - 1 + target.size)
            mine.append(a[j, at])
            theirs.append(b[j, at])
    return mine, theirs


def ranked_first(config: DecoderConfig, params, prompt_sets: Sequence[Sequence[np.ndarray]],
                 targets: Sequence[np.ndarray], **kwargs) -> np.ndarray:
    """bool[n]: for each target, whether its first prompt (the true one) gives it a higher
    likelihood than every other prompt of its set (ties count as not first)."""
    if len(prompt_sets) != len(targets):
        raise ValueError(f"one prompt set per target: {len(prompt_sets)} sets, "
                         f"{len(targets)} targets.")
    flat_prompts, flat_targets, spans = [], [], []
    for i, (prompts, target) in enumerate(zip(prompt_sets, targets)):
        if len(prompts) < 2:
            raise ValueError(f"target {i}: {len(prompts)} prompt(s); a read-out compares "
                             "the true prompt with at least one other.")
        spans.append((len(flat_prompts), len(prompts)))
        flat_prompts += list(prompts)
        flat_targets += [target] * len(prompts)
    ll = sequence_log_likelihoods(config, params, flat_prompts, flat_targets, **kwargs)
    return np.array([ll[a] > ll[a + 1:a + n].max() for a, n in spans], bool)
