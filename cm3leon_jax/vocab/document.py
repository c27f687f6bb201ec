"""Documents: ordered text and image segments, and their id encoding.

A document is what one image-caption pair (or an interleaved page) becomes::

    Document([Text("a red circle"), Image(codes int32[1024])])
      <-> [text ids ...] <break> [1024 image ids]

Consecutive segments are always separated by `<break>` (so two images in a row
stay two images), and a sequence of several documents joins them with `<eos>`:
`doc_1 <eos> doc_2 <eos> ... query`. `decode(encode(doc)) == doc` for every
valid document; ids that cannot be a document give an error that says where.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary


@dataclasses.dataclass(frozen=True)
class Text:
    text: str

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(
                f"a Text segment needs a non-empty str, got {self.text!r}; drop "
                "empty segments before building the Document.")


@dataclasses.dataclass(frozen=True, eq=False)
class Image:
    """An image as its VQ codes, row-major: int32[image_length]."""
    codes: np.ndarray

    def __post_init__(self):
        codes = np.asarray(self.codes)
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise ValueError(
                f"Image codes must be a 1-D integer array, got shape "
                f"{codes.shape} dtype {codes.dtype}; flatten the code grid "
                "row-major first.")
        object.__setattr__(self, "codes", codes.astype(np.int32))

    def __eq__(self, other) -> bool:
        return isinstance(other, Image) and np.array_equal(self.codes, other.codes)

    def __hash__(self) -> int:
        return hash(self.codes.tobytes())


Segment = Union[Text, Image]


@dataclasses.dataclass(frozen=True)
class Document:
    segments: tuple[Segment, ...]

    def __init__(self, segments: Sequence[Segment]):
        segments = tuple(segments)
        if not segments:
            raise ValueError("a Document needs at least one segment.")
        for i, s in enumerate(segments):
            if not isinstance(s, (Text, Image)):
                raise TypeError(
                    f"segment {i} is a {type(s).__name__}; use Text or Image.")
        object.__setattr__(self, "segments", segments)

    @property
    def is_multimodal(self) -> bool:
        kinds = {type(s) for s in self.segments}
        return kinds == {Text, Image}

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.segments if isinstance(s, Text)]

    @property
    def images(self) -> list[np.ndarray]:
        return [s.codes for s in self.segments if isinstance(s, Image)]


def encode(doc: Document, vocab: MultimodalVocabulary) -> np.ndarray:
    """Document -> int32[n] ids: segments joined by `<break>`, no `<eos>`."""
    layout = vocab.layout
    parts = []
    for i, seg in enumerate(doc.segments):
        if i:
            parts.append(np.array([layout_lib.BREAK_ID], np.int32))
        if isinstance(seg, Text):
            parts.append(np.asarray(vocab.encode(seg.text), np.int32))
        else:
            if seg.codes.shape[0] != layout.image_length:
                raise ValueError(
                    f"image segment {i} has {seg.codes.shape[0]} codes; the "
                    f"layout expects image_length={layout.image_length}. Encode "
                    "images with the tokenizer this vocabulary was built for.")
            parts.append(layout.codes_to_ids(seg.codes))
    return np.concatenate(parts)


def decode(ids, vocab: MultimodalVocabulary) -> Document:
    """int[n] ids of one document -> Document; raises if they cannot be one."""
    layout = vocab.layout
    ids = layout.check_ids(ids, "document ids")
    if ids.ndim != 1:
        raise ValueError(f"document ids must be 1-D, got shape {ids.shape}.")
    stray = np.flatnonzero(layout.is_special(ids) & (ids != layout_lib.BREAK_ID))
    if stray.size:
        p = int(stray[0])
        raise ValueError(
            f"document ids hold {layout.special_name(int(ids[p]))} at position "
            f"{p}; a single document has only text, image codes and <break>. "
            "Split a sequence with split_documents() and undo the CM3 transform "
            "first.")
    segments, start = [], 0
    for end in [*np.flatnonzero(ids == layout_lib.BREAK_ID), len(ids)]:
        segments.append(_decode_segment(ids[start:end], start, vocab))
        start = int(end) + 1
    return Document(segments)


def _decode_segment(ids: np.ndarray, offset: int,
                    vocab: MultimodalVocabulary) -> Segment:
    layout = vocab.layout
    if ids.size == 0:
        raise ValueError(
            f"empty segment at position {offset}: <break> must sit between two "
            "segments, never at a document's start, end, or twice in a row.")
    image = layout.is_image(ids)
    if image.all():
        if ids.size != layout.image_length:
            raise ValueError(
                f"truncated image span at position {offset}: {ids.size} codes, "
                f"expected {layout.image_length}. A generated image that stops "
                "early must be completed or dropped before decoding.")
        return Image(layout.ids_to_codes(ids))
    if image.any():
        p = offset + int(np.flatnonzero(image != image[0])[0])
        raise ValueError(
            f"segment at position {offset} mixes text and image ids (switch at "
            f"position {p}) with no <break> between them.")
    return Text(vocab.text_tokenizer.decode(layout.ids_to_text(ids)))


def join_documents(docs: Sequence[np.ndarray]) -> np.ndarray:
    """[ids_1, ..., ids_k] -> ids_1 <eos> ids_2 <eos> ... ids_k."""
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(np.array([layout_lib.EOS_ID], np.int32))
        out.append(np.asarray(d, np.int32))
    return np.concatenate(out) if out else np.zeros([0], np.int32)


def split_documents(ids) -> list[np.ndarray]:
    """Inverse of `join_documents`; padding is dropped, empty pieces skipped."""
    ids = np.asarray(ids, np.int32)
    ids = ids[ids != layout_lib.PAD_ID]
    pieces = np.split(ids, np.flatnonzero(ids == layout_lib.EOS_ID))
    pieces = [p[1:] if p.size and p[0] == layout_lib.EOS_ID else p for p in pieces]
    return [p for p in pieces if p.size]


def in_order_of(doc, query, layout: layout_lib.IdLayout) -> np.ndarray:
    """`doc` laid out in the order `query` opens with: image first when `query`'s first id
    is an image code, text first otherwise.

    Only a document of one text and one image segment is reordered (`caption <break>
    image` <-> `image <break> caption`); any other document comes back as it is. A
    retrieved document in the query's order lets the model copy from it the way it
    writes: after an image that matches the query's, the caption to write comes next.
    """
    doc, query = np.asarray(doc, np.int32), np.asarray(query)
    if not query.size:
        return doc
    breaks = np.flatnonzero(doc == layout_lib.BREAK_ID)
    if breaks.size != 1:
        return doc
    first, second = doc[:breaks[0]], doc[breaks[0] + 1:]
    if not first.size or not second.size:
        return doc
    if layout.is_image(first).all() and layout.is_text(second).all():
        image_first = True
    elif layout.is_text(first).all() and layout.is_image(second).all():
        image_first = False
    else:
        return doc
    if image_first == bool(layout.is_image(query[0])):
        return doc
    return np.concatenate([second, [layout_lib.BREAK_ID], first]).astype(np.int32)
