"""Chameleon's token ids onto our `IdLayout`: which row of its embedding each of our ids takes.

Chameleon's `text_tokenizer.json` puts everything in one 65,536-id space: `<s>`,
`<pad>`, `</s>`, `<unk>`, 8,192 image tokens named `IMGIMG<code spelled A-J>Z`
(code 123 is `IMGIMGBCDZ`), `<eoss>`, `<racm3:break>`, reserved tokens, and the BPE
text pieces. Our layout (`vocab/layout.py`) is specials, sentinels, text, image codes.
Importing is a permutation of the embedding rows and output columns::

    ours                         Chameleon's
    <pad> <eos> <break> <eoss>   <pad> </s> <racm3:break> (its begin-image) <eoss> (its
    <unk>                        end-image) <unk>
    <sentinel:i>                 <sentinel:i> where the file has them; otherwise one
                                 sentinel, <s>: our unconditional CFG prompt
                                 `<sentinel:0> <break>` is then Chameleon's own, `<s> <boi>`
    text piece j                 the j-th text id (`vocab/hf_text_tokenizer.classify`)
    image code c                 the id named IMGIMG...(c)...Z
    padding ids                  a reserved token's row (never a training target, so
                                 its logit stays low), or zeros if there is none

so that our prompts (`caption <break>` -> image codes) are Chameleon's prompts, token
for token. The vocabulary folder written keeps the tokenizer file verbatim as
`text.json` next to `layout.json`.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.hf_text_tokenizer import IMAGE_PREFIX, classify, start_is_sentinel_0
from cm3leon_jax.vocab.multimodal import HF_TEXT_JSON, LAYOUT_FILE

FIXED = {layout_lib.PAD_ID: "<pad>", layout_lib.EOS_ID: "</s>",
         layout_lib.BREAK_ID: "<racm3:break>", layout_lib.EOSS_ID: "<eoss>",
         layout_lib.UNK_ID: "<unk>"}
_LETTERS = {c: str(i) for i, c in enumerate("ABCDEFGHIJ")}
_RESERVED = re.compile(r"<reserved(\d+)>")


@dataclasses.dataclass(frozen=True)
class ChameleonVocab:
    """layout: our IdLayout for it. source_ids: int64[layout.vocab_size], the Chameleon id
    whose row each of our ids takes (-1: a zero row). json_bytes: the tokenizer file."""

    layout: layout_lib.IdLayout
    source_ids: np.ndarray
    json_bytes: bytes

    def write(self, directory: str) -> None:
        """A vocabulary folder `MultimodalVocabulary(directory)` opens."""
        fs.makedirs(directory)
        with fs.open(f"{directory}/{HF_TEXT_JSON}", "wb") as f:
            f.write(self.json_bytes)
        fields = {k: getattr(self.layout, k) for k in
                  ("image_codes", "num_sentinels", "image_length", "pad_to_multiple")}
        with fs.open(f"{directory}/{LAYOUT_FILE}", "w") as f:
            json.dump(fields, f, indent=2, sort_keys=True)


def image_code(name: str, where: str) -> int:
    digits = name[len(IMAGE_PREFIX):-1]
    if not digits or any(c not in _LETTERS for c in digits):
        raise UserInputError(f"{where}: image token {name!r} does not spell a code "
                             "(IMGIMG + letters A-J + one closing letter).")
    return int("".join(_LETTERS[c] for c in digits))


def _image_ids(image: dict[str, int], where: str) -> np.ndarray:
    """Chameleon id of each code 0..C-1; the codes must be exactly 0..C-1."""
    by_code = {image_code(name, where): i for name, i in image.items()}
    n = len(by_code)
    if not n or sorted(by_code) != list(range(n)):
        raise UserInputError(f"{where}: its {n} IMGIMG tokens do not spell the codes 0..{n - 1}.")
    return np.array([by_code[c] for c in range(n)], np.int64)


def _sentinels(special: dict[str, int], where: str) -> list[int]:
    if start_is_sentinel_0(special):
        return [special["<s>"]]
    out = []
    while f"<sentinel:{len(out)}>" in special:
        out.append(special[f"<sentinel:{len(out)}>"])
    if not out:
        raise UserInputError(f"{where}: has neither <sentinel:0> nor <s>; our prompts need one "
                             "of them as the mask of classifier-free guidance.")
    return out


def build(json_bytes: bytes, image_length: int, where: str = "text_tokenizer.json",
          pad_to_multiple: int = 128) -> ChameleonVocab:
    """The layout and row mapping for a Chameleon tokenizer file (see the module doc)."""
    try:
        spec = json.loads(json_bytes)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{where}: not valid JSON ({e}).") from None
    try:
        text, special, image = classify(spec)
    except ValueError as e:
        raise UserInputError(f"{where}: {e}") from None
    missing = [name for name in FIXED.values() if name not in special]
    if missing:
        raise UserInputError(f"{where}: lacks the special tokens {missing}; is this Chameleon's "
                             "text tokenizer?")
    images = _image_ids(image, where)
    sentinels = _sentinels(special, where)
    layout = layout_lib.IdLayout(text_size=len(text), image_codes=len(images),
                                 num_sentinels=len(sentinels), image_length=image_length,
                                 pad_to_multiple=pad_to_multiple)
    used = {special[name] for name in FIXED.values()} | set(sentinels)
    reserved = sorted((int(m.group(1)), i) for name, i in special.items()
                      if (m := _RESERVED.fullmatch(name)) and i not in used)
    source = np.full(layout.vocab_size, reserved[-1][1] if reserved else -1, np.int64)
    for ours, name in FIXED.items():
        source[ours] = special[name]
    source[layout.sentinel_start:layout.text_start] = sentinels
    source[layout.text_start:layout.image_start] = text
    source[layout.image_start:layout.used_size] = images
    return ChameleonVocab(layout, source, json_bytes)


def take_rows(matrix: np.ndarray, source_ids: np.ndarray, what: str) -> np.ndarray:
    """matrix[source_ids] along axis 0, zero rows where the id is -1."""
    if source_ids.max() >= matrix.shape[0]:
        raise UserInputError(f"{what} has {matrix.shape[0]} rows but the tokenizer file uses ids "
                             f"up to {int(source_ids.max())}: they do not belong together.")
    out = matrix[np.maximum(source_ids, 0)]
    out[source_ids < 0] = 0
    return out
