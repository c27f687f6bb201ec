"""The `generate` run mode: images for captions and captions for images, written to MODEL_DIR.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/generate.gin \
        --gin.MODEL_DIR="'runs/generated'" --gin.generate.captions="['a red circle']"

Writes
    MODEL_DIR/images/<prompt>_<sample>.png   every generated image
    MODEL_DIR/generated.png                  them in a grid, each under its caption
    MODEL_DIR/generated.json                 [{"caption", "images": [png, ...]}]
    MODEL_DIR/captions.json                  [{"image": path, "captions": [...]}]
    MODEL_DIR/families/, families.json, families.png   the SFT family requests of
                                             `prompts_file` (see generate_families.py)
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import gin
import numpy as np
from PIL import Image as PILImage

from cm3leon_jax import fs
from cm3leon_jax.decode import generate_families, pictures, prompts, rerank, restore
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.train import run_config
from cm3leon_jax.vocab import image_inputs
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one caption per line)."""
    if not fs.isfile(path):
        raise MissingInputError(f"generate.captions_file {path!r} does not exist or is not a "
                                "file; give a UTF-8 text file with one caption per line.")
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"generate.captions_file {path!r} is unreadable ({e}); give a "
                             "UTF-8 text file with one caption per line.") from e


def read_images(paths: Sequence[str]) -> list[PILImage.Image]:
    """The images of `generate.image_files`, decoded and checked now (as the tokenizer will
    read them), so that a bad file is named up front, before the model is restored."""
    images = []
    for path in paths:
        if not fs.isfile(path):
            raise MissingInputError(f"generate.image_files: {path!r} does not exist or is not "
                                    "a file.")
        try:
            with fs.open(path, "rb") as f, PILImage.open(f) as image:
                image.load()
                # In RGB now (16-bit grayscale scaled, transparency over white), as the
                # tokenizer reads pictures.
                images.append(image_inputs.pil_rgb(image))
        except (OSError, PILImage.DecompressionBombError) as e:  # PIL's unreadable-file errors
            raise UserInputError(f"generate.image_files: {path!r} is not a readable image "
                                 f"({e}); give PNG, JPEG or another format PIL reads.") from e
    return images


def write_images(out_dir: str, images: np.ndarray, captions: Sequence[str],
                 num_samples: int) -> list[dict]:
    """PNGs under out_dir/images, a captioned grid, and generated.json; returns its entries."""
    fs.makedirs(os.path.join(out_dir, "images"))
    entries = []
    for i in range(0, len(images), num_samples):
        paths = []
        for j in range(num_samples):
            path = os.path.join("images", f"{i // num_samples:03d}_{j}.png")
            with fs.open(os.path.join(out_dir, path), "wb") as f:
                PILImage.fromarray(images[i + j]).save(f, format="PNG")
            paths.append(path)
        entries.append({"caption": captions[i], "images": paths})
    pictures.grid(images, list(captions), os.path.join(out_dir, "generated.png"),
                  columns=min(8, len(images)))
    fs.write_json(os.path.join(out_dir, "generated.json"), entries, indent=2)
    return entries


def write_captions(path: str, names: Sequence[str], captions: Sequence[str],
                   num_samples: int, extra: Sequence[dict] | None = None) -> list[dict]:
    """captions.json: for each image, its `num_samples` generated captions (+ `extra` keys)."""
    entries = []
    for i, name in enumerate(names):
        entry = {"image": name, "captions": list(captions[i * num_samples:(i + 1) * num_samples])}
        entry.update(extra[i] if extra else {})
        entries.append(entry)
    fs.makedirs(os.path.dirname(fs.abspath(path)))
    fs.write_json(path, entries, indent=2)
    return entries


# What a generate run writes into MODEL_DIR (config.gin aside).
OUTPUTS = ("images", "generated.png", "generated.json", "captions.json", "families",
           "families.json", "families.png")


def clear_earlier_outputs(model_dir: str, overwrite: bool) -> None:
    """Refuses a MODEL_DIR holding an earlier run's outputs (a rerun would leave some of them
    beside its own, e.g. images of captions it no longer has), or with `overwrite` removes
    them first."""
    found = [name for name in OUTPUTS if fs.exists(os.path.join(model_dir, name))]
    if found and not overwrite:
        raise UserInputError(
            f"generate MODEL_DIR {model_dir!r} holds an earlier run's outputs ({', '.join(found)}"
            "): give another MODEL_DIR, or --gin.generate.overwrite=True to replace them.")
    for name in found:
        path = os.path.join(model_dir, name)
        fs.rmtree(path) if fs.isdir(path) else fs.remove(path)


def text_list(texts: str | Sequence[str]) -> list[str]:
    """A gin list of texts or paths; one string (`generate.captions='a red circle'`) is one,
    not one per character."""
    return [texts] if isinstance(texts, str) else [str(t) for t in texts]


def negatives_for(texts: Sequence[str], negative_captions: str | Sequence[str]
                  ) -> list[str] | None:
    """`generate.negative_captions`, one per caption or one for all of them (None: none)."""
    negatives = text_list(negative_captions)
    if not negatives:
        return None
    if not texts:
        raise UserInputError("generate.negative_captions are given without captions: bind "
                             "generate.captions or generate.captions_file too.")
    if len(negatives) not in (1, len(texts)):
        raise UserInputError(f"generate.negative_captions has {len(negatives)} texts for "
                             f"{len(texts)} captions: give one for every caption (in the order "
                             "of generate.captions, then generate.captions_file) or one for all.")
    return negatives * len(texts) if len(negatives) == 1 else negatives


def _draw(gen: Generator, texts: list[str], num_samples: int, num_retrieved: int,
          sampling: SamplingConfig | None, seed: int, rerank_samples: int,
          rerank_with: tuple | None, negatives: list[str] | None = None):
    """Images for the captions -> (Images, samples kept per caption). rerank_with:
    (CLIP folder or None for the retrieval encoder, samplings) keeps the best of
    `rerank_samples` per caption; `negatives`: a negative caption each."""
    if rerank_with is None:
        return gen.text_to_image(texts, num_samples=num_samples, num_retrieved=num_retrieved,
                                 sampling=sampling, seed=seed,
                                 negative_captions=negatives), num_samples
    encoder_dir, samplings = rerank_with
    encoder = (DocumentEncoder.load(encoder_dir) if encoder_dir
               else getattr(gen.retriever, "encoder", None))
    if encoder is None:
        raise UserInputError("generate.rerank_samples > 1 scores images with CLIP: bind "
                             "generate.rerank_encoder_dir or a retrieval_dir.")
    best = rerank.best_of(gen, texts, num_samples=rerank_samples, samplings=samplings,
                          ranker=rerank.ClipRanker(encoder), num_retrieved=num_retrieved,
                          seed=seed, negative_captions=negatives)
    return best.images, 1


def _check_settings(texts: Sequence[str], negative_captions: str | Sequence[str],
                    num_samples: int, rerank_samples: int, caption_style: str,
                    image_sampling: SamplingConfig | None) -> list[str] | None:
    """`generate`'s settings checked before the model is restored; returns the negatives."""
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserInputError(f"generate.captions: caption {empty[0]} is empty; give text for "
                             "every caption.")
    if num_samples < 1 or rerank_samples < 1:
        raise UserInputError(f"generate.num_samples={num_samples} and generate.rerank_samples="
                             f"{rerank_samples} must be >= 1.")
    if caption_style not in prompts.IMAGE_TO_TEXT_STYLES:
        raise UserInputError(f"generate.caption_style={caption_style!r}; use one of "
                             f"{prompts.IMAGE_TO_TEXT_STYLES}.")
    negatives = negatives_for(texts, negative_captions)
    if negatives and image_sampling is not None and image_sampling.guidance != "cfg":
        raise UserInputError(f"generate.negative_captions need image_sampling.guidance='cfg', "
                             f"got {image_sampling.guidance!r}: set it or drop the negatives.")
    return negatives


@gin.configurable(denylist=["model_dir"])
def generate(model_dir: str, *, checkpoint: str = gin.REQUIRED, vocab_dir: str | None = None,
             image_tokenizer: Callable = gin.REQUIRED, retrieval_dir: str | None = None,
             data_dir: str | None = None,
             captions: str | Sequence[str] = (), captions_file: str | None = None,
             negative_captions: str | Sequence[str] = (),
             image_files: str | Sequence[str] = (), num_samples: int = 1,
             num_retrieved: int = 2,
             image_sampling: SamplingConfig | None = None,
             caption_sampling: SamplingConfig | None = None, max_caption_tokens: int = 32,
             caption_style: str = "infill", batch_size: int = 8, step: int | None = None,
             seed: int = 0, prompts_file: str | None = None, rerank_samples: int = 1,
             rerank_encoder_dir: str | None = None,
             rerank_samplings: Sequence[SamplingConfig] = (), overwrite: bool = False) -> dict:
    """Generates for the prompts given in gin; returns what it wrote.

    Args:
      model_dir: where the outputs go.
      checkpoint: the trainer's MODEL_DIR; DecoderConfig comes from its config.gin (run_config).
      vocab_dir: the vocabulary folder of the data the model was trained on.
      image_tokenizer: a function returning the ImageTokenizer (`@load_image_tokenizer`).
      retrieval_dir: a built retrieval folder (bank + index + encoder), or None.
      data_dir: the MODEL_DIR of the preprocess run the model was trained on; vocab_dir
        and retrieval_dir default to its vocab/ and retrieval/.
      captions / captions_file: text -> image prompts (a file: one per line).
      negative_captions: what each image should not be, one per caption or one for all
        (CFG's third stream, `Generator.text_to_image`; `image_sampling.negative_scale`).
      image_files: image -> text inputs (any size; resized to the tokenizer's).
      num_samples, num_retrieved: per prompt. image_sampling / caption_sampling: how
        tokens are chosen (None: the Generator's defaults). max_caption_tokens,
        caption_style: see `Generator.image_to_text`. step: checkpoint step (None: newest).
      prompts_file: SFT family requests, one JSON a line (see generate_families.py);
        image_sampling / caption_sampling apply to their image / text outputs.
      rerank_samples: N > 1 draws N images per caption and keeps the best by CLIP score
        (rerank.py; one image per caption, num_samples unused for images), scored by the
        CLIP folder `rerank_encoder_dir` (default: the retrieval folder's encoder);
        `rerank_samplings` mixes samplings (sample j uses [j % K]; default image_sampling).
      overwrite: replace the outputs of an earlier run in MODEL_DIR (otherwise refused).
    """
    texts = text_list(captions) + (read_lines(captions_file) if captions_file else [])
    image_files = text_list(image_files)
    negatives = _check_settings(texts, negative_captions, num_samples, rerank_samples,
                                caption_style, image_sampling)
    images = read_images(image_files)  # Before the (slow) restore: a bad input fails fast.
    if data_dir:
        vocab_dir = vocab_dir or os.path.join(data_dir, "vocab")
        retrieval_dir = retrieval_dir or os.path.join(data_dir, "retrieval")
    if not vocab_dir:
        raise UserInputError("generate needs the training data's vocabulary: bind "
                             "generate.vocab_dir (or generate.data_dir, a preprocess MODEL_DIR).")
    if not texts and not image_files and not prompts_file:
        raise UserInputError("generate has nothing to do: bind generate.captions, "
                             "generate.captions_file, generate.image_files or "
                             "generate.prompts_file.")
    clear_earlier_outputs(model_dir, overwrite)
    config, params, restored_step = restore.restore_decoder(checkpoint, step)
    retriever = Retriever.open(retrieval_dir) if retrieval_dir and num_retrieved else None
    gen = Generator(config, params, MultimodalVocabulary(vocab_dir), image_tokenizer(),
                    retriever, batch_size=batch_size)
    summary = {"checkpoint": checkpoint, "step": restored_step, "retrieval": bool(retriever)}
    if texts:
        rerank_with = None
        if rerank_samples > 1:
            rerank_with = (rerank_encoder_dir, tuple(rerank_samplings) or (image_sampling,))
        out, kept = _draw(gen, texts, num_samples, num_retrieved, image_sampling, seed,
                          rerank_samples, rerank_with, negatives)
        summary["images"] = write_images(model_dir, out.images, out.captions, kept)
    if image_files:
        made = gen.image_to_text(images, num_samples=num_samples, num_retrieved=num_retrieved,
                                 sampling=caption_sampling, max_tokens=max_caption_tokens,
                                 style=caption_style, seed=seed)
        summary["captions"] = write_captions(os.path.join(model_dir, "captions.json"),
                                             list(image_files), made, num_samples)
    if prompts_file:
        summary["families"] = generate_families.generate_families(
            gen, prompts_file, model_dir, num_samples=num_samples,
            image_sampling=image_sampling, text_sampling=caption_sampling, seed=seed)
    print(f"[generate] wrote {model_dir}: {len(texts)} caption(s) -> images, "
          f"{len(image_files)} image(s) -> captions", flush=True)
    return summary


def _check_model_dir(model_dir: str) -> None:
    """Refuses a MODEL_DIR that is, holds or lies inside a folder the run reads."""
    bound = gin.get_bindings(generate)
    run_config.check_apart(model_dir, "generate", {
        f"generate.{name}": bound.get(name)
        for name in ("checkpoint", "data_dir", "vocab_dir", "retrieval_dir")})


generate.check_model_dir = _check_model_dir
