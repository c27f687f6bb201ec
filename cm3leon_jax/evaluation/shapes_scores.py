"""Exact scores of generated images and captions against synthetic scenes.

The corpus is drawn from known scenes, so generation can be graded without a learned
metric: `data/parse.py` recovers the objects of an image (class, colour, box), and
every caption phrasing introduces each object once as "a [size] <colour> <class>"
(later mentions say "the ..."). An image or caption
is compared with its scene as a multiset of (class, colour) pairs, positions ignored:

    objects_right   the multisets are equal (every object, nothing extra)
    any_object_right  at least one (class, colour) pair of the scene is there
    colours_right / classes_right   the multisets of colours / of classes are equal

Each score is the fraction of examples meeting it.
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np

from cm3leon_jax.data import parse, shapes

# "[the] [size] <colour> <class>"; "the ..." refers back to an object already named.
_PHRASE = re.compile(r"\b(the\s+)?(?:(?:" + "|".join(shapes.SIZES) + r")\s+)?("
                     + "|".join(shapes.COLOURS) + r")\s+(" + "|".join(shapes.KINDS) + r")\b")


def scene_objects(scene: shapes.Scene) -> list[tuple[str, str]]:
    """[(class, colour), ...] of the scene's shapes."""
    return [(s.kind, s.colour) for s in scene.shapes]


def image_objects(pixels: np.ndarray) -> list[tuple[str, str]]:
    """[(class, colour), ...] that the exact parser finds in uint8[h, w, 3]."""
    return [(o.kind, o.colour) for o in parse.parse_image(pixels)]


def caption_objects(text: str) -> list[tuple[str, str]]:
    """[(class, colour), ...] introduced as "<colour> <class>" in a caption."""
    return [(kind, colour) for the, colour, kind in _PHRASE.findall(text.lower()) if not the]


def compare(found: list[tuple[str, str]], scene: shapes.Scene) -> dict[str, bool]:
    """The four criteria of the module docstring for one example."""
    want = scene_objects(scene)
    count = collections.Counter
    return {
        "objects_right": count(found) == count(want),
        "any_object_right": bool(set(found) & set(want)),
        "colours_right": count(c for _, c in found) == count(c for _, c in want),
        "classes_right": count(k for k, _ in found) == count(k for k, _ in want),
    }


def _mean(rows: list[dict[str, bool]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def image_scores(images: np.ndarray, scenes: Sequence[shapes.Scene]) -> dict[str, float]:
    """Fractions of images (uint8[n, h, w, 3]) whose parsed objects match their scene."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes.")
    return _mean([compare(image_objects(im), sc) for im, sc in zip(images, scenes)])


def caption_scores(captions: Sequence[str], scenes: Sequence[shapes.Scene]) -> dict[str, float]:
    """Fractions of captions that name their scene's objects (class and colour)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes.")
    return _mean([compare(caption_objects(c), sc) for c, sc in zip(captions, scenes)])
