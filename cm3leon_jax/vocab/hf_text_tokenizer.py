"""A text tokenizer from a Hugging Face `tokenizers` file (e.g. Chameleon's
`text_tokenizer.json`), with the interface of `TextTokenizer`.

Such a file lists text pieces, special tokens and (Chameleon) image tokens in one id
space. The vocabulary (`multimodal.py`) wants only text pieces, numbered 0..V-1: this
class keeps the file's text pieces in id order and renumbers them densely. Which ids
are text is decided here once, for the vocabulary and for weight importers alike:

    image   names starting with "IMGIMG" (Chameleon's image codes)
    special the file's added tokens, and names of the form "<...>" other than the
            byte-fallback pieces "<0x00>".."<0xFF>"
    text    every other id

A vocabulary folder holds such a file as `text.json` in place of `text.model`.
"""

from __future__ import annotations

import json
import re

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError

_SPECIAL = re.compile(r"<[^<>\s]+>")
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
IMAGE_PREFIX = "IMGIMG"


def all_tokens(spec: dict) -> dict[str, int]:
    """name -> id of every token of a `tokenizers` JSON (model vocab and added tokens)."""
    vocab = spec.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError("the tokenizer file has no model.vocab mapping (a BPE/WordPiece "
                         "tokenizers file is expected).")
    out = dict(vocab)
    out.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return out


def start_is_sentinel_0(special: dict[str, int]) -> bool:
    """Whether an import holds the file's `<s>` as its `<sentinel:0>`: where the file names
    no sentinels, `<s>` is the one (Chameleon's own mask for guidance, and the token its
    sequences open with; `export/chameleon_vocab.py`, `MultimodalVocabulary.prompt_start_id`)."""
    return "<s>" in special and "<sentinel:0>" not in special


def classify(spec: dict) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """(text ids sorted, {special name: id}, {image name: id}) of a tokenizers JSON."""
    added = {t["content"] for t in spec.get("added_tokens", [])}
    text, special, image = [], {}, {}
    for name, i in all_tokens(spec).items():
        if name.startswith(IMAGE_PREFIX):
            image[name] = i
        elif name in added or (_SPECIAL.fullmatch(name) and not _BYTE.fullmatch(name)):
            special[name] = i
        else:
            text.append(i)
    return np.array(sorted(set(text)), np.int64), special, image


class HFTextTokenizer:
    """`encode(str) -> int32[n]` dense text-piece ids, `decode(ids) -> str`."""

    def __init__(self, json_bytes: bytes, path: str | None = None):
        from tokenizers import Tokenizer
        self._bytes, self.path = json_bytes, path
        self._tok = Tokenizer.from_str(json_bytes.decode("utf-8"))
        self.text_ids, _, _ = classify(json.loads(json_bytes))
        if not self.text_ids.size:
            raise ValueError(f"the tokenizer file {path!r} has no text pieces.")
        self._dense = np.full(int(self.text_ids.max()) + 1, -1, np.int64)
        self._dense[self.text_ids] = np.arange(self.text_ids.size)

    @classmethod
    def load(cls, path: str) -> "HFTextTokenizer":
        if not fs.exists(path):
            raise MissingInputError(f"no tokenizers file at {path!r}.")
        with fs.open(path, "rb") as f:
            return cls(f.read(), path=path)

    def save(self, path: str) -> str:
        with fs.open(path, "wb") as f:
            f.write(self._bytes)
        self.path = path
        return path

    @property
    def model_proto(self) -> bytes:
        return self._bytes

    @property
    def vocab_size(self) -> int:
        return int(self.text_ids.size)

    def encode(self, text: str) -> np.ndarray:
        """str -> int32[n] dense piece ids in [0, vocab_size)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}.")
        ids = np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int64)
        dense = np.where(ids < self._dense.size, self._dense[np.minimum(ids, self._dense.size - 1)],
                         -1)
        if (dense < 0).any():
            bad = self._tok.id_to_token(int(ids[np.argmax(dense < 0)]))
            raise ValueError(f"the text {text[:40]!r} contains the special token {bad!r}; "
                             "special tokens are not text (write them as token ids).")
        return dense.astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"text piece ids must lie in [0, {self.vocab_size}); got values "
                             f"in [{ids.min()}, {ids.max()}].")
        return self._tok.decode(self.text_ids[ids].tolist(), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(self.text_ids[int(i)]))
