"""What the pretraining and SFT tasks derive from a synthetic scene.

Captions, VQA pairs, grounded box phrases and edits (a new scene plus the
instruction that produces it), and rendered text for the how-to-write task.
All are pure functions of a `shapes.Scene` (and a numpy Generator where there is
a choice to make), so a stored scene JSON regenerates any of them.

Spatial words come from box centers: the axis with the larger offset decides
("left of"/"right of" vs "above"/"below"), image y growing downwards.
"""

from __future__ import annotations

import dataclasses
import re

import gin
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon_jax.data import shapes

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
TEXTURE_WORDS = {
    "plain": "plain",
    "stripes": "striped",
    "checker": "checkered",
    "noise": "speckled",
}
EDIT_OPS = ("recolor", "reshape", "remove", "add")


# ----------------------------------------------------------------------------- phrases


def article(phrase: str) -> str:
    """'a' or 'an' for `phrase`, by its first letter."""
    return "an" if phrase[:1] in "aeiou" else "a"


def describe(shape: shapes.Shape, with_size: bool = False) -> str:
    """'red circle', or 'small red circle' with `with_size`."""
    words = f"{shape.color} {shape.kind}"
    return f"{shape.size} {words}" if with_size else words


def with_article(phrase: str) -> str:
    """'an orange star' from 'orange star'."""
    return f"{article(phrase)} {phrase}"


def join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: shapes.Shape, b: shapes.Shape) -> str:
    """Where `a` is relative to `b`: 'to the left of', 'to the right of', 'above' or 'below'."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def background_phrase(background: shapes.Background) -> str:
    """'a plain gray background', 'a striped sand background', ..."""
    return f"a {TEXTURE_WORDS[background.texture]} {background.color} background"


def refer(scene: shapes.Scene, index: int) -> str:
    """A phrase naming shape `index` unambiguously: 'the red circle', or, when
    several shapes share color and class, 'the left red circle' / 'the middle ...'.

    Identical shapes are ordered along the axis where their centers spread most.
    """
    target = scene.shapes[index]
    twins = [i for i, s in enumerate(scene.shapes) if describe(s) == describe(target)]
    if len(twins) == 1:
        return f"the {describe(target)}"
    xs = [scene.shapes[i].center[0] for i in twins]
    ys = [scene.shapes[i].center[1] for i in twins]
    horizontal = max(xs) - min(xs) >= max(ys) - min(ys)
    keys = xs if horizontal else ys
    words = (("left", "right") if horizontal else ("top", "bottom")) if len(twins) == 2 else \
        (("left", "middle", "right") if horizontal else ("top", "middle", "bottom"))
    rank = sorted(twins, key=lambda i: keys[twins.index(i)]).index(index)
    return f"the {words[rank]} {describe(target)}"


# ----------------------------------------------------------------------------- objects in text

# The words `refer` puts before the color of identical shapes ("the bottom black hexagon").
_RANKS = ("left", "middle", "right", "top", "bottom")
# "[the [rank]] [size] <color> <class>"; "the ..." refers back to an object already named.
OBJECT_PHRASE = re.compile(r"\b(the\s+(?:(?:" + "|".join(_RANKS) + r")\s+)?)?(?:(?:"
                           + "|".join(shapes.SIZES) + r")\s+)?(" + "|".join(shapes.COLORS)
                           + r")\s+(" + "|".join(shapes.KINDS) + r")\b")
SWAPPABLE = {"class": shapes.KINDS, "color": tuple(shapes.COLORS)}


def swapped_captions(caption: str, what: str) -> list[str]:
    """`caption` first, then every caption made from it by putting another class (`what`
    = "class") or color ("color") in place of one object's, one object at a time: the
    alternatives a likelihood read-out (`evaluation/likelihood.ranked_first`) compares the
    true caption with. Later mentions ("the red circle") keep their words, as the objects
    they name are the ones introduced."""
    if what not in SWAPPABLE:
        raise ValueError(f"swapped_captions: what={what!r}; use one of {tuple(SWAPPABLE)}.")
    group = 3 if what == "class" else 2
    out = [caption]
    for match in OBJECT_PHRASE.finditer(caption.lower()):
        if match.group(1):  # "the ...": not where an object is introduced.
            continue
        start, end = match.span(group)
        out += [caption[:start] + word + caption[end:]
                for word in SWAPPABLE[what] if word != match.group(group)]
    return out


@gin.configurable
def class_swaps(caption: str) -> list[str]:
    """The captions that must not match `caption`'s image for its shapes' classes:
    `swapped_captions(caption, "class")` without the caption itself (a retriever's hard
    negatives, `clip_train.train_retriever(hard_negatives=)`)."""
    return swapped_captions(caption, "class")[1:]


# ----------------------------------------------------------------------------- captions


def captions(scene: shapes.Scene, rng: np.random.Generator) -> list[str]:
    """Four phrasings of the scene (list, count, relations, background), each naming
    every object with its color and class. `rng` picks object order and size words."""
    order = [scene.shapes[i] for i in rng.permutation(len(scene.shapes))]
    sized = rng.random(len(order)) < 0.5
    objects = [with_article(describe(s, bool(z))) for s, z in zip(order, sized)]
    listing = join(objects)
    n = len(order)
    counted = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listing}"
    if n == 1:
        related = f"{objects[0]} {_region(order[0], scene.image_size)} of the image"
    else:
        anchor = order[1]
        related = f"{objects[0]} {relation(order[0], anchor)} {objects[1]}"
        for shape, phrase in zip(order[2:], objects[2:]):
            related += f", and {phrase} {relation(shape, anchor)} the {describe(anchor)}"
    return [listing, counted, related, f"{listing} on {background_phrase(scene.background)}"]


def _region(shape: shapes.Shape, image_size: int) -> str:
    """'in the top left corner', 'at the top', 'on the left', 'in the centre', ...
    from the cell of a 3x3 grid that holds the shape's center."""
    col = min(2, int(3 * shape.center[0] / image_size))
    row = min(2, int(3 * shape.center[1] / image_size))
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical:
        return f"at the {vertical}"
    return f"on the {horizontal}" if horizontal else "in the centre"


# ----------------------------------------------------------------------------- VQA and boxes


def vqa_pairs(scene: shapes.Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs whose answers follow from the scene, shuffled by `rng`.

    Counting, color-of-class (only for classes present once), class-of-color (only
    for colors present once), presence yes/no (one present and one absent class),
    background texture, and one spatial yes/no question when two shapes exist.
    """
    kinds = [s.kind for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    pairs = [("How many shapes are there?", NUMBER_WORDS[len(kinds)])]
    pairs += [
        (f"What color is the {s.kind}?", s.color)
        for s in scene.shapes
        if kinds.count(s.kind) == 1
    ]
    pairs += [(f"What shape is the {s.color} object?", s.kind)
              for s in scene.shapes if colors.count(s.color) == 1]
    present = kinds[rng.integers(len(kinds))]
    absent = [k for k in shapes.KINDS if k not in kinds]
    pairs.append((f"Is there {with_article(present)}?", "yes"))
    if absent:
        pairs.append((f"Is there {with_article(absent[rng.integers(len(absent))])}?", "no"))
    pairs.append(("What is the background like?", TEXTURE_WORDS[scene.background.texture]))
    if len(kinds) >= 2:
        i, j = (int(v) for v in rng.choice(len(kinds), size=2, replace=False))
        truth = relation(scene.shapes[i], scene.shapes[j])
        asked = truth if rng.random() < 0.5 else _OPPOSITE[truth]
        question = f"Is {refer(scene, i)} {asked} {refer(scene, j)}?"
        pairs.append((question, "yes" if asked == truth else "no"))
    return [pairs[k] for k in rng.permutation(len(pairs))]


# The kinds of question `vqa_pairs` asks, in its order.
VQA_TYPES = ("count", "color", "shape", "presence", "background", "spatial")


def vqa_question_type(question: str) -> str:
    """Which of `VQA_TYPES` a `vqa_pairs` question is, from its template (so a score can
    be broken down by what the question makes the model read). Raises ValueError for a
    question no template of `vqa_pairs` writes."""
    if question == "How many shapes are there?":
        return "count"
    if question == "What is the background like?":
        return "background"
    if question.startswith("What color is the "):
        return "color"
    if question.startswith("What shape is the ") and question.endswith(" object?"):
        return "shape"
    if question.startswith("Is there "):
        return "presence"
    if question.startswith("Is the ") and any(f" {r} the " in question for r in _OPPOSITE):
        return "spatial"
    raise ValueError(f"vqa_question_type: {question!r} is not a question vqa_pairs asks; "
                     f"the types are {VQA_TYPES}.")


# Each relation `relation` writes, and its opposite.
_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
             "above": "below", "below": "above"}


def box_phrases(scene: shapes.Scene) -> list[str]:
    """'red circle at (x0,y0,x1,y1)' per shape, in scene order; boxes in pixels, ends exclusive."""
    return [f"{describe(s)} at ({s.box[0]},{s.box[1]},{s.box[2]},{s.box[3]})" for s in scene.shapes]


# ----------------------------------------------------------------------------- edits


def _replace(scene: shapes.Scene, index: int, shape: shapes.Shape | None) -> shapes.Scene:
    """The scene with shape `index` replaced by `shape` (removed when None)."""
    new = list(scene.shapes)
    if shape is None:
        del new[index]
    else:
        new[index] = shape
    return dataclasses.replace(scene, shapes=tuple(new))


def recolor(scene: shapes.Scene, index: int, color: str) -> tuple[shapes.Scene, str]:
    """Shape `index` painted `color` -> (new scene, 'make the red circle blue')."""
    old = scene.shapes[index]
    if color == old.color:
        raise ValueError(f"recolor: shape {index} is already {color}; pick another color.")
    new = shapes.make_shape(old.kind, color, old.size, old.x, old.y, old.side)
    return _replace(scene, index, new), f"make {refer(scene, index)} {color}"


def reshape(scene: shapes.Scene, index: int, kind: str) -> tuple[shapes.Scene, str]:
    """Shape `index` redrawn as `kind` in the same nominal square (so nothing new overlaps)
    -> (new scene, 'turn the red circle into a star')."""
    old = scene.shapes[index]
    if kind == old.kind:
        raise ValueError(f"reshape: shape {index} is already a {kind}; pick another kind.")
    new = shapes.make_shape(kind, old.color, old.size, old.x, old.y, old.side)
    return _replace(scene, index, new), f"turn {refer(scene, index)} into {with_article(kind)}"


def remove(scene: shapes.Scene, index: int) -> tuple[shapes.Scene, str]:
    """Shape `index` removed -> (new scene, 'remove the red circle'); needs >= 2 shapes."""
    if len(scene.shapes) < 2:
        raise ValueError("remove: a scene keeps at least one shape; this one has only one.")
    return _replace(scene, index, None), f"remove {refer(scene, index)}"


def add(scene: shapes.Scene, rng: np.random.Generator) -> tuple[shapes.Scene, str] | None:
    """A random new shape placed clear of the others -> (new scene, 'add a small yellow
    star to the left of the red circle'), or None when there is no room."""
    if len(scene.shapes) >= shapes.MAX_OBJECTS:
        return None
    shape = shapes.sample_shape(rng, scene.image_size, list(scene.shapes))
    if shape is None:
        return None
    new = dataclasses.replace(scene, shapes=scene.shapes + (shape,))
    where = f" {relation(shape, scene.shapes[0])} {refer(scene, 0)}" if scene.shapes else ""
    return new, f"add {with_article(describe(shape, with_size=True))}{where}"


def edit(scene: shapes.Scene, rng: np.random.Generator, op: str | None = None,
         ) -> tuple[shapes.Scene, str]:
    """A random edit of `scene` -> (edited scene, instruction). `op` in EDIT_OPS, or None
    for a random op that applies (remove needs 2 shapes; add needs room)."""
    ops = [op] if op is not None else list(EDIT_OPS)
    if any(o not in EDIT_OPS for o in ops):
        raise ValueError(f"Unknown edit op {op!r}; expected one of {EDIT_OPS}.")
    for name in [ops[k] for k in rng.permutation(len(ops))]:
        index = int(rng.integers(len(scene.shapes)))
        target = scene.shapes[index]
        if name == "recolor":
            others = [c for c in shapes.COLORS if c != target.color]
            return recolor(scene, index, others[rng.integers(len(others))])
        if name == "reshape":
            others = [k for k in shapes.KINDS if k != target.kind]
            return reshape(scene, index, others[rng.integers(len(others))])
        if name == "remove" and len(scene.shapes) >= 2:
            return remove(scene, index)
        if name == "add" and (result := add(scene, rng)) is not None:
            return result
    raise ValueError(f"Edit {op!r} does not apply to this scene ({len(scene.shapes)} shapes); "
                     "use another op or op=None.")


# ----------------------------------------------------------------------------- how to write


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str] | None:
    """Greedy word wrap to `width` pixels, or None when one word is wider than that."""
    lines: list[str] = []
    for word in text.split():
        if font.getlength(word) > width:
            return None
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render_text(text: str, size: int) -> np.ndarray:
    """`text` in PIL's default bitmap font, black on white, as uint8[size, size, 3].

    The text is drawn at the font's native resolution, wrapped, and scaled up by the
    largest integer factor that fits (nearest neighbor, so it stays pixel-exact and
    deterministic), then centered. Raises ValueError when it cannot fit even at 1x.
    """
    if not text.strip():
        raise ValueError("render_text: text is empty; give at least one visible character.")
    font = ImageFont.load_default_imagefont()
    line_height = font.getbbox("Ag")[3] + 1
    for scale in range(max(1, size // 8), 0, -1):
        canvas = size // scale
        lines = _wrap(text, font, canvas - 2)
        if lines is None or len(lines) * line_height > canvas - 2:
            continue
        image = Image.new("L", (canvas, canvas), 255)
        draw = ImageDraw.Draw(image)
        top = (canvas - len(lines) * line_height) // 2
        for k, line in enumerate(lines):
            left = (canvas - int(font.getlength(line))) // 2
            draw.text((left, top + k * line_height), line, fill=0, font=font)
        big = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
        out = np.full((size, size), 255, np.uint8)
        offset = (size - big.shape[0]) // 2
        out[offset:offset + big.shape[0], offset:offset + big.shape[1]] = big
        return np.repeat(out[..., None], 3, axis=-1)
    raise ValueError(f"render_text: {text!r} does not fit a {size}px image in the default "
                     "bitmap font; shorten it or raise size.")
