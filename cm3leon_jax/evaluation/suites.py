"""Evaluation suites: the examples an `eval` run decodes, with what each is graded against.

    corpus_suite(num_examples=32)(image_size=64)     # the built-in corpus (exact metrics)
    coco_suite("captions_val2014.json", "val2014/")(image_size=256)
    user_suite("runs/my_data", TfdsSource(user_data_builder))(image_size=32)  # your pairs
    vqav2_suite("v2_OpenEnded_mscoco_val2014_questions.json",
                "v2_mscoco_val2014_annotations.json", "val2014/")(image_size=256)

A suite builder is gin-configurable and returns a function of the image size the model's
image tokenizer reads (corpus scenes are drawn at that size; other images are resized).
Each task is optional: a suite fills the ones its data has.

    text_to_image  captions to draw; `scenes` (exact metrics) and/or `reference` real
                   images (FID), one per caption
    captioning     images, with reference captions (CIDEr & co.) and/or `scenes`
    vqa            images, questions, the annotators' answers (VQAv2 accuracy; on the
                   corpus the one true answer, also graded by exact match)
    edit           source images, instructions, the edited `scenes`

Corpus examples are pure functions of (seed, split, index): scene i of the split is the
same scene the data pipeline rendered (`sft_examples.corpus_scene`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Callable, Sequence

import gin
import numpy as np
from PIL import Image as PILImage

from cm3leon_jax import fs
from cm3leon_jax import images as images_lib
from cm3leon_jax.data import preprocess, sft_examples, shapes, shapes_language, user_data
from cm3leon_jax.errors import MissingInputError, UserInputError, check_count
from cm3leon_jax.vocab import image_inputs


@dataclasses.dataclass
class Task:
    """One task's inputs and truths (fields a task does not use stay None)."""

    prompts: list[str] | None = None          # captions, questions or instructions
    images: np.ndarray | None = None          # uint8[n, s, s, 3] inputs (captioning, vqa, edit)
    scenes: list[shapes.Scene] | None = None  # exact truth per example (corpus)
    references: list[list[str]] | None = None  # reference captions / annotator answers
    reference_images: np.ndarray | None = None  # real images for FID (text_to_image)
    other_images: np.ndarray | None = None    # real images of other scenes (FID floor)
    ids: list | None = None                   # the dataset's ids, for the report


@dataclasses.dataclass
class Suite:
    name: str
    text_to_image: Task | None = None
    captioning: Task | None = None
    vqa: Task | None = None
    edit: Task | None = None


SuiteBuilder = Callable[[int], Suite]


# The built-in corpus' splits (`data/synthetic.py`): any other name draws scenes of no split.
CORPUS_SPLITS = ("train", "validation", "test")


@gin.configurable
def corpus_suite(num_examples: int = 32, seed: int = 0, split: str = "test",
                 tasks: Sequence[str] = ("text_to_image", "captioning", "vqa", "edit")
                 ) -> SuiteBuilder:
    """The built-in corpus' `split` scenes 0..num_examples-1 (seed: the corpus seed).
    Text-to-image also carries as many scenes of another held-out split (validation, or
    test when `split` is not test) as `other_images`: the eval run's reference rows."""
    unknown = sorted(set(tasks) - {"text_to_image", "captioning", "vqa", "edit"})
    if unknown:
        raise UserInputError(f"corpus_suite.tasks: {unknown} unknown; use text_to_image, "
                             "captioning, vqa, edit.")
    check_count("corpus_suite.num_examples", num_examples, 2,
                " (FID and the reference rows compare sets of images)")
    if split not in CORPUS_SPLITS:
        raise UserInputError(f"corpus_suite.split={split!r} is not a split of the built-in "
                             f"corpus; use one of {CORPUS_SPLITS} (choose settings on "
                             "validation, report on test).")

    def build(image_size: int) -> Suite:
        scenes = [sft_examples.corpus_scene(seed, split, i, image_size)
                  for i in range(num_examples)]
        renders = np.stack([shapes.render(s) for s in scenes])
        phrasings, pairs, edits = map(list, zip(*[_draws(s, seed, i)
                                                  for i, s in enumerate(scenes)]))
        suite = Suite(f"corpus_{split}_{num_examples}")
        ids = [f"{split}_{i}" for i in range(num_examples)]
        if "text_to_image" in tasks:
            other = "validation" if split == "test" else "test"
            others = np.stack([shapes.render(sft_examples.corpus_scene(seed, other, i,
                                                                       image_size))
                               for i in range(num_examples)])
            suite.text_to_image = Task([p[i % 4] for i, p in enumerate(phrasings)], None,
                                       scenes, reference_images=renders,
                                       other_images=others, ids=ids)
        if "captioning" in tasks:
            suite.captioning = Task(None, renders, scenes, phrasings, ids=ids)
        if "vqa" in tasks:
            suite.vqa = Task([q for q, _ in pairs], renders, scenes, [[a] for _, a in pairs],
                             ids=ids)
        if "edit" in tasks:
            suite.edit = Task([e[1] for e in edits], renders, [e[0] for e in edits], ids=ids)
        return suite

    return build


def _draws(scene: shapes.Scene, seed: int, index: int
           ) -> tuple[list[str], tuple[str, str], tuple[shapes.Scene, str]]:
    """Scene `index`'s phrasings, VQA pair and edit, drawn in this order from its own
    generator whatever tasks a suite keeps: a suite of some tasks holds the same examples
    as the full suite."""
    rng = np.random.default_rng([seed, index, 13])
    return (shapes_language.captions(scene, rng), shapes_language.vqa_pairs(scene, rng)[0],
            shapes_language.edit(scene, rng))


def _read_json(path: str, what: str) -> dict:
    if not fs.exists(path):
        raise MissingInputError(f"{what} {path!r} does not exist.")
    with fs.open(path) as f:
        return json.load(f)


# Below this side an image holds no scene to grade (a 1x1 file resizes to a flat square).
MIN_IMAGE_SIDE = 8


def _load_image(path: str, image_size: int, named_by: str) -> np.ndarray:
    """An image file -> uint8[s, s, 3]: its pixels as RGB (`images.pil_rgb`: 16-bit scaled,
    transparency over white), center square crop, bicubic resize. `named_by`: the entry and
    the binding that name it, for the errors."""
    if not fs.exists(path):
        raise MissingInputError(f"image {path!r} ({named_by}) does not exist: check the "
                                "image folder binding, or remove the entry.")
    im = images_lib.pil_rgb(PILImage.open(io.BytesIO(fs.read_bytes(path))))
    if min(im.size) < MIN_IMAGE_SIDE:
        raise UserInputError(f"image {path!r} ({named_by}) is {im.size[0]}x{im.size[1]} "
                             f"pixels, under {MIN_IMAGE_SIDE}: not an image to evaluate on; "
                             "remove the entry.")
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return np.asarray(im.resize((image_size, image_size), PILImage.BICUBIC))


def _captions_by_image(data: dict, path: str) -> dict:
    """{image id: [caption, ...]} of a COCO captions file; an instances (boxes) or other
    COCO file is refused naming what it holds."""
    by_image: dict = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(
                ann.get("caption"), str):
            holds = sorted(ann) if isinstance(ann, dict) else ann
            kind = ("an instances (boxes) file" if isinstance(ann, dict) and "bbox" in ann
                    else "not a captions file")
            raise UserInputError(f"coco_suite.captions_json {path!r} is {kind}: its "
                                 f"annotations hold {holds!r}, not {{image_id, caption}}; "
                                 "give captions_*.json.")
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return by_image


@gin.configurable
def coco_suite(captions_json: str = gin.REQUIRED, image_dir: str = gin.REQUIRED,
               max_images: int | None = None, tasks: Sequence[str] = ("text_to_image",
                                                                    "captioning")
               ) -> SuiteBuilder:
    """COCO-format captions (`{"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}`): text-to-image from each image's first caption against the real images
    (FID-30K: 30,000 images of val2014, `max_images=30000`), captioning against all."""

    def build(image_size: int) -> Suite:
        data = _read_json(captions_json, "COCO captions file")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise UserInputError(f"{captions_json!r} is not a COCO captions file: it needs "
                             "'images' and 'annotations'.")
        by_image = _captions_by_image(data, captions_json)
        if max_images is not None:
            check_count("coco_suite.max_images", max_images, 2,
                        " (FID needs two images), or None for all")
        listed = {im.get("id") for im in data["images"] if isinstance(im, dict)}
        orphans = sum(len(c) for i, c in by_image.items() if i not in listed)
        if orphans:
            logging.warning("coco_suite: %d caption(s) of %s name image ids its 'images' list "
                            "does not hold; left out.", orphans, captions_json)
        images = [im for im in data["images"] if by_image.get(im["id"])][:max_images]
        if len(images) < 2:
            raise UserInputError(f"coco_suite.captions_json {captions_json!r}: "
                                 f"{len(images)} image(s) with captions; FID and captioning "
                                 "need at least 2.")
        if max_images and len(images) < max_images:
            logging.warning("coco_suite: %s has %d captioned images, fewer than max_images=%d; "
                            "every FID of this run is over %d images (fid_n in each row), not "
                            "comparable with FID-%d.", captions_json, len(images), max_images,
                            len(images), max_images)
        pixels = np.stack([_load_image(
            os.path.join(image_dir, im["file_name"]), image_size,
            f"image id {im['id']} of {captions_json!r}, under coco_suite.image_dir")
            for im in images])
        refs = [by_image[im["id"]] for im in images]
        ids = [im["id"] for im in images]
        suite = Suite(f"coco_{os.path.basename(captions_json)}_{len(images)}")
        if "text_to_image" in tasks:
            suite.text_to_image = Task([r[0] for r in refs], reference_images=pixels, ids=ids)
        if "captioning" in tasks:
            suite.captioning = Task(None, pixels, references=refs, ids=ids)
        return suite

    return build


@gin.configurable
def vqav2_suite(questions_json: str = gin.REQUIRED, annotations_json: str = gin.REQUIRED,
                image_dir: str = gin.REQUIRED,
                image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
                max_questions: int | None = None) -> SuiteBuilder:
    """VQAv2 questions + annotations JSON (the official files) and their COCO images."""

    def build(image_size: int) -> Suite:
        questions = _read_json(questions_json, "VQAv2 questions file").get("questions")
        anns = _read_json(annotations_json, "VQAv2 annotations file").get("annotations")
        if not questions or anns is None:
            raise UserInputError(
                f"vqav2_suite.questions_json {questions_json!r} needs a 'questions' list and "
                f"vqav2_suite.annotations_json {annotations_json!r} an 'annotations' list "
                "(the two official files; swapped?).")
        if max_questions is not None and (not isinstance(max_questions, int)
                                          or max_questions < 1):
            raise UserInputError(f"vqav2_suite.max_questions={max_questions!r}: give a whole "
                                 "number >= 1, or None for all.")
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
        questions = [q for q in questions if q["question_id"] in answers][:max_questions]
        if not questions:
            raise UserInputError(f"vqav2_suite: no question of {questions_json!r} has answers "
                                 f"in {annotations_json!r}; give the annotations of the same "
                                 "split.")
        cache: dict = {}
        for q in questions:
            if q["image_id"] not in cache:
                path = os.path.join(image_dir, image_pattern.format(image_id=q["image_id"]))
                cache[q["image_id"]] = _load_image(
                    path, image_size, f"image id {q['image_id']} of question "
                    f"{q['question_id']}, under vqav2_suite.image_dir")
        task = Task([q["question"] for q in questions],
                    np.stack([cache[q["image_id"]] for q in questions]),
                    references=[answers[q["question_id"]] for q in questions],
                    ids=[q["question_id"] for q in questions])
        return Suite(f"vqav2_{len(questions)}", vqa=task)

    return build


@gin.configurable
def user_suite(data_dir: str = gin.REQUIRED, source: preprocess.TfdsSource = gin.REQUIRED,
               split: str = "validation", max_images: int | None = 64,
               tasks: Sequence[str] = ("text_to_image", "captioning")) -> SuiteBuilder:
    """Your own image-text pairs (`data/user_data.py`), by default the records preprocessing
    held out of training and of the memory bank (its validation split).

    Text-to-image draws each image from one caption (its first record in the prepared
    dataset's fixed order), graded by CLIP score and FID on the retrieval encoder's features
    against the images; as many train images of the same source are the `other_images` of
    the reference rows (CLIP score at chance, the FID floor). Captioning is graded against
    every caption of an image (CIDEr-D & co.): the records of one image (a JSONL file may
    caption it several times) are one example, named by the image. Held out by name: a copy
    of an image under another name may be in the train split.

    Args:
      data_dir: the data folder the model was trained on (preprocess's MODEL_DIR). Its
        plan.json must name `source` as prepared now (the same prepared dataset, made from
        the same files), so that these are the records it held out.
      source: the prepared pairs, `TfdsSource` with `user_data_builder` bound as
        preprocessing bound it (gin_configs/runs/eval_user.gin).
      split: 'validation' (held out) or 'train' (what the model saw: a check of fit).
      max_images: the split's first images, in its order (None: all of them).
    """
    unknown = sorted(set(tasks) - {"text_to_image", "captioning"})
    if isinstance(tasks, str) or unknown or not tasks:
        raise UserInputError(f"user_suite.tasks={tasks!r}: give a list of text_to_image, "
                             "captioning (your pairs hold no questions or edits).")
    if split not in ("train", "validation"):
        raise UserInputError(f"user_suite.split={split!r}: your data has 'validation' (held "
                             "out) and 'train'.")
    if max_images is not None:
        check_count("user_suite.max_images", max_images, 2,
                    " (FID compares sets of images), or None for all")
    check_user_source(data_dir, source)  # Now: before the eval restores its model.

    def build(image_size: int) -> Suite:
        images, references, ids = _user_images(source, split, max_images, image_size)
        if len(images) < 2:
            raise UserInputError(
                f"user_suite: the {split} split of {source.identity()} holds {len(images)} "
                "usable image(s); FID and captioning need at least 2: add pairs"
                + (", or raise user_data_builder.validation_fraction when preprocessing."
                   if split == "validation" else "."))
        other = "train" if split == "validation" else "validation"
        others = _user_images(source, other, len(images), image_size, captions=False)[0]
        suite = Suite(f"user_{split}_{len(images)}")
        if "text_to_image" in tasks:
            suite.text_to_image = Task([r[0] for r in references], reference_images=images,
                                       other_images=others if len(others) >= 2 else None,
                                       ids=ids)
        if "captioning" in tasks:
            suite.captioning = Task(None, images, references=references, ids=ids)
        return suite

    return build


def check_user_source(data_dir: str, source: preprocess.TfdsSource) -> None:
    """Refuses a `source` other than the one `data_dir` was preprocessed from (another file
    or folder, image size, held-out share, or files changed since): its held-out split would
    not be the one kept out of training."""
    plan = preprocess.recorded_plan(data_dir)
    if not plan:
        raise MissingInputError(f"user_suite.data_dir {data_dir!r} holds no plan.json: give the "
                                "folder preprocess_user.gin wrote (DATA_DIR, the model's data).")
    made = plan.get("source"), plan.get(preprocess.SOURCE_FINGERPRINT)
    # Both before anything is prepared (preparing changed files asks to prepare them again,
    # which cannot help here).
    identity = source.identity()
    fingerprint = ((source.files_fingerprint() or source.fingerprint())
                   if identity == made[0] else None)
    if identity != made[0]:
        raise UserInputError(
            f"user_suite: the data folder {data_dir!r} was preprocessed from {made[0]} but "
            f"this run's pairs are {identity}: its held-out split is not the one the model was "
            "kept from. Give USER_DATA (by the same absolute path: the name's hash is of it), "
            "IMAGE_SIZE and user_data_builder's validation_fraction as preprocessing had "
            "them.")
    if made[1] and made[1] != fingerprint:
        raise UserInputError(
            f"user_suite: the pairs changed since the data folder {data_dir!r} was "
            f"preprocessed from them (source_fingerprint {made[1]} then, {fingerprint} now): "
            "its held-out split is not theirs. Evaluate on the pairs as they were, or "
            "preprocess them again into a new data folder, train on that and evaluate it.")


def _user_images(source: preprocess.TfdsSource, split: str, max_images: int | None,
                 image_size: int, captions: bool = True
                 ) -> tuple[np.ndarray, list[list[str]], list[str]]:
    """The split's first `max_images` images at `image_size`, each with every caption its
    records give (`user_data.image_of`: a JSONL file may caption one image several times),
    and their names. `captions=False`: the images alone, read no further than they lie."""
    pixels: dict[str, np.ndarray] = {}
    texts: dict[str, list[str]] = {}
    for pair in source.read(split, 0, source.num_examples(split)):
        name = user_data.image_of(pair.doc_id)
        if name not in texts:
            if max_images is not None and len(texts) >= max_images:
                if not captions:
                    break
                continue  # Later records may still caption a kept image.
            pixels[name], texts[name] = pair.image, []
        texts[name] += [c.decode("utf-8") if isinstance(c, bytes) else c
                        for c in pair.captions]
    if not pixels:
        return np.zeros((0, image_size, image_size, 3), np.uint8), [], []
    images = image_inputs.to_rgb_uint8(np.stack(list(pixels.values())), image_size)
    return images, list(texts.values()), list(texts)
