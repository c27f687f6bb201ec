"""The built-in corpus, example by example, and the views of it each consumer reads.

Example `index` of `split` in a corpus seeded `seed` is `synthetic_example(...)`:
a pure function of those arguments (and the image size), written once here. The
TFDS builder (`synthetic_tfds.py`), the image tokenizer's training images, the
retriever's training pairs and the memory bank's documents all call it, so the
corpus, the tokenizer, the retriever and the bank always describe the same scenes.

    synthetic_example    (split, index) -> id, scene, uint8 image, 4 captions
    synthetic_images     index -> image        (train_image_tokenizer.image_source)
    synthetic_pairs      images + captions     (train_retriever.train_pairs / test_pairs)
    synthetic_documents  SourceDocuments       (build_retrieval.documents)

`document_caption` is the one caption a document of several uses; the preprocess
mode and the memory bank both call it, so token ids and vectors describe one text.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import AnyStr, Callable, Iterator, Sequence

import gin
import numpy as np

from cm3leon_jax.data import shapes, shapes_language


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    doc_id: str  # "{split}_{index:07d}", the TFDS id
    scene: shapes.Scene
    image: np.ndarray  # uint8[s, s, 3]
    captions: list[str]  # four phrasings; see shapes_language.captions


def synthetic_example(split: str, index: int, image_size: int, seed: int = 0,
                      max_objects: int = shapes.MAX_OBJECTS) -> SyntheticExample:
    """Example `index` of `split`: the scene, then its captions, from one Generator."""
    rng = shapes.example_rng(seed, split, index)
    scene = shapes.sample_scene(rng, image_size, max_objects=max_objects)
    return SyntheticExample(f"{split}_{index:07d}", scene, shapes.render(scene),
                            shapes_language.captions(scene, rng))


def document_caption(doc_id: str, captions: Sequence[AnyStr]) -> AnyStr | None:
    """The caption document `doc_id` uses (by crc32 of the id); None if all are blank."""
    texts = [c for c in captions if c.strip()]
    return texts[zlib.crc32(doc_id.encode()) % len(texts)] if texts else None


@gin.configurable
def synthetic_images(image_size: int = 64, split: str = "train", seed: int = 0,
                     num_examples: int | None = None) -> Callable[[int], np.ndarray]:
    """An image source (`index -> uint8[s, s, 3]`, see vocab/image_sources.py).

    Args:
      image_size: side of the rendered scenes (>= 32).
      split: "train", "validation" or "test"; each split draws its own scenes.
      seed: the corpus seed (0 for the registered TFDS configs).
      num_examples: wrap around after this many (the TFDS split size), or None for
        an endless stream of fresh scenes (what a tokenizer wants).
    """
    def source(index: int) -> np.ndarray:
        i = index % num_examples if num_examples else index
        return synthetic_example(split, i, image_size, seed).image

    return source


@gin.configurable
def synthetic_pairs(split: str = "train", num: int = 10_000, image_size: int = 64,
                    seed: int = 0) -> tuple[np.ndarray, list[list[str]]]:
    """(uint8[num, s, s, 3] images, their 4 captions each): examples 0..num-1 of `split`."""
    examples = [synthetic_example(split, i, image_size, seed) for i in range(num)]
    images = np.stack([e.image for e in examples]) if examples else np.zeros(
        (0, image_size, image_size, 3), np.uint8)
    return images, [e.captions for e in examples]


@gin.configurable
def synthetic_documents(split: str = "train", num: int = 10_000, image_size: int = 64,
                        seed: int = 0, data_dir: str | None = None,
                        text_only_fraction: float = 0.0,
                        image_only_fraction: float = 0.0) -> Iterator:
    """Examples 0..num-1 of `split` as `retrieval.build.SourceDocument`s.

    The caption is `document_caption`'s, as in the preprocess mode, so vectors and
    token ids describe the same document. With `data_dir` (the preprocess mode's
    output) each document carries its token ids, and documents preprocessing skipped
    are left out. `*_only_fraction` turn some documents unimodal (by a hash of the id),
    to exercise the modality rule without real data.
    """
    # retrieval imports jax and flax: only when documents are asked for.
    from cm3leon_jax.retrieval.build import SourceDocument
    tokens = None
    if data_dir:
        from cm3leon_jax.data import shards  # TensorFlow: only when asked for
        tokens = shards.read_doc_tokens(data_dir, split)
    empty = np.zeros([0], np.int32)
    for i in range(num):
        doc_id = f"{split}_{i:07d}"
        if tokens is not None and doc_id not in tokens:
            continue  # skipped by preprocessing (its manifest says why)
        example = synthetic_example(split, i, image_size, seed)
        text, image = document_caption(doc_id, example.captions), example.image
        u = zlib.crc32(doc_id.encode() + b"modality") / 2**32
        if u < text_only_fraction:
            image = None
        elif u < text_only_fraction + image_only_fraction:
            text = None
        yield SourceDocument(doc_id, text, image, tokens[doc_id] if tokens is not None else empty)
