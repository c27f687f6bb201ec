"""Exact per-family scores of SFT generations on the built-in corpus.

    scores = evaluate_families(generator, examples)   # {family: {"exact": ..., ...}}

Every family's example (`data/sft_examples.py`) knows its answer, so each output is
graded without a learned metric:

    edit, <c>_to_image,    the shape parser's objects match the target scene one to one:
    boxes_to_image         right class and color, box IoU >= 0.5, nothing extra
                           (for edit: the edit happened and nothing else changed)
    how_to_write           the nearest render (pixel L2) among the candidate words is the
                           word asked for
    caption, long_caption  the caption names exactly the scene's (color, class) objects
    vqa                    the answer equals the true one after VQA normalization ("Two." == "2")
    segment                the mask (pixels brighter than mid-gray) has IoU >= 0.5 with the
                           object's mask; `mask_iou` is the mean IoU

`exact` is the fraction of examples meeting the family's criterion.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cm3leon_jax.data import parse, sft_examples, shapes, shapes_language
from cm3leon_jax.data.sft_examples import SftExample
from cm3leon_jax.data.sft_prompts import CONDITION_FAMILIES
from cm3leon_jax.evaluation import shapes_scores


def score_image(family: str, image: np.ndarray, example: SftExample) -> dict[str, float]:
    """One generated image (uint8[s, s, 3]) against its example's truth."""
    if family == "how_to_write":
        words = sft_examples.write_words(image.shape[0])
        renders = np.stack([shapes_language.render_text(w, image.shape[0]) for w in words])
        errors = ((renders.astype(np.float32) - image.astype(np.float32)) ** 2).sum((1, 2, 3))
        return {"exact": float(words[int(np.argmin(errors))] == example.truth["text"])}
    scene = shapes.Scene.from_json(example.truth["scene"])
    if family == "segment":
        want = shapes.shape_mask(scene.shapes[example.truth["index"]], scene.image_size)
        got = image.astype(np.float32).mean(-1) > 127.5
        union = (want | got).sum()
        iou = float((want & got).sum() / union) if union else 0.0
        return {"exact": float(iou >= 0.5), "mask_iou": iou}
    found = parse.match(parse.parse_image(image), scene, iou_threshold=0.5)
    return {"exact": float(found["all_correct"]), "recall": found["recall"]}


def score_text(family: str, text: str, example: SftExample) -> dict[str, float]:
    """One generated text against its example's truth."""
    if family == "vqa":  # Normalized as the eval run's VQA figure is ("two" == "2").
        return {"exact": shapes_scores.vqa_exact_match([text], [example.truth["answer"]])}
    scene = shapes.Scene.from_json(example.truth["scene"])
    named = shapes_scores.compare(shapes_scores.caption_objects(text), scene)
    return {"exact": float(named["objects_right"]),
            "any_object_right": float(named["any_object_right"])}


def generate(gen: Any, family: str, examples: Sequence[SftExample], image_sampling: Any,
             text_sampling: Any, seed: int = 0) -> list:
    """The Generator's outputs for the examples' prompts: images or strings."""
    seg = [ex.prompt.segments for ex in examples]
    # Each template says where its input image is (VQA's comes first, then the question).
    images = ([ex.prompt.segments[ex.prompt.image_inputs[0]] for ex in examples]
              if family not in ("boxes_to_image", "how_to_write") else None)
    kw = dict(sampling=image_sampling, seed=seed)
    if family == "edit":
        return list(gen.edit(images, [s[2] for s in seg], **kw).images)
    if family in CONDITION_FAMILIES:
        condition = family[:-len("_to_image")]
        return list(gen.grounded(images, [s[2] for s in seg], condition=condition,
                                 **kw).images)
    if family == "boxes_to_image":
        return list(gen.boxes_to_image([ex.truth["caption"] for ex in examples],
                                       [ex.truth["boxes"] for ex in examples], **kw).images)
    if family == "how_to_write":
        return list(gen.how_to_write([ex.truth["text"] for ex in examples], **kw).images)
    if family == "segment":
        return list(gen.segment(images, [ex.truth["phrase"] for ex in examples], **kw).images)
    if family == "vqa":
        return gen.vqa(images, [ex.truth["question"] for ex in examples],
                       sampling=text_sampling, seed=seed)
    return gen.describe(images, long=family == "long_caption", sampling=text_sampling,
                        seed=seed)


def evaluate_families(gen: Any, examples: dict[str, Sequence[SftExample]], *,
                      image_sampling: Any = None, text_sampling: Any = None, seed: int = 0
                      ) -> dict[str, dict[str, float]]:
    """{family: mean scores} of `gen`'s outputs on each family's examples."""
    out = {}
    for family, exs in examples.items():
        outputs = generate(gen, family, exs, image_sampling, text_sampling, seed)
        scorer = score_text if exs[0].prompt.output == "text" else score_image
        rows = [scorer(family, o, ex) for o, ex in zip(outputs, exs)]
        out[family] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        out[family]["n"] = len(rows)
    return out
