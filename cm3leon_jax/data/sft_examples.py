"""SFT examples on the built-in corpus: every family of `sft_prompts`, with exact targets.

    example = make(scene, "edit", rng)     # SftExample: prompt (pixel images), output, truth

Each family is a pure function of a `shapes.Scene` and a numpy Generator, so a stored
scene regenerates its examples and the evaluation can grade generations exactly:

    edit                 a random recolor / reshape / remove / add (`shapes_language.edit`);
                         truth: the edited scene
    edge_to_image        object outlines (`shapes.edge_map`)            truth: the scene
    segmentation_to_image  class-colored masks (`shapes.segmentation_map`)
    scribble_to_image    outlines thickened by one pixel each side (`scribble_map`)
    depth_to_image       layered depth: each object a gray level by its size, larger =
                         nearer = brighter, background black (`depth_map`)
    boxes_to_image       the scene's boxes as text                      truth: the scene
    how_to_write         a short word rendered black on white (`shapes_language.render_text`)
    caption              one of the corpus' four phrasings
    long_caption         every object with size, color, position and relations
    vqa                  one (question, answer) of `shapes_language.vqa_pairs`
    segment              'segment the red circle' -> that object's mask, white on black

Images are uint8[s, s, 3] pixels here; preprocessing VQ-encodes them (`sft_preprocess.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import numpy as np

from cm3leon_jax.data import sft_prompts, shapes, shapes_language
from cm3leon_jax.data.sft_prompts import FAMILIES, Prompt

# Short words for how-to-write; those that do not fit the image size are left out.
WRITE_WORDS = ("red", "blue", "green", "black", "white", "star", "one", "two", "six", "ten",
               "cat", "dog", "sun", "sky", "sea", "map", "box", "hat", "pen", "cup", "yes",
               "no", "hi", "ok", "up", "go", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
               "12", "42", "99", "abc", "xyz")
DEPTH_LEVELS = {"small": 85, "medium": 170, "large": 255}


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One example: `prompt` (images as pixels), `output` (text, or pixels uint8[s, s, 3])
    and `truth`: what the evaluation grades against (the target scene JSON, the answer,
    the written word, or the segmented shape's index)."""

    doc_id: str
    prompt: Prompt
    output: Any
    truth: dict


def family_rng(seed: int, split: str, index: int, family: str) -> np.random.Generator:
    """Independent per (corpus seed, split, scene index, family): adding a family or
    reordering them changes no other family's examples."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index,
                                  zlib.crc32(family.encode())])


# -- exact condition maps and masks ---------------------------------------------------------

def scribble_map(scene: shapes.Scene) -> np.ndarray:
    """uint8[h, w, 3]: the edge map with every outline pixel grown to its 3x3 block."""
    edges = shapes.edge_map(scene)[..., 0] > 0
    padded = np.pad(edges, 1)
    n = scene.image_size
    grown = np.zeros_like(edges)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + n, dx:dx + n]
    return np.repeat((grown * np.uint8(255))[..., None], 3, axis=-1)


def depth_map(scene: shapes.Scene) -> np.ndarray:
    """uint8[h, w, 3]: each object's pixels at DEPTH_LEVELS[size], background black."""
    out = np.zeros((scene.image_size, scene.image_size), np.uint8)
    for shape, mask in zip(scene.shapes, shapes.masks(scene)):
        out[mask] = DEPTH_LEVELS[shape.size]
    return np.repeat(out[..., None], 3, axis=-1)


def mask_image(scene: shapes.Scene, index: int) -> np.ndarray:
    """uint8[h, w, 3]: shape `index` white on black."""
    mask = shapes.shape_mask(scene.shapes[index], scene.image_size)
    return np.repeat((mask * np.uint8(255))[..., None], 3, axis=-1)


CONDITION_MAPS = {"edge": shapes.edge_map, "segmentation": shapes.segmentation_map,
                  "scribble": scribble_map, "depth": depth_map}


# -- text -----------------------------------------------------------------------------------

def long_caption(scene: shapes.Scene) -> str:
    """'two shapes on a plain gray background: a large red circle in the top left corner
    and a small blue star on the right; the red circle is to the left of the blue star.'"""
    n = len(scene.shapes)
    objects = [f"{shapes_language.with_article(shapes_language.describe(s, with_size=True))} "
               f"{shapes_language._region(s, scene.image_size)}" for s in scene.shapes]
    background = shapes_language.background_phrase(scene.background)
    text = (f"{shapes_language.NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} on "
            f"{background}: {shapes_language.join(objects)}")
    relations = [f"{shapes_language.refer(scene, i)} is "
                 f"{shapes_language.relation(scene.shapes[i], scene.shapes[j])} "
                 f"{shapes_language.refer(scene, j)}"
                 for i in range(n) for j in range(i + 1, n)]
    return text + (f"; {shapes_language.join(relations)}." if relations else ".")


@functools.lru_cache(maxsize=None)
def write_words(image_size: int) -> tuple[str, ...]:
    """The WRITE_WORDS that `render_text` fits at `image_size`."""
    words = []
    for w in WRITE_WORDS:
        try:
            shapes_language.render_text(w, image_size)
        except ValueError:
            continue
        words.append(w)
    return tuple(words)


# -- the families ---------------------------------------------------------------------------

def make(scene: shapes.Scene, family: str, rng: np.random.Generator, doc_id: str = ""
         ) -> SftExample:
    """One example of `family` on `scene`; all choices come from `rng`."""
    return examples(scene, family, rng, doc_id)[0]


def examples(scene: shapes.Scene, family: str, rng: np.random.Generator, doc_id: str = "",
             vqa_questions: int | None = 1) -> list[SftExample]:
    """`family`'s examples on `scene`: one, or for vqa the first `vqa_questions` of the
    scene's questions (None: every one; the first is `make`'s, the others' doc ids end in
    `/q1`, `/q2`, ...). Several questions on one image make a decoder read the question:
    with one each, the answer is as well predicted from the image alone."""
    if family not in FAMILIES:
        raise ValueError(f"unknown SFT family {family!r}; use one of {FAMILIES}.")
    image = shapes.render(scene)
    caption = shapes_language.captions(scene, rng)[int(rng.integers(4))]
    if family == "edit":
        edited, instruction = shapes_language.edit(scene, rng)
        return [SftExample(doc_id, sft_prompts.edit(image, instruction), shapes.render(edited),
                           {"scene": edited.to_json(), "source": scene.to_json()})]
    if family in sft_prompts.CONDITION_FAMILIES:
        condition = family[:-len("_to_image")]
        prompt = sft_prompts.condition_to_image(condition, CONDITION_MAPS[condition](scene),
                                                caption)
        return [SftExample(doc_id, prompt, image, {"scene": scene.to_json()})]
    if family == "boxes_to_image":
        listing = shapes_language.captions(scene, rng)[0]
        boxes = shapes_language.box_phrases(scene)
        return [SftExample(doc_id, sft_prompts.boxes_to_image(listing, boxes), image,
                           {"scene": scene.to_json(), "caption": listing, "boxes": boxes})]
    if family == "how_to_write":
        words = write_words(scene.image_size)
        word = words[int(rng.integers(len(words)))]
        return [SftExample(doc_id, sft_prompts.how_to_write(word),
                           shapes_language.render_text(word, scene.image_size), {"text": word})]
    if family in ("caption", "long_caption"):
        long = family == "long_caption"
        text = long_caption(scene) if long else caption
        return [SftExample(doc_id, sft_prompts.caption(image, long=long), text,
                           {"scene": scene.to_json()})]
    if family == "vqa":
        if vqa_questions is not None and vqa_questions < 1:
            raise ValueError(f"vqa_questions={vqa_questions}; use >= 1, or None for all.")
        pairs = shapes_language.vqa_pairs(scene, rng)[:vqa_questions]
        return [SftExample(f"{doc_id}/q{k}" if k else doc_id, sft_prompts.vqa(image, q), a,
                           {"answer": a, "question": q}) for k, (q, a) in enumerate(pairs)]
    index = int(rng.integers(len(scene.shapes)))  # segment
    phrase = shapes_language.refer(scene, index)
    return [SftExample(doc_id, sft_prompts.segment(image, phrase), mask_image(scene, index),
                       {"scene": scene.to_json(), "index": index, "phrase": phrase})]


def corpus_scene(seed: int, split: str, index: int, image_size: int) -> shapes.Scene:
    """Scene `index` of the built-in corpus' `split` (the same as `synthetic_tfds`')."""
    return shapes.sample_scene(shapes.example_rng(seed, split, index), image_size)


def corpus_example(seed: int, split: str, index: int, image_size: int, family: str
                   ) -> SftExample:
    """`family`'s example on scene `index` of the corpus; a pure function of its arguments."""
    return corpus_examples(seed, split, index, image_size, family)[0]


def corpus_examples(seed: int, split: str, index: int, image_size: int, family: str,
                    vqa_questions: int | None = 1) -> list[SftExample]:
    """`examples` of `family` on scene `index` of the corpus; the first is `corpus_example`."""
    scene = corpus_scene(seed, split, index, image_size)
    return examples(scene, family, family_rng(seed, split, index, family),
                    doc_id=f"{family}/{split}_{index:07d}", vqa_questions=vqa_questions)
