"""Our vocabulary as `transformers` tokenizer files (`tokenizer.json` in OUR ids).

    spec = tokenizer_spec(MultimodalVocabulary(vocab_dir))   # a `tokenizers` JSON dict
    write_tokenizer_files(hf_dir, vocab_dir)                 # + tokenizer_config.json

so `PreTrainedTokenizerFast.from_pretrained(hf_dir)` turns text into the ids the exported
model reads. Two kinds of vocabulary folder:

    text.model (SentencePiece unigram, ours): the pieces and scores become a
        `tokenizers` Unigram model with byte fallback; whitespace becomes "▁" with no
        dummy prefix and pieces never cross it, as our SentencePiece is trained
        (`vocab/text_tokenizer.py`); ids shifted to the text range.
    text.json (an imported Chameleon tokenizer): the same file with its ids renumbered
        to our layout (`chameleon_vocab.py`); tokens with no place in it (reserved ones)
        and its post-processor (which adds `<s>`) are dropped.

Specials (`<pad>`, `<eos>`, `<break>`, `<eoss>`, `<sentinel:i>`), image codes
(`IMGIMG...Z`, Chameleon's spelling) and padding ids are added tokens. One difference from
our own `encode`, which reads every string as text: `transformers` turns a special's or a
byte piece's name written in the text ("<eos>", "<0x41>") into that token, as it does for
any SentencePiece conversion (scoring those pieces down does not stop it: the Unigram
lattice prefers one piece to the byte fallback's several). Text without those names gets
our ids exactly.
"""

from __future__ import annotations

import json
from typing import Any

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.export import chameleon_vocab
from cm3leon_jax.export.hf_export import image_token_name
from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

# Our reserved <unk> (4) is renamed: SentencePiece's own "<unk>" is a text piece.
_LAYOUT_UNK = "<layout_unk>"


def _special_names(layout: layout_lib.IdLayout) -> dict[int, str]:
    names = {i: layout.special_name(i) for i in range(layout.text_start)}
    names[layout_lib.UNK_ID] = _LAYOUT_UNK
    names.update({layout.image_start + c: image_token_name(c) for c in range(layout.image_codes)})
    names.update({i: f"<unused:{i}>" for i in range(layout.used_size, layout.vocab_size)})
    return names


def _added(names: dict[int, str]) -> list[dict[str, Any]]:
    return [{"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, n in sorted(names.items())]


def _sentencepiece_spec(vocab: MultimodalVocabulary) -> dict[str, Any]:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(vocab.text_tokenizer.model_proto)
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.UNIGRAM:
        raise UserInputError(f"{vocab.directory}: only unigram SentencePiece models convert to "
                             "tokenizer.json here; this one is not.")
    layout, specials = vocab.layout, _special_names(vocab.layout)
    pieces = [[specials[i], 0.0] for i in range(layout.text_start)]
    pieces += [[p.piece, p.score] for p in proto.pieces]
    pieces += [[specials[i], 0.0] for i in range(layout.image_start, layout.vocab_size)]
    unknown = sp_pb2.ModelProto.SentencePiece.UNKNOWN
    unk = [i for i, p in enumerate(proto.pieces) if p.type == unknown]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(specials),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never",
                          "split": True},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "Unigram", "unk_id": layout.text_start + unk[0] if unk else None,
                  "vocab": pieces, "byte_fallback": True},
    }


def _chameleon_spec(vocab: MultimodalVocabulary) -> dict[str, Any]:
    layout = vocab.layout
    source = chameleon_vocab.build(vocab.text_tokenizer.model_proto, layout.image_length,
                                   f"{vocab.directory}/text.json").source_ids
    spec = json.loads(vocab.text_tokenizer.model_proto)
    new_id = {int(s): i for i, s in enumerate(source[:layout.used_size])}
    spec["model"]["vocab"] = {name: new_id[i] for name, i in spec["model"]["vocab"].items()
                              if i in new_id}
    spec["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens", [])
                            if t["id"] in new_id]
    spec["post_processor"] = None
    return spec


def tokenizer_spec(vocab: MultimodalVocabulary) -> dict[str, Any]:
    """The `tokenizers` JSON of `vocab`, in our ids (see the module doc)."""
    if isinstance(vocab.text_tokenizer, TextTokenizer):
        return _sentencepiece_spec(vocab)
    return _chameleon_spec(vocab)


def write_tokenizer_files(dst: str, vocab_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json for `PreTrainedTokenizerFast`."""
    vocab = MultimodalVocabulary(vocab_dir)
    spec = tokenizer_spec(vocab)
    names = {t["id"]: t["content"] for t in spec["added_tokens"]}
    with fs.open(f"{dst}/tokenizer.json", "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "pad_token": names.get(layout_lib.PAD_ID), "eos_token": names.get(layout_lib.EOS_ID),
              # What prompts open with (the tokenizer adds none: prepend it, as generate does).
              "bos_token": names.get(vocab.prompt_start_id),
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    with fs.open(f"{dst}/tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=1)
