"""The id layout of the unified multimodal vocabulary: the one source of truth.

Every token the decoder reads or writes is an id in one flat range::

        id                                        token
        0                                         <pad>
        1                                         <eos>     between documents
        2                                         <break>   at every segment change
        3                                         <eoss>    closes a CM3 span moved to the end
        4                                         <unk>     reserved; never produced by encode
        5 .. 5+S-1                                <sentinel:0> .. <sentinel:S-1>   (CM3 masks)
        T = 5+S .. T+V-1                          text pieces: SentencePiece id t -> T + t
        I = T+V .. I+C-1                          image codes: VQ code c -> I + c
        I+C .. N-1                                unused, pads N to a multiple of 128

with S sentinels (512 in the public CM3 code), V text pieces and C image codes
(8192 in the paper). Special tokens come first so that they keep the same ids
whatever the sizes of the text and image ranges are.

Everything that needs an id (the vocabulary, the document codec, the CM3
transform, samplers and logits processors) asks an `IdLayout`; nothing else
hard-codes an offset.
"""

from __future__ import annotations

import dataclasses
import re

import gin
import numpy as np

PAD_ID = 0
EOS_ID = 1
BREAK_ID = 2
EOSS_ID = 3
UNK_ID = 4
NUM_FIXED_SPECIALS = 5

_FIXED_SPECIAL_NAMES = ("<pad>", "<eos>", "<break>", "<eoss>", "<unk>")
_SENTINEL_RE = re.compile(r"<sentinel:(\d+)>")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IdLayout:
    """Where each kind of token lives in the id space.

    Attributes:
        text_size: number of text pieces (the SentencePiece model's vocab size).
        image_codes: size of the VQ codebook.
        num_sentinels: number of CM3 `<sentinel:i>` tokens.
        image_length: codes per image (32 x 32 = 1024 in the paper); an image
            segment must have exactly this many.
        pad_to_multiple: the total size is rounded up to a multiple of this, so
            that the embedding and output matrices shard evenly.
    """

    text_size: int = 56_320
    image_codes: int = 8192
    num_sentinels: int = 512
    image_length: int = 1024
    pad_to_multiple: int = 128

    def __post_init__(self):
        for name in ("text_size", "image_codes", "image_length", "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(
                        f"IdLayout.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_sentinels < 0:
            raise ValueError(
                    f"IdLayout.num_sentinels must be >= 0, got {self.num_sentinels}.")

    # The ranges, as [start, stop).
    @property
    def sentinel_start(self) -> int:
        return NUM_FIXED_SPECIALS

    @property
    def text_start(self) -> int:
        return NUM_FIXED_SPECIALS + self.num_sentinels

    @property
    def image_start(self) -> int:
        return self.text_start + self.text_size

    @property
    def used_size(self) -> int:
        """Ids that mean something; ids in [used_size, vocab_size) are padding."""
        return self.image_start + self.image_codes

    @property
    def vocab_size(self) -> int:
        m = self.pad_to_multiple
        return -(-self.used_size // m) * m

    # Conversions. Each accepts scalars or numpy arrays.
    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(
                    f"sentinel index {i} is outside [0, {self.num_sentinels}); raise "
                    "IdLayout.num_sentinels if more CM3 spans are needed.")
        return self.sentinel_start + i

    def text_to_ids(self, pieces):
        """SentencePiece ids -> vocabulary ids."""
        return np.asarray(pieces, np.int32) + self.text_start

    def ids_to_text(self, ids):
        return np.asarray(ids, np.int32) - self.text_start

    def codes_to_ids(self, codes):
        """VQ codes int[..., n] -> vocabulary ids (checked to be in the codebook)."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_codes):
            raise ValueError(
                    f"image codes must lie in [0, {self.image_codes}); got values in "
                    f"[{codes.min()}, {codes.max()}]. Does the image tokenizer's codebook "
                    "size match IdLayout.image_codes?")
        return codes.astype(np.int32) + self.image_start

    def ids_to_codes(self, ids):
        return np.asarray(ids, np.int32) - self.image_start

    # Predicates, vectorized.
    def is_sentinel(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.sentinel_start) & (ids < self.text_start)

    def is_text(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.text_start) & (ids < self.image_start)

    def is_image(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.image_start) & (ids < self.used_size)

    def is_special(self, ids):
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.text_start)

    def check_ids(self, ids, what: str = "ids") -> np.ndarray:
        """Returns ids as int32, or raises naming the first id that means nothing."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integers, got dtype {ids.dtype}.")
        bad = (ids < 0) | (ids >= self.used_size)
        if bad.any():
            pos = tuple(int(p) for p in np.argwhere(bad)[0])
            raise ValueError(
                    f"{what} holds id {int(ids[pos])} at position {pos}, outside the "
                    f"vocabulary's used range [0, {self.used_size}) (text {self.text_size}"
                    f", image codes {self.image_codes}, sentinels {self.num_sentinels}). "
                    "Was it made with a different IdLayout?")
        return ids.astype(np.int32)

    # Names of special tokens, for display and for parsing prompts.
    def special_name(self, i: int) -> str:
        if 0 <= i < NUM_FIXED_SPECIALS:
            return _FIXED_SPECIAL_NAMES[i]
        if self.sentinel_start <= i < self.text_start:
            return f"<sentinel:{i - self.sentinel_start}>"
        raise ValueError(f"id {i} is not a special token.")

    def special_id(self, name: str) -> int:
        if name in _FIXED_SPECIAL_NAMES:
            return _FIXED_SPECIAL_NAMES.index(name)
        m = _SENTINEL_RE.fullmatch(name)
        if m:
            return self.sentinel_id(int(m.group(1)))
        raise ValueError(
                f"unknown special token {name!r}; known: {', '.join(_FIXED_SPECIAL_NAMES)}"
                f", <sentinel:0..{self.num_sentinels - 1}>.")
