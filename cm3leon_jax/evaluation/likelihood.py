"""What a decoder believes: log p(target | prompt), and which of several prompts explains
a target best.

    ll = sequence_log_likelihoods(config, params, prompts, targets)   # f32[n]
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


def sequence_log_likelihoods(config: DecoderConfig, params, prompts: Sequence[np.ndarray],
                             targets: Sequence[np.ndarray], *, batch_size: int = 64,
                             length_multiple: int = 16) -> np.ndarray:
    """f32[n]: sum over each target's tokens of log p(token | prompt, earlier tokens).

    Rows are right-padded (the decoder is causal, so padding after a row changes none of
    its logits) to a multiple of `length_multiple`, in batches of `batch_size` rows.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"one target per prompt: {len(prompts)} prompts, {len(targets)} "
                         "targets.")
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        prompt, target = np.asarray(prompt, np.int32), np.asarray(target, np.int32)
        if prompt.size == 0 or target.size == 0:
            raise ValueError(f"pair {i}: the prompt and the target need a token each (got "
                             f"{prompt.size} and {target.size}); the first token is never "
                             "scored, so a target must follow at least one prompt token.")
        if prompt.size + target.size > config.max_length:
            raise ValueError(f"pair {i}: {prompt.size} + {target.size} tokens, more than "
                             f"DecoderConfig.max_length={config.max_length}; shorten it.")
        rows.append((prompt, target))
    if not rows:
        return np.zeros([0], np.float32)
    width = max(p.size + t.size for p, t in rows)
    width = min(-(-width // length_multiple) * length_multiple, config.max_length)
    score, out = _scorer(config), []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.full([batch_size, width], PAD_ID, np.int32)  # One shape: one compile.
        weights = np.zeros([batch_size, width], np.float32)
        for j, (prompt, target) in enumerate(chunk):
            tokens[j, :prompt.size + target.size] = np.concatenate([prompt, target])
            weights[j, prompt.size:prompt.size + target.size] = 1.0
        out.append(np.asarray(score(params, tokens, weights))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)


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
