"""Recover the objects of a synthetic-shapes image, and score them against a scene.

Classic image analysis in three steps:
1. color: each pixel goes to its nearest palette color when it is within
   `max_color_distance` of it and nearer to it than to the background color;
   everything else is background (textures stay within +-8 of the base color);
2. objects: 8-connected components per color (shapes keep a gap of >= 2 pixels,
   so two objects never touch);
3. class: the component's silhouette is compared with the canonical silhouette of
   every class at the sides whose boxes best fit the component's box, and the class
   with the highest IoU wins. The silhouette comparison folds the usual geometric
   features (fill ratio of the box, aspect, corners, convexity) into one score that
   is exactly 1.0 for a clean render and degrades smoothly with noise, which is what
   the evaluation of generated images needs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage, optimize

from cm3leon_jax.data import shapes

_PALETTE_NAMES = tuple(shapes.COLORS)
_PALETTE = np.array([shapes.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    """An object found in an image.

    `box` is (x0, y0, x1, y1) with exclusive ends, like `shapes.Shape.box`; `score`
    is the IoU of the silhouette with the best-fitting canonical silhouette (1.0 on
    clean renders); `side` is that silhouette's nominal side and `size` its size
    category (None when the side fits no category at this image size).
    """

    kind: str
    color: str
    box: shapes.Box
    area: int
    score: float
    side: int
    size: str | None


def _background_color(pixels: np.ndarray, hint) -> np.ndarray:
    """float32[3]: the background color: the hint (name or RGB), else the border's median.

    Shapes keep `shapes.gap` >= 2 pixels from the border, so the one-pixel frame is
    background on any image this corpus renders.
    """
    if hint is None:
        border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
        return np.median(border.astype(np.float32), axis=0)
    if isinstance(hint, str):
        if hint not in shapes.BACKGROUNDS:
            raise ValueError(f"Unknown background_hint {hint!r}; use one of "
                             f"{tuple(shapes.BACKGROUNDS)} or an (r, g, b) tuple.")
        hint = shapes.BACKGROUNDS[hint]
    return np.asarray(hint, dtype=np.float32).reshape(3)


def classify_pixels(pixels: np.ndarray, background_hint=None,
                    max_color_distance: float = 60.0) -> np.ndarray:
    """int32[h, w]: index into `shapes.COLORS` order per pixel, -1 for background.

    pixels: uint8[h, w, 3]. background_hint: a `shapes.BACKGROUNDS` name, an RGB
    triple, or None to estimate it from the image border.
    """
    references = np.concatenate([_PALETTE, _background_color(pixels, background_hint)[None]])
    flat = pixels.reshape(-1, 3).astype(np.float32)
    distances = np.linalg.norm(flat[:, None, :] - references[None, :, :], axis=-1)
    nearest = distances.argmin(axis=1)
    is_shape = (nearest < len(_PALETTE)) & (distances.min(axis=1) <= max_color_distance)
    return np.where(is_shape, nearest, -1).astype(np.int32).reshape(pixels.shape[:2])


@functools.lru_cache(maxsize=None)
def _box_fractions(kind: str) -> tuple[float, float]:
    """(height, width) of the silhouette's box as a fraction of the nominal side."""
    side = 240
    rows, cols = np.nonzero(shapes.template(kind, side))
    return (rows.max() - rows.min() + 1) / side, (cols.max() - cols.min() + 1) / side


@functools.lru_cache(maxsize=None)
def _cropped_template(kind: str, side: int) -> np.ndarray | None:
    """The canonical silhouette cropped to its box: bool[h, w]; None when it has no
    pixel at this side (a 2-pixel star), which generated images can ask for."""
    mask = shapes.template(kind, side)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool[h, w] -> bool[shape]; identity when the shape already matches."""
    if mask.shape == shape:
        return mask
    rows = (np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]
    cols = (np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]
    return mask[rows.astype(int)[:, None], cols.astype(int)[None, :]]


def _candidate_sides(kind: str, height: int, width: int) -> list[int]:
    """Nominal sides whose `kind` silhouette has a box near height x width."""
    h_frac, w_frac = _box_fractions(kind)
    guesses = {round(height / h_frac), round(width / w_frac)}
    return sorted({max(2, g + d) for g in guesses for d in (-1, 0, 1)})


def classify_silhouette(mask: np.ndarray) -> tuple[str, float, int]:
    """(kind, IoU, side) of the canonical silhouette that best matches `mask`.

    mask: bool[h, w], the object cropped to its box. Candidates are scored on the
    candidate's own grid (the observed mask is nearest-resized to it when the box
    sizes differ); ties go to the candidate whose box size is closest.
    """
    best = ("", -1.0, 0, np.inf)
    for kind in shapes.KINDS:
        for side in _candidate_sides(kind, *mask.shape):
            reference = _cropped_template(kind, side)
            if reference is None:
                continue
            observed = _resize_nearest(mask, reference.shape)
            union = np.count_nonzero(observed | reference)
            iou = np.count_nonzero(observed & reference) / union
            mismatch = abs(reference.shape[0] - mask.shape[0]) + abs(
                reference.shape[1] - mask.shape[1]
            )
            if (iou, -mismatch) > (best[1], -best[3]):
                best = (kind, float(iou), side, mismatch)
    return best[0], best[1], best[2]


def size_category(side: int, image_size: int) -> str | None:
    """The size word whose side range (at `image_size`) contains `side`, else None."""
    for size in shapes.SIZES:
        lo, hi = shapes.side_range(image_size, size)
        if lo <= side <= hi:
            return size
    return None


def default_min_area(image_size: int) -> int:
    """Half the area of the smallest silhouette this corpus draws at `image_size`."""
    side = shapes.side_range(image_size, "small")[0]
    return max(2, min(int(shapes.template(k, side).sum()) for k in shapes.KINDS) // 2)


def parse_image(pixels: np.ndarray, background_hint=None, *, max_color_distance: float = 60.0,
                min_area: int | None = None) -> list[ParsedObject]:
    """Objects in a rendered (or generated) square image, sorted by (y0, x0, color).

    pixels: uint8[h, w, 3] with h == w. Components smaller than `min_area` pixels
    (default: `default_min_area`) are treated as noise. On clean renders of this
    corpus the result equals the scene's shapes exactly (class, color, box).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(
            f"parse_image expects a square uint8[h, w, 3] image, got shape {pixels.shape}."
        )
    if pixels.dtype != np.uint8:
        raise ValueError(f"parse_image expects uint8 pixels, got {pixels.dtype}; "
                         "convert floats in [0, 1] with (x * 255).round().astype(np.uint8).")
    image_size = pixels.shape[0]
    min_area = default_min_area(image_size) if min_area is None else min_area
    labels = classify_pixels(pixels, background_hint, max_color_distance)
    found = []
    for color_index, color in enumerate(_PALETTE_NAMES):
        components, count = ndimage.label(labels == color_index, structure=_EIGHT_CONNECTED)
        for label, (rows, cols) in enumerate(ndimage.find_objects(components), start=1):
            crop = components[rows, cols] == label
            area = int(crop.sum())
            if area < min_area:
                continue
            kind, score, side = classify_silhouette(crop)
            box = (cols.start, rows.start, cols.stop, rows.stop)
            found.append(ParsedObject(kind, color, box, area, score, side,
                                      size_category(side, image_size)))
    return sorted(found, key=lambda o: (o.box[1], o.box[0], o.color))


def box_iou(a: shapes.Box, b: shapes.Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes with exclusive ends."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def match(parsed: list[ParsedObject], scene: shapes.Scene, *, iou_threshold: float = 0.5,
          exact: bool = False) -> dict:
    """Score parsed objects against the scene they should show.

    A parsed object and a scene shape can pair when their boxes have IoU >=
    `iou_threshold` (with `exact=True`: identical boxes). Pairs are chosen one-to-one
    to maximize first the number with the right class and color, then total IoU.

    Returns a dict: `correct` (pairs right in class and color), `paired`,
    `precision` = correct / len(parsed), `recall` = correct / len(scene.shapes)
    (both 1.0 when their denominator is 0), `kind_accuracy` and `color_accuracy`
    over paired objects (1.0 when none), `all_correct` (every shape found right, nothing extra),
    and `pairs`: [(parsed index, shape index, box IoU, correct)].
    """
    n_p, n_s = len(parsed), len(scene.shapes)
    ious = np.array([[box_iou(p.box, s.box) for s in scene.shapes] for p in parsed]).reshape(
        n_p, n_s
    )
    allowed = (ious == 1.0) if exact else (ious >= iou_threshold)
    right = np.array([[p.kind == s.kind and p.color == s.color for s in scene.shapes]
                      for p in parsed], dtype=bool).reshape(n_p, n_s)
    gain = np.where(allowed, 2.0 * right + ious, -1.0)
    pairs = []
    if n_p and n_s:
        for i, j in zip(*optimize.linear_sum_assignment(gain, maximize=True)):
            if allowed[i, j]:
                pairs.append((int(i), int(j), float(ious[i, j]), bool(right[i, j])))
    correct = sum(p[3] for p in pairs)
    kinds_ok = sum(parsed[i].kind == scene.shapes[j].kind for i, j, _, _ in pairs)
    colors_ok = sum(parsed[i].color == scene.shapes[j].color for i, j, _, _ in pairs)
    return {
        "correct": correct,
        "paired": len(pairs),
        "precision": correct / n_p if n_p else 1.0,
        "recall": correct / n_s if n_s else 1.0,
        "kind_accuracy": kinds_ok / len(pairs) if pairs else 1.0,
        "color_accuracy": colors_ok / len(pairs) if pairs else 1.0,
        "all_correct": correct == n_s == n_p,
        "pairs": pairs,
    }
