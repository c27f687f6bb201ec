"""The unified multimodal vocabulary as a `seqio.Vocabulary`.

Text goes through the SentencePiece model and is shifted into the text range of
the `IdLayout`; image codes are shifted into the image range by
`codes_to_ids`; the special tokens sit at fixed ids. SeqIO tasks use this
object as the vocabulary of every feature, so text features tokenize straight
into the shared id space.

`decode`/`decode_tf` return the text of the text ids only (seqio semantics:
through the first `<eos>`); `render` shows every token, specials by name and
images as `<img:N>` runs, for logs and debugging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError
from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.text_tokenizer import META, TextTokenizer

TEXT_MODEL = "text.model"
LAYOUT_FILE = "layout.json"
HF_TEXT_JSON = "text.json"  # In place of text.model: see hf_text_tokenizer.py.


def vocabulary_files(directory: str) -> tuple[str, str]:
    """The two files that make the vocabulary in `directory` (what a copy of it copies and
    a comparison compares): `layout.json` and its text model, `text.model` or, for an
    imported Chameleon vocabulary, `text.json`. `text.model` where neither exists (the
    caller's missing-file error names it)."""
    has_json = (not fs.exists(os.path.join(directory, TEXT_MODEL))
                and fs.exists(os.path.join(directory, HF_TEXT_JSON)))
    return LAYOUT_FILE, HF_TEXT_JSON if has_json else TEXT_MODEL


@gin.configurable
class MultimodalVocabulary(seqio.Vocabulary):
    """Text pieces, image codes and special tokens in one id space.

    A vocabulary is a directory: `text.model` (SentencePiece) and `layout.json`
    (the `IdLayout` fields other than the text size, which the model fixes).
    Make one with `MultimodalVocabulary.create`; open it by its path.
    """

    def __init__(self, directory: str | Callable[[], str] = gin.REQUIRED):
        """Opens the vocabulary in `directory`, read when first needed.

        Args:
          directory: the vocabulary's folder, or a function returning it (for
            tasks registered at import time, before gin has set the path).
        """
        super().__init__(extra_ids=0)
        self._directory = directory
        self._loaded_from: str | None = None
        self._loaded: dict[str, Any] = {}

    @classmethod
    def create(cls, directory: str, text_tokenizer: TextTokenizer, *,
               image_codes: int = 8192,
               num_sentinels: int = 512,
               image_length: int = 1024,
               pad_to_multiple: int = 128) -> "MultimodalVocabulary":
        """Writes a vocabulary to `directory` and opens it.

        Args:
          directory: where `text.model` and `layout.json` go.
          text_tokenizer: a trained `TextTokenizer`; its size fixes the text range.
          image_codes: size of the image tokenizer's codebook.
          num_sentinels: CM3 sentinels `<sentinel:0..num_sentinels-1>`.
          image_length: codes per image.
          pad_to_multiple: round the total size up to a multiple of this.
        """
        args = dict(image_codes=image_codes, num_sentinels=num_sentinels,
                    image_length=image_length, pad_to_multiple=pad_to_multiple)
        layout_lib.IdLayout(text_size=text_tokenizer.vocab_size, **args)  # Validates.
        fs.makedirs(directory)
        text_tokenizer.save(os.path.join(directory, TEXT_MODEL))
        with fs.open(os.path.join(directory, LAYOUT_FILE), "w") as f:
            json.dump(args, f, indent=2, sort_keys=True)
        return cls(directory)

    # Read on first use, as seqio's own vocabularies do, so that tasks can be
    # registered before the vocabulary has been made.
    @property
    def directory(self) -> str:
        d = self._directory
        return d() if callable(d) else d

    def _cached(self, name: str, load: Callable[[], Any]) -> Any:
        """`load()`, once per directory: a task's vocabulary follows its gin-bound folder when
        a later run in the same process binds another (it would keep the first one's)."""
        directory = self.directory
        if directory != self._loaded_from:
            self._loaded_from, self._loaded = directory, {}
        if name not in self._loaded:
            self._loaded[name] = load()
        return self._loaded[name]

    @property
    def text_tokenizer(self) -> TextTokenizer:
        return self._cached("text_tokenizer", self._load_text_tokenizer)

    def _load_text_tokenizer(self) -> TextTokenizer:
        # An imported vocabulary (Chameleon's) keeps its tokenizers file: `text.json`.
        text = vocabulary_files(self.directory)[1]
        if text == HF_TEXT_JSON:
            from cm3leon_jax.vocab.hf_text_tokenizer import HFTextTokenizer
            return HFTextTokenizer.load(os.path.join(self.directory, text))
        return TextTokenizer.load(os.path.join(self.directory, text))

    @property
    def layout(self) -> layout_lib.IdLayout:
        return self._cached("layout", self._load_layout)

    def _load_layout(self) -> layout_lib.IdLayout:
        path = os.path.join(self.directory, LAYOUT_FILE)
        if not fs.exists(path):
            raise MissingInputError(
                f"no {LAYOUT_FILE} in {self.directory!r}: not a vocabulary directory. "
                "Preprocessing writes one as <its MODEL_DIR>/vocab (rerun "
                "gin_configs/runs/preprocess.gin or preprocess_user.gin into that folder if "
                "it stopped before); in code, MultimodalVocabulary.create(...) makes one.")
        with fs.open(path) as f:
            args = json.load(f)
        return layout_lib.IdLayout(text_size=self.text_tokenizer.vocab_size, **args)

    @property
    def fingerprint(self) -> str:
        """A digest of what the ids mean (the text model's bytes and the layout): equal for
        equal vocabularies wherever they are stored, different for a text model trained on
        other data even at the same size. Trainers record it (train/vocab_record.py)."""
        h = hashlib.sha256(self.text_tokenizer.model_proto)
        h.update(json.dumps(dataclasses.asdict(self.layout), sort_keys=True).encode())
        return h.hexdigest()[:16]

    # seqio.Vocabulary interface.
    @property
    def eos_id(self) -> int:
        return layout_lib.EOS_ID

    @property
    def pad_id(self) -> int:
        return layout_lib.PAD_ID

    @property
    def unk_id(self) -> int:
        return layout_lib.UNK_ID

    @property
    def bos_id(self) -> None:
        return None

    @property
    def prompt_start_id(self) -> int:
        """The token every sequence the model was trained on opens with, so every prompt
        too (`decode/prompts.opened`), every training sequence (`train/data.opening_id`) and
        an HF export's `bos_token_id`: for an imported Chameleon vocabulary (`text.json`
        whose file names no sentinels), Chameleon's own `<s>`, which the import holds as
        `<sentinel:0>` (`export/chameleon_vocab.py`); for every other, our `<eos>` (a
        `text.json` that names sentinels is our own HF export's layout, read back)."""
        return self._cached("prompt_start_id", self._find_prompt_start)

    @property
    def cm3_sentinels(self) -> int:
        """How many `<sentinel:i>` CM3 may mask spans with: the layout's, or none where the
        one sentinel an imported Chameleon vocabulary has holds its `<s>`
        (`prompt_start_id`; Chameleon trained left to right, with no spans)."""
        n = self.layout.num_sentinels
        return 0 if n and self.prompt_start_id == self.layout.sentinel_id(0) else n

    def _find_prompt_start(self) -> int:
        tok = self.text_tokenizer
        if isinstance(tok, TextTokenizer):
            return layout_lib.EOS_ID
        from cm3leon_jax.vocab.hf_text_tokenizer import classify, start_is_sentinel_0
        _, special, _ = classify(json.loads(tok.model_proto))
        return self.layout.sentinel_id(0) if start_is_sentinel_0(special) else layout_lib.EOS_ID

    @property
    def _base_vocab_size(self) -> int:
        return self.layout.vocab_size

    def _encode(self, s: str) -> Sequence[int]:
        return self.layout.text_to_ids(self.text_tokenizer.encode(s)).tolist()

    def _decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        text = ids[self.layout.is_text(ids)]
        return self.text_tokenizer.decode(self.layout.ids_to_text(text))

    @property
    def _tf_tokenizer(self):
        return self._cached("tf_tokenizer", self._load_tf_tokenizer)

    def _load_tf_tokenizer(self):
        if not isinstance(self.text_tokenizer, TextTokenizer):
            raise NotImplementedError(f"the vocabulary {self.directory!r} has a tokenizers "
                                      "text.json: it serves generation, not TF data pipelines "
                                      "(those need a SentencePiece text.model).")
        import tensorflow_text as tf_text  # Imported lazily: slow, TF-only.
        return tf_text.SentencepieceTokenizer(
            model=self.text_tokenizer.model_proto, out_type=tf.int32)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        tokenizer = self._tf_tokenizer
        meta_ids = self.text_tokenizer.meta_byte_ids
        if meta_ids is None:  # No byte fallback: SentencePiece's ids, as `encode` gives.
            return tokenizer.tokenize(s) + self.layout.text_start
        return _tokenize_keeping_meta(tokenizer, s, meta_ids) + self.layout.text_start

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids, tf.int32)
        is_text = ((ids >= self.layout.text_start)
                   & (ids < self.layout.image_start))
        if ids.shape.rank == 1:
            text = tf.boolean_mask(ids, is_text) - self.layout.text_start
        else:
            text = tf.ragged.boolean_mask(ids, is_text) - self.layout.text_start
        return self._tf_tokenizer.detokenize(text)

    def __eq__(self, other) -> bool:
        return (isinstance(other, MultimodalVocabulary)
                and self.layout == other.layout
                and self.text_tokenizer.model_proto
                == other.text_tokenizer.model_proto)

    def __hash__(self) -> int:
        return hash(self.layout)  # Consistent with __eq__: equal ones share it.

    def __repr__(self) -> str:
        l = self.layout
        return (f"MultimodalVocabulary(size={l.vocab_size}, text={l.text_size}, "
                f"image_codes={l.image_codes}, sentinels={l.num_sentinels}, "
                f"directory={self.directory!r})")

    # Beyond seqio.
    def render(self, ids) -> str:
        """Every token made visible: text, `<break>`-style names, `<img:N>` runs."""
        ids = self.layout.check_ids(ids)
        out, i = [], 0
        while i < len(ids):
            j = i
            if self.layout.is_text(ids[i]):
                while j < len(ids) and self.layout.is_text(ids[j]):
                    j += 1
                out.append(self.text_tokenizer.decode(
                    self.layout.ids_to_text(ids[i:j])))
            elif self.layout.is_image(ids[i]):
                while j < len(ids) and self.layout.is_image(ids[j]):
                    j += 1
                out.append(f"<img:{j - i}>")
            else:
                out.append(self.layout.special_name(int(ids[i])))
                j = i + 1
            i = j
        return "".join(out)


def _tokenize_keeping_meta(tokenizer, s: tf.Tensor, meta_ids: Sequence[int]):
    """`tokenizer.tokenize(s)` with each U+2581 as its byte pieces `meta_ids`.

    The TF twin of `TextTokenizer.encode`: SentencePiece would read U+2581 as a
    space, so the text is split on it, each part tokenized, and the byte pieces
    put before every part but the first. A graph op, for tf.data maps.
    """
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
        return _tokenize_keeping_meta(tokenizer, s[None], meta_ids)[0]
    parts = tf.strings.split(s, META)  # [..., (parts)]; "" parts kept, as str.split.
    tokens = tokenizer.tokenize(parts.flat_values)  # [part, (ids)]
    inner = tf.RaggedTensor.from_row_splits(parts.flat_values, parts.nested_row_splits[-1])
    rows = inner.value_rowids()
    later = tf.range(tf.size(rows, rows.dtype), dtype=rows.dtype) > tf.gather(
        inner.row_starts(), rows)  # Every part of its string but the first.
    meta = tf.constant(meta_ids, tf.int32)
    prefix = tf.RaggedTensor.from_row_lengths(
        tf.tile(meta, [tf.math.count_nonzero(later, dtype=tf.int32)]),
        tf.cast(later, tokens.row_splits.dtype) * len(meta_ids))
    pieces = tf.concat([prefix, tokens], axis=1)
    rank = s.shape.rank
    return parts.with_flat_values(pieces).merge_dims(rank, rank + 1)
