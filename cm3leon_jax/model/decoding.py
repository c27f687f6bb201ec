"""`DecoderStep`: the decoder as the sampler sees it, a `tokens_to_logits` callable.

    step = DecoderStep(config)
    cache = step.init_cache(rows, prompt_len + max_new_tokens)
    logits, cache = step(params, cache, prompts, segment_ids, positions)   # prefill
    logits, cache = step(params, cache, next_tokens, ones, positions + 1)  # one token

`logits` are float32[rows, vocab] at each row's last given token. The sampler
(`decode/sampler.py`) only needs this shape of object (`init_cache` plus the call; the
`check` hook is optional), so a stub model, a sharded model or an imported one plugs in
the same way (t5x's `tokens_to_logits`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import Decoder, init_cache


@dataclasses.dataclass(frozen=True)
class DecoderStep:
    """`Decoder(config)` with its KV cache, as `(params, cache, tokens, seg, pos) -> (logits, cache)`.

    Hashable (a frozen dataclass of a frozen config): the sampler caches its compiled loop
    on it.
    """

    config: DecoderConfig

    def init_cache(self, rows: int, length: int) -> Any:
        """An empty cache for `rows` sequences of at most `length` tokens."""
        return init_cache(Decoder(self.config), rows, length)

    def __call__(self, params: Any, cache: Any, tokens: jax.Array, segment_ids: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, Any]:
        """tokens, segment_ids, positions: int32[rows, n] -> (float32[rows, vocab], cache)."""
        logits, new = Decoder(self.config).apply(
                {"params": params, "cache": cache}, tokens, segment_ids, positions,
                decode=True, mutable=["cache"])
        return logits[:, -1], new["cache"]

    def check(self, prompts: np.ndarray, max_new_tokens: int) -> None:
        """Refuse prompts this model cannot read: ids outside the vocabulary, too long."""
        c = self.config
        if prompts.min() < 0 or prompts.max() >= c.vocab_size:
            raise ValueError(f"prompts hold ids outside [0, {c.vocab_size}) "
                             f"(DecoderConfig.vocab_size); were they made with this model's "
                             "vocabulary?")
        total = prompts.shape[1] + max_new_tokens
        if c.position_embedding == "learned" and total > c.max_length:
            raise ValueError(f"prompt length {prompts.shape[1]} + max_new_tokens "
                             f"{max_new_tokens} = {total} > DecoderConfig.max_length="
                             f"{c.max_length}; shorten the prompts (fewer retrieved "
                             "documents) or generate fewer tokens.")
