"""The frozen retriever: texts, images and documents -> unit vectors.

    enc = DocumentEncoder.load("runs/clip_tiny/encoder")       # or a HF CLIP folder
    v = enc.embed_texts(["a red circle"])                       # f32[1, d], unit rows
    v = enc.embed_images(images)                                # uint8[b, h, w, 3]
    v, multimodal = enc.embed_documents(texts, images)          # either may be None per doc

A document's vector is the mean of its L2-normalized text and image embeddings
(RA-CM3 / CM3Leon); a text-only or image-only document uses the one it has. The
mean is then renormalized (`renormalize`, on by default) so that every bank vector
has unit norm: inner products are then cosines, the paper's 0.9 relevance
threshold means "near-duplicate" for every pair of documents, and MIPS does not
favor unimodal documents merely for their longer vectors.

With `dropout > 0` (training queries) that fraction of text tokens and image
patches is hidden before encoding (query dropout), drawn from `rng`.

Texts longer than the model's context (32 tokens for the tiny model, 77 for OpenAI's)
are cut to it, as CLIP always does; `encode_texts` says which were, and `embed_texts`
logs one warning per call naming them. A text holding a lone surrogate (valid in JSON's
`\\ud800` escapes, but no character) is refused.

Texts are padded to the model's context and batches to the smallest of a few
sizes (1, 4, 16, 64 up to `batch_size`), so each function compiles at most a few
times and a single query does not pay for a full batch. Calls into the model are
serialized by a lock: XLA already uses every core for one call, and concurrent
calls from server threads would only oversubscribe them.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image as PILImage

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.images import pil_rgb
from cm3leon_jax.retrieval import clip, clip_tokenizer, clip_weights
from cm3leon_jax.retrieval.select import dropout_keep_mask
from cm3leon_jax.train import params_checkpoint

# OpenAI CLIP's pixel statistics; the tiny encoder is trained with the same ones.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def check_image(image: np.ndarray, i: int = 0) -> np.ndarray:
    """Image `i` of a query -> uint8[h, w, 3] (RGB; grayscale repeated, alpha dropped).

    Only uint8 is accepted: a float image (0..1 or 0..255) cast to uint8 would be
    garbage, so it raises UserInputError instead. The local encoder and the HTTP
    client (which sends PNGs) both check with this.
    """
    im = np.asarray(image)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
    if im.ndim != 3 or im.shape[-1] not in (3, 4) or im.dtype != np.uint8:
        raise UserInputError(f"image {i} has shape {im.shape} dtype {im.dtype}; expected "
                             "uint8[h, w, 3] (RGB).")
    if im.shape[-1] == 4:  # Transparency over white, as every image file is read (pil_rgb).
        return np.asarray(pil_rgb(PILImage.fromarray(im, "RGBA")))
    return im


def warn_truncated(truncated: Sequence[bool], context: int | None = None) -> None:
    """Logs one warning naming the texts cut to the encoder's context (`context` tokens,
    where known), if any."""
    cut = [i for i, t in enumerate(truncated) if t]
    if cut:
        logging.warning(
            "%d of %d texts (text %s) are longer than the encoder's %scontext and were cut to "
            "it (CLIP's behavior): only their beginning was encoded.", len(cut),
            len(truncated), ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else ""),
            f"{context}-token " if context else "")


def check_batch(images: Any = None, texts: Any = None) -> None:
    """A batch, not one item: one image array of 3 dims (or 2) would be taken for a batch of
    its rows, one string for a batch of its characters."""
    if isinstance(texts, str):
        raise UserInputError(f"texts is one string ({texts[:40]!r}); give a list of strings "
                             "([text] for one).")
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        raise UserInputError(f"images is one array of shape {images.shape}; give a batch "
                             "uint8[n, h, w, 3] or a list of images ([image] for one).")


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 images (any size) -> f32[b, size, size, 3], center-cropped, resized, normalized."""
    check_batch(images=images)
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, im in enumerate(images):
        im = check_image(im, i)
        h, w = im.shape[:2]
        s = min(h, w)
        im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if s != size:
            im = np.asarray(PILImage.fromarray(im).resize((size, size), PILImage.BICUBIC))
        out[i] = (im.astype(np.float32) / 255.0 - MEAN) / STD
    return out


class DocumentEncoder:
    """A CLIP model with its tokenizer, as a batch-in, unit-vectors-out function."""

    def __init__(self, cfg: clip.ClipConfig, params: dict, tokenizer: clip_tokenizer.Tokenizer,
                 batch_size: int = 64, renormalize: bool = True):
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{cfg.vocab_size}; they belong to different checkpoints.")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.batch_size, self.renormalize = batch_size, renormalize
        self._lock = threading.Lock()
        model = clip.CLIP(cfg)
        self._image_fn = jax.jit(lambda p, x, keep: clip.normalize(
            model.apply({"params": p}, x, keep, method=clip.CLIP.encode_image)))
        self._text_fn = jax.jit(lambda p, t, n: clip.normalize(
            model.apply({"params": p}, t, n, method=clip.CLIP.encode_text)))

    @classmethod
    def load(cls, directory: str, batch_size: int = 64,
             renormalize: bool = True) -> "DocumentEncoder":
        """An encoder folder: a HF-layout CLIP checkpoint plus its tokenizer."""
        cfg, params = clip_weights.load_hf_checkpoint(directory)
        return cls(cfg, params, clip_tokenizer.load_tokenizer(directory), batch_size, renormalize)

    def save(self, directory: str) -> None:
        clip_weights.save_hf_checkpoint(directory, self.cfg, jax.device_get(self.params))
        clip_tokenizer.save_tokenizer(directory, self.tokenizer)

    @property
    def dim(self) -> int:
        return self.cfg.projection_dim

    @functools.cached_property
    def fingerprint(self) -> str:
        """Its config, tokenizer and weights' digest (`params_checkpoint.fingerprint`): what
        gives the vectors, not where it was loaded from. A BPE tokenizer counts by its kind,
        size and end id, not its files. Computed once."""
        tok = self.tokenizer
        describe = getattr(tok, "describe", None)
        identity = {"config": dataclasses.asdict(self.cfg), "tokenizer": {
            "kind": describe() if describe else type(tok).__name__,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}}
        return params_checkpoint.fingerprint(identity, self.params)

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        size = 1
        while size < x.shape[0]:
            size *= 4
        pad = min(size, self.batch_size) - x.shape[0]
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    def embed_texts(self, texts: Sequence[str], dropout: float = 0.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
        """texts -> f32[n, dim] unit vectors; logs one warning if some were cut to the
        context (`encode_texts`)."""
        vectors, truncated = self.encode_texts(texts, dropout, rng)
        warn_truncated(truncated, self.cfg.context_length)
        return vectors

    def encode_texts(self, texts: Sequence[str], dropout: float = 0.0,
                     rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (f32[n, dim] unit vectors, bool[n] truncated: the text had more tokens
        than the context, so only its first context - 1 and its end were encoded)."""
        check_batch(texts=texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise UserInputError(f"text {i} is {t!r}; give a non-empty string.")
            at = clip_tokenizer.lone_surrogate(t)
            if at is not None:
                raise UserInputError(f"text {i} holds a lone surrogate (character {at}), which "
                                     "is not Unicode text; send valid Unicode.")
        token_lists = [self.tokenizer.encode(t) for t in texts]
        truncated = np.array([len(t) > self.cfg.context_length for t in token_lists], bool)
        tokens, lengths = clip_tokenizer.batch_tokens(
            token_lists, self.cfg.context_length, dropout, rng)
        out = np.zeros((len(texts), self.dim), np.float32)
        for a, b in self._chunks(len(texts)):
            lens = self._pad(lengths[a:b])
            lens[b - a:] = 1
            with self._lock:
                got = np.asarray(self._text_fn(self.params, self._pad(tokens[a:b]), lens))
            out[a:b] = got[:b - a]
        return out, truncated

    def embed_images(self, images: np.ndarray | Sequence[np.ndarray], dropout: float = 0.0,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8[n, h, w, 3] (or a list of such images) -> f32[n, dim] unit vectors."""
        pixels = preprocess_images(images, self.cfg.image_size)
        n, p = len(pixels), self.cfg.num_patches
        if dropout > 0:
            if rng is None:
                raise ValueError("query dropout needs an rng (np.random.Generator).")
            keep = dropout_keep_mask(rng, np.full([n], p), p, dropout)
        else:
            keep = np.ones((n, p), bool)
        out = np.zeros((n, self.dim), np.float32)
        for a, b in self._chunks(n):
            with self._lock:
                got = np.asarray(self._image_fn(self.params, self._pad(pixels[a:b]),
                                                self._pad(keep[a:b])))
            out[a:b] = got[:b - a]
        return out

    def embed_modalities(self, texts: Sequence[str | None],
                         images: Sequence[np.ndarray | None], dropout: float = 0.0,
                         rng: np.random.Generator | None = None) -> np.ndarray:
        """Per document (its text or None, its image or None) the unit vector of each:
        f32[n, 2, dim], text then image, zeros where it has none. What `embed_documents`
        averages, and what a search by modality queries with (`select.py`)."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images; give one of each "
                             "per document (None where a document has none).")
        has_text = np.array([t is not None for t in texts], bool)
        has_image = np.array([im is not None for im in images], bool)
        empty = np.flatnonzero(~has_text & ~has_image)
        if empty.size:
            raise ValueError(f"document {int(empty[0])} has neither text nor image.")
        out = np.zeros((len(texts), 2, self.dim), np.float32)
        if has_text.any():
            out[has_text, 0] = self.embed_texts([t for t in texts if t is not None], dropout, rng)
        if has_image.any():
            out[has_image, 1] = self.embed_images([im for im in images if im is not None],
                                                  dropout, rng)
        return out

    def document_vectors(self, modalities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """f32[n, 2, dim] from `embed_modalities` -> (the documents' vectors f32[n, dim]: the
        mean of the vectors they have, renormalized if `renormalize`; bool[n] multimodal)."""
        present = (modalities != 0).any(axis=2)
        vectors = (modalities[:, 0] + modalities[:, 1]) / present.sum(1, dtype=np.float32)[:, None]
        if self.renormalize:
            vectors = np.asarray(clip.normalize(vectors))
        return vectors, present.all(axis=1)

    def embed_documents(self, texts: Sequence[str | None], images: Sequence[np.ndarray | None],
                        dropout: float = 0.0, rng: np.random.Generator | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Per document its text (or None) and image (or None).

        Returns (f32[n, dim], bool[n] multimodal).
        """
        return self.document_vectors(self.embed_modalities(texts, images, dropout, rng))


@functools.lru_cache(maxsize=4)
def cached_encoder(directory: str) -> DocumentEncoder:
    """One encoder per folder per process (the server and the builder share it)."""
    return DocumentEncoder.load(directory)
