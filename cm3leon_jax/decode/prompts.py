"""Prompts in the layout the model was trained on, and their unconditional twins.

    text -> image        [retrieved <eos>]* caption <break>            -> image codes
    image -> text        [retrieved <eos>]* <sentinel:0> <break> image <sentinel:0>
       ("infill")                                                      -> text <eoss>
    image -> text        [retrieved <eos>]* image <break>              -> text <eos>
       ("image_first")

each read after an opening `<eos>`, as every training sequence is (`opened`, which the
Generator and the likelihoods apply to every prompt they run).

Pretraining documents are `caption <break> image` (plus `image <break> caption` when
preprocess.image_first_prob > 0). A model that only saw captions first can still
caption an image through the CM3 objective: a masked caption comes back after the
sequence as `<sentinel:0> caption <eoss>`; that is the "infill" prompt.

The unconditional stream of classifier-free guidance replaces the conditioning segment
(the caption, or the image) by a mask sentinel, as in the paper, and keeps no retrieved
documents: guidance then pushes toward the documents as well as the query. With
`Generator(guidance_keeps_documents=True)` the prompt's documents go in front of it too,
and guidance pushes toward the query given the documents.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from cm3leon_jax.data import augment
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, IdLayout

IMAGE_TO_TEXT_STYLES = ("infill", "image_first")
# Every training sequence opens with `<eos>` (the feature converter's `bos_id`), so every
# prompt the model reads does too (`opened`; the paper's `<eos> caption <break>`): without
# it the prompt's first token sits where training always had `<eos>`, every later one a
# position early, and the model meets a sequence with no opening token. An imported
# Chameleon model opens with its own `<s>` instead (`MultimodalVocabulary.prompt_start_id`).
BOS_ID = EOS_ID


def opened(ids: np.ndarray, start: int | None = BOS_ID) -> np.ndarray:
    """`<eos> ids`: a prompt as the model reads it (see BOS_ID). `start`: the vocabulary's
    `prompt_start_id` (an imported Chameleon model opens with its own `<s>`; None: nothing);
    a prompt that already opens with it (Chameleon's unconditional `<s> <boi>`) is kept."""
    ids = np.asarray(ids, np.int32)
    if start is None or (ids.size and ids[0] == start):
        return ids
    return np.concatenate([[start], ids]).astype(np.int32)


def room(max_length: int, new_tokens: int) -> int:
    """How many tokens a prompt may have (its opening `<eos>` not counted) beside
    `new_tokens` generated ones in a model of `max_length`."""
    return max_length - new_tokens - 1


def with_retrieved(query: np.ndarray, retrieved: Sequence[np.ndarray], budget: int,
                   what: str) -> np.ndarray:
    """`retrieved_1 <eos> ... query`, dropping the least relevant documents to fit `budget`
    (with a warning: the prompt then has fewer documents than asked)."""
    query = np.asarray(query, np.int32)
    retrieved = [np.asarray(r, np.int32) for r in retrieved]
    if query.size > budget:
        raise ValueError(f"{what}: its prompt alone has {len(query)} tokens, more than the "
                         f"{budget} the model has room for (DecoderConfig.max_length minus "
                         "the tokens to generate and the opening <eos>); shorten it.")
    kept = augment.neighbors_that_fit(query.size, retrieved, budget)
    if len(kept) < len(retrieved):
        logging.warning("%s: %d of its %d retrieved documents fit beside its %d-token prompt "
                        "in the %d-token budget; the others are left out.", what, len(kept),
                        len(retrieved), query.size, budget)
    return document_lib.join_documents([*kept, query])  # `augment.assemble` on what fits.


def text_to_image(caption_ids: np.ndarray) -> np.ndarray:
    """`caption <break>`: the next tokens are the image."""
    return np.concatenate([np.asarray(caption_ids, np.int32), [BREAK_ID]]).astype(np.int32)


def text_to_image_unconditional(layout: IdLayout) -> np.ndarray:
    """`<sentinel:0> <break>`: an image whose caption is masked."""
    return np.array([layout.sentinel_id(0), BREAK_ID], np.int32)


def check_style(style: str, setting: str = "style") -> None:
    """Refuses an image-to-text style there is no prompt for; `setting` names where the
    user gave it ("generate.caption_style")."""
    if style not in IMAGE_TO_TEXT_STYLES:
        raise UserInputError(f"{setting}={style!r} is unknown; use one of "
                             f"{IMAGE_TO_TEXT_STYLES} ('infill' for models pretrained on "
                             "caption-first documents, 'image_first' for those pretrained with "
                             "image-first documents too, as the demo's).")


def image_to_text(image_ids: np.ndarray, layout: IdLayout, style: str) -> np.ndarray:
    """The prompt after which the caption of `image_ids` comes."""
    check_style(style)
    image_ids = np.asarray(image_ids, np.int32)
    if style == "infill":
        mask = layout.sentinel_id(0)
        return np.concatenate([[mask, BREAK_ID], image_ids, [mask]]).astype(np.int32)
    return np.concatenate([image_ids, [BREAK_ID]]).astype(np.int32)


def image_to_text_unconditional(layout: IdLayout, style: str) -> np.ndarray:
    """The same prompt with the image masked too."""
    check_style(style)
    if style == "infill":  # CM3 numbers sentinels by position: caption 0, image 1.
        first, second = layout.sentinel_id(0), layout.sentinel_id(1)
        return np.array([first, BREAK_ID, second, first], np.int32)
    return np.array([layout.sentinel_id(0), BREAK_ID], np.int32)


def caption_stop_ids(style: str) -> tuple[int, ...]:
    """Tokens that end a generated caption in each style."""
    check_style(style)
    return (EOSS_ID,) if style == "infill" else (EOS_ID, BREAK_ID)
