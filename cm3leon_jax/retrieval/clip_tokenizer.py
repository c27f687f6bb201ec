"""Text tokenizers for the CLIP text tower: hashed words (the tiny model), bytes, or OpenAI's BPE.

Both give `[bos] tokens [eos]` lists cut to the model's context; the text tower
pools at the eos. Query dropout removes inner tokens only (never bos/eos), so a
dropped query is still a well-formed input.

An encoder directory says which tokenizer it uses in `cm3leon_tokenizer.json`
(`{"kind": "words", "vocab_size": 4096}`); a Hugging Face checkpoint without that file but with
`vocab.json` + `merges.txt` uses the BPE through `transformers.CLIPTokenizer`.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Protocol, Sequence

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError
from cm3leon_jax.retrieval.select import dropout_keep_mask

TOKENIZER_JSON = "cm3leon_tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """text -> [bos, ..., eos] (no length limit)."""


class ByteTokenizer:
    """UTF-8 bytes 0..255, bos 256, eos 257, pad 258: nothing to train or download."""

    vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]

    def describe(self) -> dict:
        return {"kind": "bytes"}


class WordTokenizer:
    """Lower-cased words and punctuation, hashed (crc32) into a fixed id range.

    Nothing to train or download, any text is valid, and sequences are short
    (a word per token), which keeps the tiny text tower cheap. Collisions are
    possible but rare at 4096 ids for a caption-sized vocabulary. Pad is 0; bos and
    eos are the two largest ids, as in OpenAI's BPE, so `transformers` pools ours
    at the right place too.
    """

    def __init__(self, vocab_size: int = 4096):
        if vocab_size < 16:
            raise ValueError(f"WordTokenizer.vocab_size={vocab_size} is too small.")
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        return [self.bos_id, *(1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 3)
                               for w in words), self.eos_id]

    def describe(self) -> dict:
        return {"kind": "words", "vocab_size": self.vocab_size}


class BpeTokenizer:
    """OpenAI CLIP's BPE, read from a checkpoint's vocab.json and merges.txt."""

    def __init__(self, directory: str):
        from transformers import CLIPTokenizer
        self._tok = CLIPTokenizer(os.path.join(directory, "vocab.json"),
                                  os.path.join(directory, "merges.txt"))
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def describe(self) -> dict:
        return {"kind": "bpe"}


def load_tokenizer(directory: str) -> Tokenizer:
    path = os.path.join(directory, TOKENIZER_JSON)
    if fs.exists(path):
        with fs.open(path) as f:
            spec = json.load(f)
        kind = spec["kind"]
        if kind == "words":
            return WordTokenizer(spec["vocab_size"])
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "bpe":
            return BpeTokenizer(directory)
        raise ValueError(f"{path} names tokenizer kind {kind!r}; known: 'words', 'bytes', 'bpe'.")
    if all(fs.exists(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
        return BpeTokenizer(directory)
    raise MissingInputError(
        f"no tokenizer in {directory!r}: expected {TOKENIZER_JSON} or the BPE files "
        "vocab.json + merges.txt that come with a Hugging Face CLIP checkpoint.")


def save_tokenizer(directory: str, tokenizer: Tokenizer) -> None:
    with fs.open(os.path.join(directory, TOKENIZER_JSON), "w") as f:
        json.dump(tokenizer.describe(), f)


def lone_surrogate(text: str) -> int | None:
    """The position of the first lone surrogate in `text` (U+D800..U+DFFF: a Python str and
    JSON's `\\ud800` escapes allow it, but it is no character and has no UTF-8, so no
    tokenizer can encode it), or None for valid Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def batch_tokens(token_lists: Sequence[list[int]], context: int,
                 dropout: float = 0.0, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Lists of [bos ... eos] -> (int32[b, context] right-padded with 0, int32[b] lengths).

    Too-long lists keep their first context-1 tokens and their eos. With
    `dropout`, that fraction of each list's inner tokens is removed (query dropout).
    """
    tokens = np.zeros((len(token_lists), context), np.int32)
    lengths = np.zeros([len(token_lists)], np.int32)
    inner = [t[1:-1][:context - 2] for t in token_lists]
    keep = None
    if dropout > 0:
        if rng is None:
            raise ValueError("query dropout needs an rng (np.random.Generator) to be "
                             "deterministic.")
        keep = dropout_keep_mask(rng, np.array([len(x) for x in inner]), context, dropout)
    for i, (t, body) in enumerate(zip(token_lists, inner)):
        if keep is not None:
            body = [x for x, k in zip(body, keep[i]) if k]
        row = [t[0], *body, t[-1]]
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    return tokens, lengths
