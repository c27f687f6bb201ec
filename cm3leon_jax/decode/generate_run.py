"""The `generate` run mode: images for captions and captions for images, written to MODEL_DIR.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/generate.gin \
        --gin.MODEL_DIR="'runs/generated'" --gin.generate.captions="['a red circle']"

Writes
    MODEL_DIR/images/<prompt>_<sample>.png   every generated image
    MODEL_DIR/generated.png                  the first 64 in a grid, each under its caption
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
from PIL import ImageOps

from cm3leon_jax import fs
from cm3leon_jax.data import shards
from cm3leon_jax.data.user_data import clean_caption
from cm3leon_jax.decode import generate_families, pictures, prompts, rerank, restore
from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode.generate import Generator, SamplingConfig, tokenizer_mismatch
from cm3leon_jax.errors import MissingInputError, UserInputError, check_count
from cm3leon_jax.images import UnsupportedImageError, pil_rgb
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.train import params_checkpoint, run_config
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 text file (one caption per
    line; a byte-order mark, which Windows editors write, is not part of the first)."""
    if not fs.isfile(path):
        raise MissingInputError(f"generate.captions_file {path!r} does not exist or is not a "
                                "file; give a UTF-8 text file with one caption per line.")
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"generate.captions_file {path!r} is unreadable ({e}); give a "
                             "UTF-8 text file with one caption per line.") from e
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    if not lines:
        raise UserInputError(f"generate.captions_file {path!r} has no non-blank lines; give "
                             "one caption per line (or leave generate.captions_file unset).")
    return lines


def named_captions(captions: str | Sequence[str], captions_file: str | None
                   ) -> list[tuple[str, str]]:
    """(where it was given, text) of each caption: `generate.captions`, then the file's."""
    named = [(f"generate.captions[{i}]", clean_caption(t))
             for i, t in enumerate(text_list(captions))]
    return named + [(f"generate.captions_file {captions_file!r}, line {n}", t)
                    for n, t in (read_lines(captions_file) if captions_file else [])]


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
                # Upright (its EXIF orientation applied) and in RGB now (16-bit grayscale
                # scaled, transparency over white), as training images are read.
                images.append(pil_rgb(ImageOps.exif_transpose(image)))
        except UnsupportedImageError as e:
            raise UnsupportedImageError(f"generate.image_files: {path!r}: {e}") from None
        except (OSError, PILImage.DecompressionBombError) as e:  # PIL's unreadable-file errors
            raise UserInputError(f"generate.image_files: {path!r} is not a readable image "
                                 f"({e}); give PNG, JPEG or another format PIL reads.") from e
    return images


# generated.png shows at most this many images, each 4x (1,000 captions would be gigabytes).
GRID_IMAGES = 64


def write_images(out_dir: str, images: np.ndarray, captions: Sequence[str],
                 num_samples: int) -> list[dict]:
    """PNGs under out_dir/images, generated.json, then a captioned grid of the first
    `GRID_IMAGES`; returns generated.json's entries."""
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
    fs.write_json(os.path.join(out_dir, "generated.json"), entries, indent=2)
    n = min(GRID_IMAGES, len(images))
    if n < len(images):
        print(f"[generate] generated.png shows the first {n} of {len(images)} images "
              "(generated.json lists them all)", flush=True)
    pictures.grid(images[:n], list(captions[:n]), os.path.join(out_dir, "generated.png"),
                  columns=min(8, n))
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


def refuse_earlier_outputs(model_dir: str, overwrite: bool) -> list[str]:
    """The earlier run's outputs in MODEL_DIR; without `overwrite`, an error if there are any
    (a rerun would leave some of them beside its own, e.g. images of captions it no longer
    has). `main.run` asks before it writes config.gin, which names what made them."""
    found = [name for name in OUTPUTS if fs.exists(os.path.join(model_dir, name))]
    if found and not overwrite:
        raise UserInputError(
            f"generate MODEL_DIR {model_dir!r} holds an earlier run's outputs ({', '.join(found)}"
            "): give another MODEL_DIR, or --gin.generate.overwrite=True to replace them.")
    return found


def clear_earlier_outputs(model_dir: str, overwrite: bool) -> None:
    """`refuse_earlier_outputs`, and with `overwrite` removes them: called just before the
    run writes, so that a run failing sooner (a mistyped checkpoint) leaves them."""
    for name in refuse_earlier_outputs(model_dir, overwrite):
        path = os.path.join(model_dir, name)
        fs.rmtree(path) if fs.isdir(path) else fs.remove(path)


def text_list(texts: str | Sequence[str]) -> list[str]:
    """A gin list of texts or paths; one string (`generate.captions='a red circle'`) is one,
    not one per character."""
    return [texts] if isinstance(texts, str) else [str(t) for t in texts]


def negatives_for(texts: Sequence[str], negative_captions: str | Sequence[str]
                  ) -> list[str] | None:
    """`generate.negative_captions`, one per caption or one for all of them (None: none)."""
    negatives = [clean_caption(t) for t in text_list(negative_captions)]
    if not negatives:
        return None
    empty = [i for i, t in enumerate(negatives) if not t]
    if empty:
        raise UserInputError(f"generate.negative_captions[{empty[0]}] is empty; give text for "
                             "every negative caption, or none.")
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
                    image_sampling: SamplingConfig | None, *, batch_size: int = 8,
                    max_caption_tokens: int = 32, seed: int = 0, num_retrieved: int = 2
                    ) -> list[str] | None:
    """`generate`'s settings checked before the model is restored; returns the negatives."""
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserInputError(f"generate.captions: caption {empty[0]} is empty; give text for "
                             "every caption.")
    counts = {"num_samples": num_samples, "rerank_samples": rerank_samples,
              "batch_size": batch_size, "max_caption_tokens": max_caption_tokens}
    for name, value in counts.items():
        check_count(f"generate.{name}", value)
    check_count("generate.num_retrieved", num_retrieved, 0)
    check_count("generate.seed", seed, 0)
    if num_samples > 1 and rerank_samples > 1:
        raise UserInputError(f"generate.num_samples={num_samples} and generate.rerank_samples="
                             f"{rerank_samples}: re-ranking keeps one image per caption, the "
                             f"best of {rerank_samples}; set num_samples=1, or rerank_samples=1 "
                             "to keep every sample.")
    prompts.check_style(caption_style, "generate.caption_style")
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
    named = named_captions(captions, captions_file)
    texts, image_files = [t for _, t in named], text_list(image_files)
    negatives = _check_settings(texts, negative_captions, num_samples, rerank_samples,
                                caption_style, image_sampling, batch_size=batch_size,
                                max_caption_tokens=max_caption_tokens, seed=seed,
                                num_retrieved=num_retrieved)
    # Every input read before the (slow) restore and before anything is written: a bad
    # one fails fast.
    images = read_images(image_files)
    requests = generate_families.read_requests(prompts_file) if prompts_file else []
    vocab_dir, retrieval_dir = restore.data_folders(checkpoint, data_dir, vocab_dir,
                                                    retrieval_dir, "generate", "generate")
    if not texts and not image_files and not prompts_file:
        raise UserInputError("generate has nothing to do: bind generate.captions, "
                             "generate.captions_file, generate.image_files or "
                             "generate.prompts_file.")
    refuse_earlier_outputs(model_dir, overwrite)
    named += [(f"generate.negative_captions[{i}]", clean_caption(t))
              for i, t in enumerate(text_list(negative_captions))]
    gen, restored_step = _open_generator(
        checkpoint, step, vocab_dir, named, (prompts_file, requests), image_tokenizer,
        retrieval_dir if num_retrieved or (rerank_samples > 1 and not rerank_encoder_dir)
        else None, batch_size, (max_caption_tokens, caption_style) if image_files else None)
    summary = {"checkpoint": checkpoint, "step": restored_step, "retrieval": bool(gen.retriever)}
    drawn = made = None
    if texts:
        rerank_with = ((rerank_encoder_dir, tuple(rerank_samplings) or (image_sampling,))
                       if rerank_samples > 1 else None)
        drawn = _draw(gen, texts, num_samples, num_retrieved, image_sampling, seed,
                      rerank_samples, rerank_with, negatives)
    if image_files:
        made = gen.image_to_text(images, num_samples=num_samples, num_retrieved=num_retrieved,
                                 sampling=caption_sampling, max_tokens=max_caption_tokens,
                                 style=caption_style, seed=seed)
    summary.update(_write(model_dir, overwrite, drawn, image_files, made, num_samples))
    if requests:
        summary["families"] = generate_families.generate_families(
            gen, requests, model_dir, num_samples=num_samples,
            image_sampling=image_sampling, text_sampling=caption_sampling, seed=seed)
    print(f"[generate] wrote {model_dir}: {_done(texts, image_files, requests)}", flush=True)
    return summary


def _done(texts: Sequence[str], image_files: Sequence[str], requests: Sequence) -> str:
    """What a generate run made, for its last line."""
    done = [f"{len(texts)} caption(s) -> images" if texts else "",
            f"{len(image_files)} image(s) -> captions" if image_files else "",
            f"{len(requests)} request(s) of the SFT families (families.json)" if requests
            else ""]
    return ", ".join(d for d in done if d)


def _write(model_dir: str, overwrite: bool, drawn: tuple | None, image_files: Sequence[str],
           made: Sequence[str] | None, num_samples: int) -> dict:
    """Removes the earlier run's outputs (only now: a run failing sooner keeps them), then
    writes the images `_draw` drew and the captions made for `image_files`."""
    clear_earlier_outputs(model_dir, overwrite)
    written = {}
    if drawn is not None:
        written["images"] = write_images(model_dir, drawn[0].images, drawn[0].captions,
                                         drawn[1])
    if made is not None:
        written["captions"] = write_captions(os.path.join(model_dir, "captions.json"),
                                             list(image_files), made, num_samples)
    return written


def _open_generator(checkpoint: str, step: int | None, vocab_dir: str,
                    named: Sequence[tuple[str, str]], families: tuple[str | None, list[dict]],
                    image_tokenizer: Callable, retrieval_dir: str | None,
                    batch_size: int, captions_of_images: tuple[int, str] | None = None
                    ) -> tuple[Generator, int]:
    """(the Generator, its checkpoint's step). Before the slow restore: the checkpoint
    folder's listing, the image tokenizer against the vocabulary, and the vocabulary, the
    captions (`named`: (where given, text)) and the prompts file's requests (`families`:
    (its path, what read_requests read)) against the checkpoint's saved config (after the
    restore for a run that saved none)."""
    restore.check_checkpoint(checkpoint, step)  # A mistyped folder first (a listing).
    vocab = MultimodalVocabulary(vocab_dir)
    tokenizer = image_tokenizer()
    mismatch = tokenizer_mismatch(tokenizer, vocab.layout)
    if mismatch:
        raise UserInputError(f"generate.image_tokenizer does not fit generate.vocab_dir "
                             f"{vocab_dir!r}: {mismatch}. Give the image tokenizer the "
                             "training data was made with.")
    shards.check_image_tokenizer(vocab_dir, tokenizer, "generate.image_tokenizer")
    if captions_of_images is not None:  # (max_caption_tokens, caption_style)
        shards.check_caption_style(vocab_dir, captions_of_images[1], "generate.caption_style")
    if retrieval_dir and not fs.isdir(retrieval_dir):
        raise MissingInputError(f"generate.retrieval_dir {retrieval_dir!r} does not exist: give "
                                "a built retrieval folder (a preprocess run's data/retrieval), "
                                "or generate.num_retrieved=0 to retrieve nothing.")
    if retrieval_dir:
        restore.check_retrieval_vocabulary(
            retrieval_dir, vocab, names=("generate.retrieval_dir", "generate.vocab_dir"),
            advice="Give the retrieval folder of the model's own training data (or "
                   "generate.num_retrieved=0 and retrieval_dir=None)")
    saved = None
    if (params_checkpoint.is_export(checkpoint)
            or fs.exists(fs.join(checkpoint, run_config.CONFIG_FILE))):
        saved = restore.saved_config(checkpoint)
        check_model_fits(saved, vocab, checkpoint, named, families,
                         captions_of_images)
    config, params, restored_step = restore.restore_decoder(checkpoint, step)
    if config != saved:
        check_model_fits(config, vocab, checkpoint, named, families,
                         captions_of_images)
    retriever = Retriever.open(retrieval_dir) if retrieval_dir else None
    gen = Generator(config, params, vocab, tokenizer, retriever, batch_size=batch_size)
    return gen, restored_step


def check_model_fits(config: DecoderConfig, vocab: MultimodalVocabulary, checkpoint: str,
                     named: Sequence[tuple[str, str]],
                     families: tuple[str | None, list[dict]] = (None, []),
                     captions_of_images: tuple[int, str] | None = None) -> None:
    """An error naming the input when the vocabulary is not the model's, or a caption's
    prompt (`caption <break>`) leaves no room in DecoderConfig.max_length for the image's
    codes (`Generator.text_to_image` would fail after the restore), or a request of the
    prompts file (`families`: (path, requests)) none for what its family generates."""
    restore.check_vocabulary(checkpoint, vocab, config,
                             names=("generate.vocab_dir", "generate.checkpoint"))
    new_tokens = proc.ImageCodesOnly(vocab.layout).max_new_tokens
    budget = prompts.room(config.max_length, new_tokens)
    for where, text in named:
        size = prompts.text_to_image(np.asarray(vocab.encode(text), np.int32)).size
        if size > budget:
            raise UserInputError(
                f"{where}: the caption has {size - 1} tokens, the model has room for "
                f"{budget - 1} (DecoderConfig.max_length={config.max_length} of "
                f"{checkpoint!r} minus {new_tokens} image codes, the opening <eos> and the "
                "<break>): shorten it.")
    if captions_of_images is not None:  # (max_caption_tokens, caption_style)
        most, style = captions_of_images
        size = prompts.image_to_text(np.zeros(vocab.layout.image_length, np.int32),
                                     vocab.layout, style).size
        if size > prompts.room(config.max_length, most):
            raise UserInputError(
                f"generate.max_caption_tokens={most}: an image's prompt takes {size + 1} tokens "
                f"(its opening <eos> too) of the {config.max_length} of {checkpoint!r} "
                f"(DecoderConfig.max_length); ask for at most {config.max_length - size - 1}.")
    prompts_file, requests = families
    generate_families.check_requests_fit(requests, prompts_file, config.max_length, vocab,
                                         checkpoint)


def _preflight(model_dir: str) -> None:
    """Refuses a MODEL_DIR that is, holds or lies inside a folder the run reads, or holds an
    earlier run's outputs without generate.overwrite (before config.gin, which says what
    made them, is replaced)."""
    bound = gin.get_bindings(generate)
    run_config.check_apart(model_dir, "generate", {
        f"generate.{name}": bound.get(name)
        for name in ("checkpoint", "data_dir", "vocab_dir", "retrieval_dir")})
    refuse_earlier_outputs(model_dir, bool(bound.get("overwrite", False)))


generate.preflight = _preflight
