"""Exact scores of generated images and captions against synthetic scenes.

The corpus is drawn from known scenes, so generation can be graded without a learned
metric: `data/parse.py` recovers the objects of an image (class, color, box), and
every caption phrasing introduces each object once as "a [size] <color> <class>"
(later mentions say "the ..."). An image or caption
is compared with its scene as a multiset of (class, color) pairs, positions ignored:

    objects_right   the multisets are equal (every object, nothing extra)
    any_object_right  at least one (class, color) pair of the scene is there
    colors_right / classes_right   the multisets of colors / of classes are equal

Each score is the fraction of examples meeting it.

The task metrics of the eval run (`text_to_image_metrics`, `edit_metrics`,
`caption_metrics`, `vqa_exact_match`) add what the parser's boxes allow: object count,
positions (pairwise left/right/above/below relations, the words the captions use), box
IoU of each shape with the same-class, same-color object drawn, and caption object
precision and recall. `position_metrics` grades images drawn from the captions that name
positions ("... in the top left corner of the image", "... to the left of ...") on
exactly those words, finding each shape by its color so that position is graded apart
from class.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from cm3leon_jax.data import parse, shapes, shapes_language
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import vqa


def scene_objects(scene: shapes.Scene) -> list[tuple[str, str]]:
    """[(class, color), ...] of the scene's shapes."""
    return [(s.kind, s.color) for s in scene.shapes]


def image_objects(pixels: np.ndarray) -> list[tuple[str, str]]:
    """[(class, color), ...] that the exact parser finds in uint8[h, w, 3]."""
    return [(o.kind, o.color) for o in parse.parse_image(pixels)]


def caption_objects(text: str) -> list[tuple[str, str]]:
    """[(class, color), ...] introduced as "<color> <class>" in a caption."""
    found = shapes_language.OBJECT_PHRASE.findall(text.lower())
    return [(kind, color) for the, color, kind in found if not the]


def compare(found: list[tuple[str, str]], scene: shapes.Scene) -> dict[str, bool]:
    """The four criteria of the module docstring for one example."""
    want = scene_objects(scene)
    count = collections.Counter
    return {
        "objects_right": count(found) == count(want),
        "any_object_right": bool(set(found) & set(want)),
        "colors_right": count(c for _, c in found) == count(c for _, c in want),
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
    """Fractions of captions that name their scene's objects (class and color)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes.")
    return _mean([compare(caption_objects(c), sc) for c, sc in zip(captions, scenes)])


def _matched(parsed: list[parse.ParsedObject], scene: shapes.Scene,
             by_color_only: bool = False) -> list[int | None]:
    """For each scene shape, the index of a parsed object of the same class and color (of
    the same color, with `by_color_only`), one-to-one, nearest center first; or None."""
    out: list[int | None] = []
    used: set[int] = set()
    for s in scene.shapes:
        options = [i for i, p in enumerate(parsed) if i not in used and (
            p.color == s.color if by_color_only else (p.kind, p.color) == (s.kind, s.color))]
        if not options:
            out.append(None)
            continue
        best = min(options, key=lambda i: np.hypot(*np.subtract(_center(parsed[i].box),
                                                                 s.center)))
        used.add(best)
        out.append(best)
    return out


def _center(box: shapes.Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """shapes_language.relation on centers."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def image_metrics(pixels: np.ndarray, scene: shapes.Scene) -> dict[str, float]:
    """One generated image against the scene it should show (see text_to_image_metrics)."""
    parsed = parse.parse_image(pixels)
    found = [(o.kind, o.color) for o in parsed]
    row = {k: float(v) for k, v in compare(found, scene).items()}
    row["count_right"] = float(len(parsed) == len(scene.shapes))
    matched = _matched(parsed, scene)
    ious = [parse.box_iou(parsed[m].box, s.box) if m is not None else 0.0
            for m, s in zip(matched, scene.shapes)]
    row["box_iou"] = float(np.mean(ious))
    pairs = [(i, j) for i in range(len(scene.shapes)) for j in range(i + 1, len(scene.shapes))]
    if pairs:  # Positions are graded only where there is a relation to get right.
        row["position_right"] = float(all(
            matched[i] is not None and matched[j] is not None
            and _relation(_center(parsed[matched[i]].box), _center(parsed[matched[j]].box))
            == shapes_language.relation(scene.shapes[i], scene.shapes[j]) for i, j in pairs))
    strict = parse.match(parsed, scene, iou_threshold=0.5)
    row["placed_right"] = float(strict["all_correct"])
    return row


def scene_positions(scene: shapes.Scene) -> tuple:
    """What the captions that name positions say (`shapes_language.captions`' third phrasing):
    for one shape the cell of a 3x3 grid that holds its center ("in the top left corner"),
    for more every pair's relation ("to the left of"), in scene order."""
    centers = [s.center for s in scene.shapes]
    return _positions(centers, scene.image_size)


def _positions(centers: Sequence, image_size: int) -> tuple:
    if len(centers) == 1:
        x, y = centers[0]
        return (min(2, int(3 * y / image_size)), min(2, int(3 * x / image_size))),
    return tuple(_relation(centers[i], centers[j]) for i in range(len(centers))
                 for j in range(i + 1, len(centers)))


def drawn_positions(pixels: np.ndarray, scene: shapes.Scene) -> tuple | None:
    """`scene_positions` of what is drawn: each scene shape found as the parsed object of its
    color (whatever its class, so that position is graded apart from class); None when a
    shape's color is missing."""
    parsed = parse.parse_image(pixels)
    matched = _matched(parsed, scene, by_color_only=True)
    if any(m is None for m in matched):
        return None
    return _positions([_center(parsed[m].box) for m in matched], scene.image_size)


def position_metrics(images: np.ndarray, scenes: Sequence[shapes.Scene],
                     guesses: Sequence[shapes.Scene] | None = None) -> dict[str, float]:
    """Images drawn from captions that name positions, against their scenes:

    position_right  every shape drawn in the caption's place: one shape in its 3x3 cell,
                    two or more in every pairwise relation; shapes are found by color
    scenes          how many were graded

    With `guesses` (another scene per scene), the images are ignored and each scene's
    positions are compared with its guess's: what guessing from the corpus scores.
    """
    given = len(images) if guesses is None else len(guesses)
    if given != len(scenes):
        what = "images" if guesses is None else "guesses"
        raise ValueError(f"{given} {what} for {len(scenes)} scenes.")
    if not len(scenes):
        return {}
    got = ([drawn_positions(im, sc) for im, sc in zip(images, scenes)] if guesses is None
           else [scene_positions(g) for g in guesses])
    right = [g == scene_positions(sc) for g, sc in zip(got, scenes)]
    return {"position_right": float(np.mean(right)), "scenes": float(len(scenes))}


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the rows that have it."""
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def text_to_image_metrics(images: np.ndarray, scenes: Sequence[shapes.Scene]
                          ) -> dict[str, float]:
    """Means over uint8[n, h, w, 3] images of their scene's:

    objects_right, any_object_right, colors_right, classes_right (module docstring);
    count_right     as many objects as the scene has;
    position_right  (scenes of >= 2 shapes) every pair of shapes found in class and color
                    and in the same relation (left of / right of / above / below);
    box_iou         per shape, the box IoU with the object drawn in its class and color
                    (0 when missing), averaged over shapes;
    placed_right    every shape drawn right at IoU >= 0.5 and nothing extra (parse.match).
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes.")
    if not len(scenes):
        return {}
    return mean_rows([image_metrics(im, sc) for im, sc in zip(images, scenes)])


def class_metrics(images: np.ndarray, scenes: Sequence[shapes.Scene]
                  ) -> dict[str, dict[str, float]]:
    """Per shape class, what images drawn from the scenes' captions do with it:

    asked        how many of the scenes' shapes are of the class
    drawn_right  of those, the fraction drawn in their class and color (a parsed object
                 matched to the shape one to one); absent for a class nobody asked for
    drawn_share  of all the objects the parser finds in the images, the fraction of it
                 found as this class (whatever was asked)

    `text_to_image_metrics` says how often an image is right; this says which shapes a
    model can draw, and what it draws instead: shapeless blobs parse as circles.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes.")
    asked, right, drawn = (collections.Counter() for _ in range(3))
    for pixels, scene in zip(images, scenes):
        parsed = parse.parse_image(pixels)
        drawn.update(o.kind for o in parsed)
        for shape, match in zip(scene.shapes, _matched(parsed, scene)):
            asked[shape.kind] += 1
            right[shape.kind] += match is not None
    total = sum(drawn.values())
    out = {}
    for kind in shapes.KINDS:
        row = {"asked": float(asked[kind]),
               "drawn_share": drawn[kind] / total if total else 0.0}
        if asked[kind]:
            row["drawn_right"] = right[kind] / asked[kind]
        out[kind] = row
    return out


def edit_metrics(images: np.ndarray, targets: Sequence[shapes.Scene]) -> dict[str, float]:
    """Edited images against the edited scenes: `edit_right` (every object right in class,
    color and place, nothing extra), `edit_objects_right` (the right objects anywhere) and
    `edit_box_iou`."""
    rows = text_to_image_metrics(images, targets)
    return {"edit_right": rows["placed_right"], "edit_objects_right": rows["objects_right"],
            "edit_box_iou": rows["box_iou"]} if rows else {}


def caption_metrics(captions: Sequence[str], scenes: Sequence[shapes.Scene]
                    ) -> dict[str, float]:
    """The four criteria plus object precision and recall: the fraction of objects named
    (as "<color> <class>") that the scene has, and of the scene's objects named."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes.")
    if not scenes:
        return {}
    out = caption_scores(captions, scenes)
    precision, recall = [], []
    for caption, scene in zip(captions, scenes):
        named = collections.Counter(caption_objects(caption))
        want = collections.Counter(scene_objects(scene))
        hits = sum((named & want).values())
        precision.append(hits / sum(named.values()) if named else 0.0)
        recall.append(hits / sum(want.values()))
    out.update(object_precision=float(np.mean(precision)), object_recall=float(np.mean(recall)))
    return out


def vqa_exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of answers equal to the truth after VQA normalization ("Two." == "2")."""
    if isinstance(predictions, str) or isinstance(answers, str):  # Compared letter by letter.
        raise UserInputError("vqa_exact_match takes lists of answers, got a string; wrap one "
                             "answer in a list.")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers.")
    if not answers:
        raise ValueError("no VQA answers to score.")
    return float(np.mean([vqa.normalize(p) == vqa.normalize(a)
                          for p, a in zip(predictions, answers)]))


def vqa_exact_match_by_type(questions: Sequence[str], predictions: Sequence[str],
                            answers: Sequence[str]) -> dict[str, float | int]:
    """`vqa_exact_match` per question type (`shapes_language.VQA_TYPES`, the corpus' questions):
    `vqa_exact_match/<type>` and `vqa_questions/<type>` (how many were asked), for the
    types asked at least once. Says which part of the image a model reads (colors, counts,
    shapes) where the overall figure cannot."""
    if not len(questions) == len(predictions) == len(answers):
        raise ValueError(f"{len(questions)} questions, {len(predictions)} predictions and "
                         f"{len(answers)} answers: give one of each per question.")
    grouped: dict[str, list[bool]] = {}
    for q, p, a in zip(questions, predictions, answers):
        grouped.setdefault(shapes_language.vqa_question_type(q), []).append(
            vqa.normalize(p) == vqa.normalize(a))
    out: dict[str, float | int] = {}
    for kind in shapes_language.VQA_TYPES:
        if kind in grouped:
            out[f"vqa_exact_match/{kind}"] = float(np.mean(grouped[kind]))
            out[f"vqa_questions/{kind}"] = len(grouped[kind])
    return out


def renamed_classes(caption: str, rename: dict[str, str]) -> str:
    """`caption` with every object's class word put through `rename` (a class missing
    from it keeps its word), later mentions ("the red circle") included, so that the
    text stays one scene: e.g. the negative caption that names each shape as the one a
    decoder draws when it has not read the shape (`benchmarks/demo_decoders.py
    --circle-negatives`)."""
    unknown = sorted(set(rename) - set(shapes.KINDS) | set(rename.values()) - set(shapes.KINDS))
    if unknown:
        raise ValueError(f"renamed_classes: {unknown} are not classes of the corpus; use "
                         f"{shapes.KINDS}.")
    out, last = [], 0
    for match in shapes_language.OBJECT_PHRASE.finditer(caption.lower()):
        start, end = match.span(3)
        out += [caption[last:start], rename.get(match.group(3), caption[start:end])]
        last = end
    return "".join(out + [caption[last:]])
