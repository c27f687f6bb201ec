"""Generation APIs: captions -> images and images -> captions, optionally retrieval-augmented.

    config, params, _ = restore_decoder("runs/demo/pretrain")
    gen = Generator(config, params, vocab, image_tokenizer, retriever=Retriever.open(...))
    out = gen.text_to_image(["a red circle"], num_samples=4)   # out.images uint8[4, s, s, 3]
    texts = gen.image_to_text(images)                          # one string per image

Each prompt is repeated `num_samples` times (outputs are prompt-major: prompt i, sample j
at i * num_samples + j); with a retriever, each prompt's `num_retrieved` best documents
go in front of it as `doc <eos>` (the paper uses 2). Prompts run in fixed batches of
`batch_size` rows and lengths rounded up to `prompt_multiple`, so a long list compiles
the sampler once; row ids are global, so results do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import gin
import jax
import numpy as np

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import prompts as prompts_lib
from cm3leon_jax.decode import rerank, sampler
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

GUIDANCE = ("none", "cfg", "cdk")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each token is chosen.

    greedy: the most likely token (temperature, top_k and top_p are then unused).
    temperature, top_k (0: off), top_p (1.0: off): reshape the distribution, in that order.
    guidance: "none"; "cfg" (classifier-free guidance, `guidance_scale`; paper 3-5);
        "cdk" (contrastive decoding over the `cdk_k`-th largest probability times
        `cdk_alpha`). Both run an unconditional stream beside the prompt.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    guidance: str = "cfg"
    guidance_scale: float = 3.0
    cdk_alpha: float = 0.5
    cdk_k: int = 1

    def __post_init__(self):
        if self.guidance not in GUIDANCE:
            raise ValueError(f"SamplingConfig.guidance={self.guidance!r}; use one of {GUIDANCE}.")

    @property
    def num_streams(self) -> int:
        return 1 if self.guidance == "none" else 2

    def processors(self, constraint: Any) -> tuple:
        """constraint, then guidance, then the reshaping of the merged distribution."""
        chain = [constraint]
        if self.guidance == "cfg":
            chain.append(proc.ClassifierFreeGuidance(self.guidance_scale))
        elif self.guidance == "cdk":
            chain.append(proc.ContrastiveDecoding(self.cdk_alpha, self.cdk_k))
        if not self.greedy:
            chain.append(proc.Temperature(self.temperature))
            if self.top_k:
                chain.append(proc.TopK(self.top_k))
            if self.top_p < 1.0:
                chain.append(proc.TopP(self.top_p))
        return tuple(chain)


CAPTION_SAMPLING = SamplingConfig(greedy=True, guidance="none")


class Images(NamedTuple):
    """codes: int32[n, image_length] VQ codes; images: uint8[n, s, s, 3] (None without an
    image tokenizer); captions: the caption each row was generated from."""

    codes: np.ndarray
    images: np.ndarray | None
    captions: list[str]


class Generator:
    """A decoder with its vocabulary, image tokenizer and (optional) retriever.

    Args:
      config, params: the decoder (see `restore.restore_decoder`).
      vocab: the vocabulary it was trained with.
      image_tokenizer: turns codes into pixels and images into codes; without one,
        text_to_image returns codes only and image_to_text takes codes.
      retriever: a `Retriever` or `RetrievalClient`, or None for no retrieval.
      batch_size: prompt rows per compiled call. prompt_multiple: prompt lengths are
        rounded up to this (fewer shapes to compile).
    """

    def __init__(self, config: DecoderConfig, params: Any, vocab: MultimodalVocabulary,
                 image_tokenizer: Any = None, retriever: Any = None, batch_size: int = 8,
                 prompt_multiple: int = 64):
        layout = vocab.layout
        if layout.vocab_size > config.vocab_size:
            raise ValueError(f"the vocabulary has {layout.vocab_size} ids but "
                             f"DecoderConfig.vocab_size={config.vocab_size}: this is not the "
                             "vocabulary the model was trained with.")
        if image_tokenizer is not None and image_tokenizer.codes_per_image != layout.image_length:
            raise ValueError(f"the image tokenizer makes {image_tokenizer.codes_per_image} codes "
                             f"per image, the vocabulary expects image_length="
                             f"{layout.image_length}: use the tokenizer the data was made with.")
        if batch_size < 1 or prompt_multiple < 1:
            raise ValueError(f"batch_size and prompt_multiple must be >= 1, got {batch_size}, "
                             f"{prompt_multiple}.")
        self.config, self.params, self.vocab = config, params, vocab
        self.layout, self.image_tokenizer, self.retriever = layout, image_tokenizer, retriever
        self.batch_size, self.prompt_multiple = batch_size, prompt_multiple

    def text_to_image(self, captions: Sequence[str], *, num_samples: int = 1,
                      num_retrieved: int = 2, sampling: SamplingConfig | None = None,
                      seed: int = 0, ranker: Any = None) -> Images:
        """Each caption -> `num_samples` images of exactly `image_length` codes; with a
        `ranker` (rerank.py, e.g. a CLIP score) only the best of each caption's samples."""
        captions = [str(c) for c in captions]
        for i, c in enumerate(captions):
            if not c.strip():
                raise ValueError(f"caption {i} is empty; give a non-empty text.")
        sampling = SamplingConfig() if sampling is None else sampling
        constraint = proc.ImageCodesOnly(self.layout)
        retrieved = self._retrieve(num_retrieved,
                                   lambda k: self.retriever.search_texts(captions, k))
        queries = [prompts_lib.text_to_image(np.asarray(self.vocab.encode(c), np.int32))
                   for c in captions]
        uncond = prompts_lib.text_to_image_unconditional(self.layout)
        tokens = self._run(queries, retrieved, uncond, constraint, sampling, num_samples, seed,
                           what="caption")
        if any(t.size != self.layout.image_length for t in tokens):
            raise RuntimeError("the sampler returned an image of the wrong length; the "
                               "ImageCodesOnly constraint should make that impossible.")
        codes = np.stack([self.layout.ids_to_codes(t) for t in tokens])
        images = None if self.image_tokenizer is None else self.image_tokenizer.decode(codes)
        out = Images(codes, images, [c for c in captions for _ in range(num_samples)])
        return out if ranker is None else rerank.keep_best(out, num_samples, ranker).images

    def image_to_text(self, images: Any, *, num_samples: int = 1, num_retrieved: int = 2,
                      sampling: SamplingConfig | None = None, max_tokens: int = 32,
                      style: str = "infill", seed: int = 0) -> list[str]:
        """Each image (uint8[n, h, w, 3], or int codes [n, image_length]) -> captions.

        style: "infill" (CM3 masked caption; for caption-first pretraining) or
        "image_first" (`image <break>` then the caption). See prompts.py.
        """
        sampling = CAPTION_SAMPLING if sampling is None else sampling
        codes, pixels = self._image_codes(images)
        constraint = proc.TextOnly(self.layout, max_tokens, prompts_lib.caption_stop_ids(style))
        if num_retrieved and self.retriever is not None and pixels is None:
            raise ValueError("retrieval searches by pixels: pass images, not codes, or "
                             "num_retrieved=0.")
        retrieved = self._retrieve(num_retrieved,
                                   lambda k: self.retriever.search_images(list(pixels), k))
        queries = [prompts_lib.image_to_text(self.layout.codes_to_ids(c), self.layout, style)
                   for c in codes]
        uncond = prompts_lib.image_to_text_unconditional(self.layout, style)
        tokens = self._run(queries, retrieved, uncond, constraint, sampling, num_samples, seed,
                           what="image")
        texts = []
        for t in tokens:
            text = t[self.layout.is_text(t)]
            texts.append(self.vocab.text_tokenizer.decode(self.layout.ids_to_text(text)).strip())
        return texts

    # -- the shared path ------------------------------------------------------------------
    def _image_codes(self, images: Any) -> tuple[np.ndarray, np.ndarray | None]:
        arr = images if isinstance(images, np.ndarray) else None
        if arr is not None and arr.ndim == 2 and arr.dtype.kind in "iu":
            if arr.shape[1] != self.layout.image_length:
                raise ValueError(f"image codes must be int[n, {self.layout.image_length}], "
                                 f"got shape {arr.shape}.")
            return arr.astype(np.int32), None
        if self.image_tokenizer is None:
            raise ValueError("images given as pixels need an image tokenizer; pass "
                             "image_tokenizer= to Generator, or give int codes [n, "
                             f"{self.layout.image_length}].")
        pixels = self.image_tokenizer.preprocess(images)
        return self.image_tokenizer.encode(pixels), pixels

    def _retrieve(self, k: int, search) -> list[list[np.ndarray]] | None:
        if not k or self.retriever is None:
            return None
        results = search(k)
        return [[self.layout.check_ids(t, "a retrieved document") for t in r.token_ids]
                for r in results]

    def _run(self, queries: list[np.ndarray], retrieved, uncond: np.ndarray, constraint,
             sampling: SamplingConfig, num_samples: int, seed: int, what: str) -> list[np.ndarray]:
        """Every query x num_samples through the sampler; each row's tokens, stop included."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        max_new = constraint.max_new_tokens
        budget = self.config.max_length - max_new
        rows = []
        for i, q in enumerate(queries):
            docs = retrieved[i] if retrieved is not None else []
            rows += [prompts_lib.with_retrieved(q, docs, budget, f"{what} {i}")] * num_samples
        chain, streams = sampling.processors(constraint), sampling.num_streams
        key, out = jax.random.key(seed), []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))  # Same shape, no recompiling.
            batch = chunk + [uncond] * self.batch_size if streams == 2 else chunk
            width = max(r.size for r in batch)
            width = min(-(-width // self.prompt_multiple) * self.prompt_multiple, budget)
            result = sampler.sample(
                self.config, self.params, sampler.left_pad(batch, width), key,
                max_new_tokens=max_new, processors=chain, stop=constraint,
                greedy=sampling.greedy, num_streams=streams,
                row_ids=np.arange(start, start + self.batch_size))
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            n = min(self.batch_size, len(rows) - start)
            out += [tokens[j, :lengths[j]] for j in range(n)]
        return out
