"""Generation APIs: captions -> images and images -> captions, optionally retrieval-augmented.

    vocab = MultimodalVocabulary("runs/demo/data/vocab")
    config, params, _ = restore_decoder("runs/demo/pretrain", vocab=vocab)  # checks it is its own
    gen = Generator(config, params, vocab, image_tokenizer, retriever=Retriever.open(...))
    out = gen.text_to_image(["a red circle"], num_samples=4)   # out.images uint8[4, s, s, 3]
    texts = gen.image_to_text(images)                          # one string per image
    out = gen.text_to_image(["a red star"], negative_captions=["a red circle"])  # not that

Each prompt is repeated `num_samples` times (outputs are prompt-major: prompt i, sample j
at i * num_samples + j); with a retriever, each prompt's `num_retrieved` best documents
go in front of it as `doc <eos>` (the paper uses 2). Prompts run in fixed batches of
`batch_size` rows and lengths rounded up to `prompt_multiple`, so a long list compiles
the sampler once; row ids are global, so results do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, NamedTuple, Sequence

import gin
import jax
import numpy as np

from cm3leon_jax.data import augment, sft_prompts
from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import prompts as prompts_lib
from cm3leon_jax.decode import rerank, restore, sampler
from cm3leon_jax.errors import UserInputError, check_count
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decode_step import DecoderStep
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

GUIDANCE = ("none", "cfg", "cdk")

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each token is chosen.

    greedy: the most likely token (temperature, top_k and top_p are then unused).
    temperature, top_k (0: off), top_p (1.0: off): reshape the distribution, in that order.
    guidance: "none"; "cfg" (classifier-free guidance, `guidance_scale`; paper 3-5);
        "cdk" (contrastive decoding over the `cdk_k`-th largest probability times
        `cdk_alpha`). Both run an unconditional stream beside the prompt.
    negative_scale: with negative captions (`Generator.text_to_image(negative_captions=)`,
        "cfg" only), a third stream runs on them and the three merge as
        `uncond + guidance_scale * (negative - uncond) + negative_scale * (prompt - negative)`
        (`TwoScaleGuidance`): pushed toward the prompt's content as CFG does and, harder,
        away from what the negative says instead. `negative_scale = guidance_scale` is CFG
        without the negative; `guidance_scale = 1` the usual negative prompt,
        `negative + negative_scale * (prompt - negative)`.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    guidance: str = "cfg"
    guidance_scale: float = 3.0
    cdk_alpha: float = 0.5
    cdk_k: int = 1
    negative_scale: float = 6.0

    def __post_init__(self):
        if self.guidance not in GUIDANCE:
            raise UserInputError(f"SamplingConfig.guidance={self.guidance!r}; use one of "
                                 f"{GUIDANCE}.")
        # Checked here, where gin builds it (before any model is restored), by the names a
        # user binds; the logits processors check the same again for direct callers.
        bad = ([f"temperature={self.temperature} (> 0; greedy=True for the zero limit)"]
               if not self.greedy and not self.temperature > 0 else [])
        bad += [f"top_k={self.top_k} (>= 0; 0 is off)"] if self.top_k < 0 else []
        bad += [f"top_p={self.top_p} (in (0, 1]; 1 is off)"] if not 0 < self.top_p <= 1 else []
        bad += ([f"cdk_alpha={self.cdk_alpha} (in [0, 1])"]
                if self.guidance == "cdk" and not 0 <= self.cdk_alpha <= 1 else [])
        bad += [f"cdk_k={self.cdk_k} (>= 1)"] if self.guidance == "cdk" and self.cdk_k < 1 else []
        bad += [f"{name}={value} (a finite number)" for name, value in
                (("guidance_scale", self.guidance_scale), ("negative_scale", self.negative_scale))
                if not math.isfinite(value)]
        if bad:
            raise UserInputError("SamplingConfig " + "; ".join(bad) + ": bind values in range "
                                 "(a run file may scope it: images/SamplingConfig.top_p, ...).")

    @property
    def num_streams(self) -> int:
        return 1 if self.guidance == "none" else 2

    def processors(self, constraint: Any, negative: bool = False) -> tuple:
        """constraint, then guidance, then the reshaping of the merged distribution;
        `negative`: the three streams [prompt, negative, unconditional] of CFG with
        negative captions."""
        chain = [constraint]
        if negative:
            if self.guidance != "cfg":
                raise UserInputError(f"negative captions need guidance='cfg', got "
                                     f"SamplingConfig.guidance={self.guidance!r}: set it to "
                                     "'cfg' or leave the negatives out.")
            chain.append(proc.TwoScaleGuidance(self.guidance_scale, self.negative_scale))
        elif self.guidance == "cfg":
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


def tokenizer_mismatch(image_tokenizer: Any, layout: Any) -> str | None:
    """How an image tokenizer's codes differ from those the vocabulary `layout` holds (codes
    per image, codebook size), or None when they fit (or there is no tokenizer)."""
    if image_tokenizer is None:
        return None
    got = (image_tokenizer.codes_per_image, image_tokenizer.codebook_size)
    if got == (layout.image_length, layout.image_codes):
        return None
    return (f"the image tokenizer makes {got[0]} codes per image from {got[1]}, the "
            f"vocabulary expects {layout.image_length} from {layout.image_codes}")


@gin.configurable(allowlist=["neighbors_in_query_order", "guidance_keeps_documents",
                             "cpu_kernels"])
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
      neighbors_in_query_order: lay each retrieved caption-and-image document out in the
        prompt's order (image first before an image, caption first before a caption) as
        pretraining did with `retrieval_augment.neighbors_in_query_order`; serve a model
        the way it was trained.
      guidance_keeps_documents: with CFG or CD-K, the unconditional stream of a
        text -> image or image -> text prompt is the same retrieved documents followed
        by the masked query (one reading of the paper's "the text replaced by a mask
        sentinel"), so guidance pushes toward the query given the documents. False (the
        default): the masked query alone, which also pushes toward what the documents
        show, at the caption's scale. On the demo decoder the two are inside each other's
        seed spread (RESULTS_train.md).
      cpu_kernels: decode through `DecoderStep(config, cpu_kernels=True)`, the CPU kernel that
        streams the weights about twice as fast as XLA:CPU's dot, and find top-p's threshold
        with its kernel (`TopP(cpu_kernel=True)`) (one CPU device, a C++ compiler on the
        host; `model/cpu_kernels.py`).
    """

    def __init__(self, config: DecoderConfig, params: Any, vocab: MultimodalVocabulary,
                 image_tokenizer: Any = None, retriever: Any = None, batch_size: int = 8,
                 prompt_multiple: int = 64, neighbors_in_query_order: bool = False,
                 guidance_keeps_documents: bool = False, cpu_kernels: bool = False):
        layout = vocab.layout
        mismatch = config.vocabulary_mismatch(layout)
        if mismatch:
            raise ValueError(f"{mismatch}: this is not the vocabulary the model was trained "
                             "with.")
        mismatch = tokenizer_mismatch(image_tokenizer, layout)
        if mismatch:
            raise ValueError(f"{mismatch}: use the tokenizer the data was made with.")
        check_count("batch_size", batch_size)
        check_count("prompt_multiple", prompt_multiple)
        if getattr(retriever, "directory", None):  # Its documents' ids must be this vocab's.
            restore.check_retrieval_vocabulary(retriever.directory, vocab,
                                               names=("the retriever's folder", "the vocabulary"))
        self.config, self.params, self.vocab = config, params, vocab
        self.layout, self.image_tokenizer, self.retriever = layout, image_tokenizer, retriever
        self.batch_size, self.prompt_multiple = batch_size, prompt_multiple
        self.neighbors_in_query_order = neighbors_in_query_order
        self.guidance_keeps_documents = guidance_keeps_documents
        self.model = DecoderStep(config, cpu_kernels=cpu_kernels)

    def text_to_image(self, captions: Sequence[str], *, num_samples: int = 1,
                      num_retrieved: int = 2, sampling: SamplingConfig | None = None,
                      seed: int = 0, ranker: Any = None,
                      negative_captions: Sequence[str] | None = None,
                      first_row: int = 0) -> Images:
        """Each caption -> `num_samples` images of exactly `image_length` codes; with a
        `ranker` (rerank.py, e.g. a CLIP score) only the best of each caption's samples.

        negative_captions: one per caption, what its image should not be (with CFG; see
        `SamplingConfig.negative_scale`); each runs after the caption's own retrieved
        documents, so that guidance contrasts the two texts alone.
        first_row: the random stream of caption i's sample j is row `first_row + i *
        num_samples + j` of `seed`'s; a long list drawn in parts, each part starting where
        the last ended, gives what one call would (`rerank.best_of`).
        """
        captions = _checked_texts(captions, "caption")
        if negative_captions is not None:
            negative_captions = _checked_texts(negative_captions, "negative caption")
            if len(negative_captions) != len(captions):
                raise ValueError(f"{len(negative_captions)} negative captions for "
                                 f"{len(captions)} captions: give one for each caption.")
        sampling = SamplingConfig() if sampling is None else sampling
        constraint = proc.ImageCodesOnly(self.layout)
        retrieved = self._retrieve(num_retrieved,
                                   lambda k: self.retriever.search_texts(captions, k))
        def query(text):
            return prompts_lib.text_to_image(np.asarray(self.vocab.encode(text), np.int32))

        negatives = None if negative_captions is None else [query(c) for c in negative_captions]
        uncond = prompts_lib.text_to_image_unconditional(self.layout)
        tokens = self._run([query(c) for c in captions], retrieved, uncond, constraint,
                           sampling, num_samples, seed, what="caption", negatives=negatives,
                           first_row=first_row)
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
        if style == "infill":
            self._check_infill("image_to_text(style='infill')", "style='image_first'")
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
        # A jax array of codes is codes too (np.asarray: no copy on the host).
        arr = np.asarray(images) if isinstance(images, (np.ndarray, jax.Array)) else None
        if arr is not None and arr.ndim == 2 and arr.dtype == np.uint8:
            # uint8 is how pixels come; codes are int32 (ImageTokenizer.encode's).
            raise UserInputError(
                f"images is one uint8 array of shape {arr.shape}: one grayscale image, or "
                f"image codes? Give pixels as a batch uint8[n, h, w, 3] (or a list of "
                f"images), codes as int32[n, {self.layout.image_length}].")
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
        check_count("num_retrieved", k, 0)
        if not k or self.retriever is None:
            return None
        results = search(k)
        return [[self.layout.check_ids(t, "a retrieved document") for t in r.token_ids]
                for r in results]

    def _run(self, queries: list[np.ndarray], retrieved, uncond: np.ndarray, constraint,
             sampling: SamplingConfig, num_samples: int, seed: int, what: str,
             negatives: list[np.ndarray] | None = None, first_row: int = 0
             ) -> list[np.ndarray]:
        """Every query x num_samples through the sampler; each row's tokens, stop included.
        `negatives`: a query each, run after the same documents as a third stream."""
        check_count("num_samples", num_samples)
        budget = self._prompt_budget(constraint)
        # Per sample: the prompt, its negative (if any) and its unconditional stream.
        rows, negative_rows, unconditional = [], [], []
        for i, q in enumerate(queries):
            docs = retrieved[i] if retrieved is not None else []
            if self.neighbors_in_query_order:
                docs = [document_lib.in_order_of(d, q, self.layout) for d in docs]
            rows += [prompts_lib.with_retrieved(q, docs, budget, f"{what} {i}")] * num_samples
            if negatives is not None:
                negative_rows += [prompts_lib.with_retrieved(
                    negatives[i], docs, budget, f"negative {what} {i}")] * num_samples
            if self.guidance_keeps_documents:  # The documents the prompt kept, if any.
                kept = augment.neighbors_that_fit(q.size, docs, budget)
                unconditional += [prompts_lib.with_retrieved(uncond, kept, budget,
                                                             f"{what} {i}")] * num_samples
            else:
                unconditional += [uncond] * num_samples
        streams = [rows] + [negative_rows] * (negatives is not None)
        streams += [unconditional] * (sampling.num_streams == 2)
        return self._sample_rows(streams, constraint,
                                 sampling.processors(constraint, negatives is not None),
                                 sampling.greedy, seed, first_row)

    # -- SFT families (the sft engineer's block) ------------------------------------------
    # Each prompt comes from data/sft_prompts.py, the builder the SFT tasks were trained
    # on. Guidance streams mask the prompt's inputs with sentinels: CFG / CD-K run the
    # full prompt beside the one with every input masked; editing runs three streams
    # (full, image only, neither) merged by TwoScaleGuidance.

    def edit(self, images: Any, instructions: Sequence[str], *, num_samples: int = 1,
             sampling: SamplingConfig | None = None, image_scale: float = 1.5,
             text_scale: float = 7.5, seed: int = 0) -> Images:
        """Each image edited by its instruction (paper: image scale 1.5, text scale 7.5;
        `sampling.guidance='none'` turns guidance off)."""
        codes, _ = self._image_codes(images)
        instructions = _texts(instructions, len(codes), "instruction")
        prompts = [sft_prompts.edit(c, t) for c, t in zip(codes, instructions)]
        return self._family_images(prompts, instructions, sampling, num_samples, seed,
                                   two_scale=(image_scale, text_scale))

    def grounded(self, condition_images: Any, captions: Sequence[str], *,
                 condition: str = "edge", num_samples: int = 1,
                 sampling: SamplingConfig | None = None, seed: int = 0) -> Images:
        """Images from condition maps (`condition` in sft_prompts.CONDITIONS) and captions."""
        codes, _ = self._image_codes(condition_images)
        captions = _texts(captions, len(codes), "caption")
        prompts = [sft_prompts.condition_to_image(condition, c, t)
                   for c, t in zip(codes, captions)]
        return self._family_images(prompts, captions, sampling, num_samples, seed)

    def boxes_to_image(self, captions: Sequence[str], boxes: Sequence[Sequence[str]], *,
                       num_samples: int = 1, sampling: SamplingConfig | None = None,
                       seed: int = 0) -> Images:
        """Images of captions with each object at its box; boxes: per caption, phrases
        'red circle at (x0,y0,x1,y1)' (pixels, ends exclusive)."""
        captions = _texts(captions, len(boxes), "caption")
        prompts = [sft_prompts.boxes_to_image(c, list(b)) for c, b in zip(captions, boxes)]
        return self._family_images(prompts, captions, sampling, num_samples, seed)

    def how_to_write(self, texts: Sequence[str], *, num_samples: int = 1,
                     sampling: SamplingConfig | None = None, seed: int = 0) -> Images:
        """Images of each text written out."""
        texts = _texts(texts, len(texts), "text")
        return self._family_images([sft_prompts.how_to_write(t) for t in texts], texts,
                                   sampling, num_samples, seed)

    def segment(self, images: Any, phrases: Sequence[str], *, num_samples: int = 1,
                sampling: SamplingConfig | None = None, seed: int = 0) -> Images:
        """The mask image (white object on black) of the object each phrase names."""
        codes, _ = self._image_codes(images)
        phrases = _texts(phrases, len(codes), "phrase")
        prompts = [sft_prompts.segment(c, p) for c, p in zip(codes, phrases)]
        return self._family_images(prompts, phrases, sampling, num_samples, seed)

    def vqa(self, images: Any, questions: Sequence[str], *, max_tokens: int = 16,
            sampling: SamplingConfig | None = None, seed: int = 0) -> list[str]:
        """Each image's answer to its question."""
        codes, _ = self._image_codes(images)
        questions = _texts(questions, len(codes), "question")
        prompts = [sft_prompts.vqa(c, q) for c, q in zip(codes, questions)]
        return self._family_texts(prompts, sampling, max_tokens, seed)

    def describe(self, images: Any, *, long: bool = False, max_tokens: int = 48,
                 sampling: SamplingConfig | None = None, seed: int = 0) -> list[str]:
        """Each image's caption in the SFT captioning layout (`long`: the detailed one)."""
        codes, _ = self._image_codes(images)
        prompts = [sft_prompts.caption(c, long=long) for c in codes]
        return self._family_texts(prompts, sampling, max_tokens, seed)

    def infill_text(self, befores: Sequence[str], afters: Sequence[str], images: Any, *,
                    max_tokens: int = 16, sampling: SamplingConfig | None = None,
                    seed: int = 0) -> list[str]:
        """The text missing between `before` and `after` in `before ___ after <break>
        image`: a CM3 infill (`<sentinel:0>` in place, generated after the sequence)."""
        self._check_infill("infill_text", "image_to_text(style='image_first')")
        codes, _ = self._image_codes(images)
        for what, texts in (("before", befores), ("after", afters)):
            if isinstance(texts, str) or len(texts) != len(codes):
                raise ValueError(f"infill_text takes a list of {what} texts, one per image ("
                                 f"{len(codes)}); an empty string is allowed.")
        mask = np.array([self.layout.sentinel_id(0)], np.int32)
        queries = []
        for b, a, c in zip(befores, afters, codes):
            text = [np.asarray(self.vocab.encode(s), np.int32) for s in (b, a) if s]
            head = [text[0]] if b else []
            tail = [text[-1]] if a else []
            queries.append(np.concatenate(head + [mask] + tail + [
                [BREAK_ID], self.layout.codes_to_ids(c), mask]).astype(np.int32))
        constraint = proc.TextOnly(self.layout, max_tokens, (EOSS_ID,))
        sampling = CAPTION_SAMPLING if sampling is None else sampling
        tokens = self._sample_streams([queries], constraint,
                                      _unguided(sampling).processors(constraint),
                                      sampling.greedy, 1, seed)
        return [self._text(t) for t in tokens]

    def infill_image(self, images: Any, captions: Sequence[str], rows: tuple[int, int], *,
                     sampling: SamplingConfig | None = None, seed: int = 0) -> Images:
        """Each image with its code rows [rows[0], rows[1]) regenerated as a CM3 infill
        of `caption <break> image`; the other codes are kept."""
        self._check_infill("infill_image", "text_to_image")
        codes, _ = self._image_codes(images)
        captions = _texts(captions, len(codes), "caption")
        grid = int(round(np.sqrt(self.layout.image_length)))
        start, stop = rows[0] * grid, rows[1] * grid
        if not 0 <= rows[0] < rows[1] <= grid:
            raise ValueError(f"rows={rows}: need 0 <= first < last <= {grid} (code rows).")
        mask = np.array([self.layout.sentinel_id(0)], np.int32)
        queries = [np.concatenate([self.vocab.encode(t), [BREAK_ID],
                                   self.layout.codes_to_ids(c[:start]), mask,
                                   self.layout.codes_to_ids(c[stop:]), mask]).astype(np.int32)
                   for t, c in zip(captions, codes)]
        sampling = SamplingConfig() if sampling is None else sampling
        constraint = proc.ImageSpan(self.layout, stop - start)
        tokens = self._sample_streams([queries], constraint,
                                      _unguided(sampling).processors(constraint),
                                      sampling.greedy, 1, seed)
        out = codes.copy()
        for i, t in enumerate(tokens):
            out[i, start:stop] = self.layout.ids_to_codes(t)
        pixels = None if self.image_tokenizer is None else self.image_tokenizer.decode(out)
        return Images(out, pixels, list(captions))

    def _family_images(self, prompts: list, labels: list[str], sampling: SamplingConfig | None,
                       num_samples: int, seed: int,
                       two_scale: tuple[float, float] | None = None) -> Images:
        sampling = SamplingConfig() if sampling is None else sampling
        constraint = proc.ImageCodesOnly(self.layout)
        streams = self._streams(prompts, sampling, two_scale)
        chain = list(_unguided(sampling).processors(constraint))
        if len(streams) == 3:
            chain.insert(1, proc.TwoScaleGuidance(*two_scale))
        elif len(streams) == 2:
            chain = list(sampling.processors(constraint))
        tokens = self._sample_streams(streams, constraint, tuple(chain), sampling.greedy,
                                      num_samples, seed)
        codes = np.stack([self.layout.ids_to_codes(t) for t in tokens])
        images = None if self.image_tokenizer is None else self.image_tokenizer.decode(codes)
        return Images(codes, images, [c for c in labels for _ in range(num_samples)])

    def _family_texts(self, prompts: list, sampling: SamplingConfig | None, max_tokens: int,
                      seed: int) -> list[str]:
        sampling = CAPTION_SAMPLING if sampling is None else sampling
        constraint = proc.TextOnly(self.layout, max_tokens, (EOS_ID, BREAK_ID))
        streams = self._streams(prompts, sampling, None)
        tokens = self._sample_streams(streams, constraint, sampling.processors(constraint),
                                      sampling.greedy, 1, seed)
        return [self._text(t) for t in tokens]

    def _streams(self, prompts: list, sampling: SamplingConfig,
                 two_scale: tuple[float, float] | None) -> list[list[np.ndarray]]:
        """Prompt ids per guidance stream: [full] (+ [image only]) (+ [neither])."""
        def ids(prompt):
            return sft_prompts.prompt_ids(prompt, self.vocab)

        full = [ids(p) for p in prompts]
        if sampling.guidance == "none":
            return [full]
        neither = [ids(p.masked(text=True, image=True)) for p in prompts]
        if two_scale is None:
            return [full, neither]
        return [full, [ids(p.masked(text=True)) for p in prompts], neither]

    def _check_infill(self, what: str, instead: str) -> None:
        """UserInputError where the vocabulary has no CM3 sentinel to infill with (an
        imported Chameleon's: its one sentinel holds `<s>`, and it trained left to right)."""
        if getattr(self.vocab, "cm3_sentinels", 1) == 0:
            raise UserInputError(
                f"{what} is a CM3 infill, and the vocabulary in {self.vocab.directory!r} has "
                f"no CM3 sentinels (an imported Chameleon's, which trained left to right): use "
                f"{instead}.")

    def _text(self, tokens: np.ndarray) -> str:
        text = tokens[self.layout.is_text(tokens)]
        return self.vocab.text_tokenizer.decode(self.layout.ids_to_text(text)).strip()

    def _kernel_chain(self, chain) -> tuple:
        """With the CPU kernels, top-p's threshold through its kernel too (`TopP.cpu_kernel`)."""
        if not self.model.cpu_kernels:
            return tuple(chain)
        return tuple(p.replace(cpu_kernel=True) if isinstance(p, proc.TopP) else p for p in chain)

    def _prompt_budget(self, constraint) -> int:
        """Tokens left for a prompt beside the ones to generate; an error naming the count to
        generate when it leaves none (max_tokens past the model's context)."""
        budget = prompts_lib.room(self.config.max_length, constraint.max_new_tokens)
        if budget < 1:
            raise ValueError(
                f"{constraint.max_new_tokens} tokens to generate leave no room for a prompt in "
                f"the model's {self.config.max_length} (DecoderConfig.max_length): ask for at "
                f"most {self.config.max_length - 2} (max_tokens).")
        return budget

    def _sample_streams(self, streams: list[list[np.ndarray]], constraint, chain: tuple,
                        greedy: bool, num_samples: int, seed: int) -> list[np.ndarray]:
        """Rows of every stream (query-major, `num_samples` each) through the sampler in
        fixed batches; each row's generated tokens, stop included."""
        check_count("num_samples", num_samples)
        budget = self._prompt_budget(constraint)
        for i, row in enumerate(streams[0]):
            if row.size > budget:
                raise ValueError(f"prompt {i} has {row.size} tokens, more than the {budget} the "
                                 "model has room for (DecoderConfig.max_length minus the "
                                 "tokens to generate and the opening <eos>); shorten it.")
        rows = [[r for r in stream for _ in range(num_samples)] for stream in streams]
        return self._sample_rows(rows, constraint, chain, greedy, seed)

    def _sample_rows(self, streams: list[list[np.ndarray]], constraint, chain: tuple,
                     greedy: bool, seed: int, first_row: int = 0) -> list[np.ndarray]:
        """Rows of every stream (each stream's row i goes with the others' row i) through
        the sampler in fixed batches; the first stream's generated tokens, stop included.
        Row i draws from random stream `first_row + i` of `seed`."""
        check_count("seed", seed, 0)
        if seed >= 2 ** 32:  # jax keeps a seed's low 32 bits: 2**32 would be 0.
            raise UserInputError(f"seed={seed}: give a seed in [0, 2**32).")
        budget = self.config.max_length - constraint.max_new_tokens
        key, out, n = jax.random.key(seed), [], len(streams[0])
        chain = self._kernel_chain(chain)
        for start in range(0, n, self.batch_size):
            batch = []
            for stream in streams:  # Stream-major; the last chunk padded to the same shape.
                chunk = [prompts_lib.opened(r, self.vocab.prompt_start_id)
                         for r in stream[start:start + self.batch_size]]
                batch += chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            width = max(r.size for r in batch)
            width = min(-(-width // self.prompt_multiple) * self.prompt_multiple, budget)
            result = sampler.sample(
                self.model, self.params, sampler.left_pad(batch, width), key,
                max_new_tokens=constraint.max_new_tokens, processors=chain, stop=constraint,
                greedy=greedy, num_streams=len(streams),
                row_ids=np.arange(first_row + start, first_row + start + self.batch_size))
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            out += [tokens[j, :lengths[j]] for j in range(min(self.batch_size, n - start))]
        if isinstance(constraint, proc.TextOnly):  # Its stop rule also ends a text at max_tokens.
            cut = sum(int(t[-1]) not in constraint.stop_ids for t in out)
            if cut:
                log.warning("%d of %d texts reached max_tokens=%d before their stop token: "
                            "they may end mid-sentence; raise max_tokens for whole texts.", cut,
                            n, constraint.max_new_tokens)
        return out


def _checked_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"give the {what}s as a list ([{texts[:40]!r}]), not one string (read "
                         "as one text per character).")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError(f"no {what}s given; give a list of at least one.")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"{what} {i} is empty; give a non-empty text.")
    return texts


def _unguided(sampling: SamplingConfig) -> SamplingConfig:
    return dataclasses.replace(sampling, guidance="none")


def _texts(texts: Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"give the {what}s as a list ([{texts[:40]!r}]), not one string (read "
                         "as one text per character).")
    texts = [str(t) for t in texts]
    if len(texts) != n:
        raise ValueError(f"{len(texts)} {what}s for {n} inputs; give one per input.")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"{what} {i} is empty; give a non-empty text.")
    return texts
