"""The text half of the vocabulary: a SentencePiece model, trained here.

The model is trained so that every string round-trips exactly
(`decode(encode(s)) == s`): no normalization, no dummy prefix, whitespace kept,
and byte fallback for characters the model never saw. SentencePiece reads U+2581
("▁") as its whitespace symbol and decodes it to a space, so `encode` writes that
character as its three UTF-8 byte pieces instead (text without it is encoded as
SentencePiece encodes it). Its only special piece is
`<unk>` (id 0, never produced thanks to byte fallback); padding, end of
document and the rest live in the multimodal layout (`layout.py`), not here.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError

META = "\u2581"  # SentencePiece's whitespace symbol, a character of its own in text.


class TextTokenizer:
    """A loaded SentencePiece model: `encode(str) -> int32[n]`, `decode(ids) -> str`."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        # U+2581's byte pieces; None for a model without byte fallback.
        pieces = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]
        self._meta_ids = pieces if all(self._sp.is_byte(i) for i in pieces) else None

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        if not fs.exists(path):
            raise MissingInputError(
                f"no SentencePiece model at {path!r}; train one with "
                "TextTokenizer.train(...) and save it, or give the path of a "
                ".model file.")
        with fs.open(path, "rb") as f:
            return cls(f.read(), path=path)

    @classmethod
    def train(cls,
              texts: Iterable[str],
              vocab_size: int,
              model_type: str = "unigram",
              max_sentence_length: int = 4192) -> "TextTokenizer":
        """Trains a model on `texts`; the same texts and size give the same model.

        Args:
          texts: the training corpus, one sentence or caption per item.
          vocab_size: number of pieces, including the 256 byte-fallback pieces
            and `<unk>`.
          model_type: "unigram" or "bpe".
          max_sentence_length: longer inputs are skipped by the trainer (bytes).
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r}: give a whole number of pieces.")
        buffer = io.BytesIO()
        try:
            _train(texts, buffer, vocab_size, model_type, max_sentence_length)
        except RuntimeError as e:
            # SentencePiece says why in the last part of its message.
            reason = str(e).split("] ")[-1]
            if "Vocabulary size too high" in reason:
                raise ValueError(
                    f"the training corpus is too small for vocab_size={vocab_size}: "
                    f"{reason} Lower vocab_size or train on more text.") from None
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
            if "required_chars" in reason:  # The byte pieces, <unk>, one per character.
                at_least = f"use at least {needed.group(1)}." if needed else reason
                raise ValueError(
                    f"vocab_size={vocab_size} cannot hold the 256 byte pieces, <unk> and one "
                    f"piece per distinct character of the corpus: {at_least}") from None
            raise
        return cls(buffer.getvalue())

    def save(self, path: str) -> str:
        fs.makedirs(os.path.dirname(fs.abspath(path)))
        with fs.open(path, "wb") as f:
            f.write(self._proto)
        self.path = path
        return path

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def meta_byte_ids(self) -> list[int] | None:
        """The byte pieces `encode` writes U+2581 (`META`) as; None for a model without byte
        fallback, where it is SentencePiece's whitespace, as SentencePiece reads it."""
        return self._meta_ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        """str -> int32[n] piece ids in [0, vocab_size)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}.")
        if META not in text or self._meta_ids is None:
            return np.asarray(self._sp.encode(text), dtype=np.int32)
        ids: list[int] = []
        for i, part in enumerate(text.split(META)):
            ids += (self._meta_ids if i else []) + self._sp.encode(part)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """int[n] piece ids -> str."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"text piece ids must lie in [0, {self.vocab_size}); got values "
                f"in [{ids.min()}, {ids.max()}].")
        return self._sp.decode(ids.astype(np.int64).tolist())

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _train(texts, buffer, vocab_size, model_type, max_sentence_length):
    spm.SentencePieceTrainer.train(
        sentence_iterator=_non_empty(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        # Exact round trips: the text is kept byte for byte.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_whitespace=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        max_sentence_length=max_sentence_length,
        # Determinism: one thread, no sampling of the input.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # A small corpus may not hold enough distinct pieces for the
        # requested size; fail loudly instead of silently shrinking.
        hard_vocab_limit=True,
        minloglevel=2,
    )


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(
                f"the training corpus must yield str, got {type(t).__name__}.")
        if t:
            yield t
