"""Synthetic shapes scenes: the scene model, sampling, exact rendering and masks.

A scene is 1-3 flat-colored shapes on a plain or low-contrast textured
background. Every shape lives in a *nominal square* (`x`, `y`, `side`, integer
pixels) and its silhouette is evaluated at pixel centers with no anti-aliasing,
so each object pixel carries exactly its palette color. That is what lets
`parse.parse_image` recover a clean render exactly, and it keeps rendering
bit-identical across machines (only IEEE-exact elementwise float64 arithmetic,
hard-coded vertex constants, no libm calls).

Boxes are `(x0, y0, x1, y1)` in pixels with exclusive ends (`pixels[y0:y1, x0:x1]`
is the object's crop), computed from the rendered silhouette, not the nominal
square.

Language (captions, VQA, edit instructions) lives in `shapes_language.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import zlib

import numpy as np

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

# Chosen pairwise >= 75 apart in RGB and >= 95 from every background color, so
# nearest-color classification survives textures (+-8) and generation noise.
COLORS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "sand": (175, 160, 130),
    "teal": (90, 130, 130),
}
TEXTURES = ("plain", "stripes", "checker", "noise")
TEXTURE_AMPLITUDE = 8  # +-, low enough that a texture never looks like a shape color
KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = ("small", "medium", "large")
# Nominal side as a fraction of the image side; the gaps between the ranges keep
# the size words unambiguous.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.16, 0.22),
    "medium": (0.27, 0.34),
    "large": (0.39, 0.46),
}
# Below 10 px a star's arms and a hexagon's corners vanish into the pixel grid;
# images smaller than MIN_SIDE / 0.16 = 62.5 px get proportionally larger shapes.
MIN_SIDE = 10
MAX_OBJECTS = 3

# Star: 5 points, inner radius 0.45 of the outer, centered so that its box is
# centered in the nominal square. Literals (not cos/sin) keep renders exact everywhere.
_STAR = np.array([
    (0.5, 0.04774575), (0.63225168, 0.36571693), (0.97552826, 0.39323725),
    (0.71398772, 0.61727458), (0.79389263, 0.95225425), (0.5, 0.77274575),
    (0.20610737, 0.95225425), (0.28601228, 0.61727458), (0.02447174, 0.39323725),
    (0.36774832, 0.36571693),
])
_HALF_SQRT3_HALF = 0.4330127018922193  # sqrt(3)/4: half-height of a hexagon of radius 0.5
_SQRT3 = 1.7320508075688772


# ----------------------------------------------------------------------------- scene model


@dataclasses.dataclass(frozen=True)
class Background:
    """A background: `texture` in TEXTURES over base color `color` (BACKGROUNDS key).

    `period` is the stripe/checker cell size in pixels; `seed` drives the noise
    texture so a scene re-renders identically from its JSON.
    """

    texture: str = "plain"
    color: str = "gray"
    period: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    """One object: `kind` (KINDS), `color` (COLORS), `size` (SIZES), nominal
    square at (`x`, `y`) with `side` pixels, and the rendered `box` (x0, y0, x1, y1),
    exclusive ends. Build it with `make_shape` so `box` matches the silhouette."""

    kind: str
    color: str
    size: str
    x: int
    y: int
    side: int
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) center of the rendered box, in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
    """An `image_size` x `image_size` scene: a background and 1-3 shapes."""

    image_size: int
    background: Background
    shapes: tuple[Shape, ...]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces), stable enough to hash or store."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        """Inverse of `to_json`; rejects JSON whose boxes disagree with the geometry."""
        raw = json.loads(text)
        shapes = tuple(
            make_shape(s["kind"], s["color"], s["size"], s["x"], s["y"], s["side"])
            for s in raw["shapes"]
        )
        for shape, s in zip(shapes, raw["shapes"]):
            if list(shape.box) != list(s["box"]):
                raise ValueError(
                    f"Scene JSON box {s['box']} does not match the {s['kind']} rendered at "
                    f"x={s['x']}, y={s['y']}, side={s['side']} (box {shape.box}); the JSON was "
                    "edited by hand or written by an incompatible version: regenerate it.")
        return cls(int(raw["image_size"]), Background(**raw["background"]), shapes)


def make_shape(kind: str, color: str, size: str, x: int, y: int, side: int) -> Shape:
    """A Shape with its box computed from the silhouette of `kind` at `side` pixels."""
    if kind not in KINDS:
        raise ValueError(f"Unknown shape kind {kind!r}; expected one of {KINDS}.")
    if color not in COLORS:
        raise ValueError(f"Unknown color {color!r}; expected one of {tuple(COLORS)}.")
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; expected one of {SIZES}.")
    rows, cols = np.nonzero(template(kind, side))
    box = (
        x + int(cols.min()),
        y + int(rows.min()),
        x + int(cols.max()) + 1,
        y + int(rows.max()) + 1,
    )
    return Shape(kind, color, size, int(x), int(y), int(side), box)


# ----------------------------------------------------------------------------- geometry


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test; u, v: float64[n, n]; vertices: float64[k, 2]."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y1 == y2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y1 > v) != (y2 > v)
        x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at_v)
    return inside


@functools.lru_cache(maxsize=4096)
def template(kind: str, side: int) -> np.ndarray:
    """Silhouette of `kind` in a `side` x `side` nominal square: bool[side, side].

    Pixel (i, j) is inside when its center ((j + .5) / side, (i + .5) / side) is inside
    the unit-square shape. Shift-invariant by construction: a shape at (x, y) is this
    array pasted at (y, x). The returned array is read-only (it is cached).
    """
    if side < 2:
        raise ValueError(f"Shape side must be >= 2 pixels, got {side}.")
    centers = (np.arange(side, dtype=np.float64) + 0.5) / side
    u, v = np.meshgrid(centers, centers)  # u: x (columns), v: y (rows)
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    if kind == "circle":
        mask = du * du + dv * dv <= 0.25
    elif kind == "square":
        mask = np.ones_like(u, dtype=bool)
    elif kind == "diamond":
        mask = du + dv <= 0.5
    elif kind == "triangle":  # apex at the top center, base along the bottom
        mask = v >= 2.0 * du
    elif kind == "hexagon":  # regular, flat top and bottom, circumradius 0.5
        mask = (dv <= _HALF_SQRT3_HALF) & (_SQRT3 * du + dv <= 2.0 * _HALF_SQRT3_HALF)
    elif kind == "star":
        mask = _inside_polygon(u, v, _STAR)
    else:
        raise ValueError(f"Unknown shape kind {kind!r}; expected one of {KINDS}.")
    mask.setflags(write=False)
    return mask


def side_range(image_size: int, size: str) -> tuple[int, int]:
    """Inclusive range of nominal sides (pixels) for size category `size`."""
    lo, hi = SIZE_FRACTIONS[size]
    scale = max(float(image_size), MIN_SIDE / SIZE_FRACTIONS["small"][0])
    return max(MIN_SIDE, round(lo * scale)), max(MIN_SIDE, round(hi * scale))


def gap(image_size: int) -> int:
    """Minimum empty pixels between two nominal squares and between a square and the border."""
    return max(2, image_size // 32)


# ----------------------------------------------------------------------------- sampling


def _fits(x: int, y: int, side: int, placed: list[Shape], margin: int) -> bool:
    """Whether the square (x, y, side) keeps `margin` pixels from every placed square."""
    for s in placed:
        if x < s.x + s.side + margin and s.x < x + side + margin and \
                y < s.y + s.side + margin and s.y < y + side + margin:
            return False
    return True


def place(rng: np.random.Generator, image_size: int, side: int, placed: list[Shape],
          tries: int = 50) -> tuple[int, int] | None:
    """A random top-left (x, y) for a `side` square clear of `placed`, or None."""
    margin = gap(image_size)
    hi = image_size - margin - side
    if hi < margin:
        return None
    for _ in range(tries):
        x, y = (int(v) for v in rng.integers(margin, hi + 1, size=2))
        if _fits(x, y, side, placed, margin):
            return x, y
    return None


def sample_shape(rng: np.random.Generator, image_size: int, placed: list[Shape],
                 kinds: tuple[str, ...] = KINDS, colors: tuple[str, ...] = tuple(COLORS),
                 ) -> Shape | None:
    """One random shape placed clear of `placed`, or None when it found no room."""
    kind = kinds[rng.integers(len(kinds))]
    color = colors[rng.integers(len(colors))]
    size = SIZES[rng.integers(len(SIZES))]
    lo, hi = side_range(image_size, size)
    side = int(rng.integers(lo, hi + 1))
    position = place(rng, image_size, side, placed)
    if position is None:
        return None
    return make_shape(kind, color, size, position[0], position[1], side)


def sample_background(rng: np.random.Generator, image_size: int,
                      textured_fraction: float = 0.5) -> Background:
    """A plain background with probability 1 - `textured_fraction`, else a texture."""
    color = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = "plain"
    if rng.random() < textured_fraction:
        texture = TEXTURES[1 + rng.integers(len(TEXTURES) - 1)]
    period = int(rng.integers(max(2, image_size // 16), max(3, image_size // 6) + 1))
    return Background(texture, color, period, int(rng.integers(2**31)))


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of example `index` of `split` in a corpus seeded `seed`.

    Seeded with (seed, crc32(split), index) alone, so an example never depends on
    generation order or on other examples; the TFDS builder and anything that
    streams scenes without TensorFlow share it.
    """
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


# The smallest side a scene is drawn at: below it the shapes are not told apart.
MIN_IMAGE_SIZE = 32


def sample_scene(rng: np.random.Generator, image_size: int, *, min_objects: int = 1,
                 max_objects: int = MAX_OBJECTS, kinds: tuple[str, ...] = KINDS,
                 textured_fraction: float = 0.5, attempts: int = 100) -> Scene:
    """A random non-overlapping scene, a pure function of the state of `rng`.

    The number of objects is uniform in [min_objects, max_objects]; a draw whose
    shapes do not all fit is redrawn whole (so at 32 px crowded scenes lean to
    small shapes). Raises ValueError when `attempts` draws all fail.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"Need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} so shapes stay recognizable, "
                         f"got {image_size}.")
    background = sample_background(rng, image_size, textured_fraction)
    for _ in range(attempts):
        n = int(rng.integers(min_objects, max_objects + 1))
        placed: list[Shape] = []
        while len(placed) < n:
            shape = sample_shape(rng, image_size, placed, kinds)
            if shape is None:
                break
            placed.append(shape)
        if len(placed) == n:
            return Scene(image_size, background, tuple(placed))
    raise ValueError(
        f"Could not place {min_objects}-{max_objects} shapes in a {image_size}px image "
        f"after {attempts} attempts; lower max_objects or raise image_size.")


# ----------------------------------------------------------------------------- rendering


def render_background(background: Background, image_size: int) -> np.ndarray:
    """The background alone: uint8[image_size, image_size, 3]."""
    base = np.array(BACKGROUNDS[background.color], dtype=np.int16)
    rows, cols = np.indices((image_size, image_size))
    p = max(1, background.period)
    if background.texture == "plain":
        offset = np.zeros((image_size, image_size), np.int16)
    elif background.texture == "stripes":
        offset = np.where((rows // p) % 2 == 0, -TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE)
    elif background.texture == "checker":
        offset = np.where((rows // p + cols // p) % 2 == 0, -TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE)
    elif background.texture == "noise":
        noise_rng = np.random.default_rng(background.seed)
        offset = noise_rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1,
                                    size=(image_size, image_size))
    else:
        raise ValueError(
            f"Unknown background texture {background.texture!r}; expected one of {TEXTURES}."
        )
    return np.clip(base + offset[..., None], 0, 255).astype(np.uint8)


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """bool[image_size, image_size]: the pixels of `shape`."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[shape.y : shape.y + shape.side, shape.x : shape.x + shape.side] = template(
        shape.kind, shape.side
    )
    return mask


def masks(scene: Scene) -> np.ndarray:
    """bool[n, h, w]: one mask per shape, in `scene.shapes` order."""
    n = scene.image_size
    if not scene.shapes:
        return np.zeros((0, n, n), dtype=bool)
    return np.stack([shape_mask(s, n) for s in scene.shapes])


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8[h, w, 3]; identical bytes for identical scenes."""
    image = render_background(scene.background, scene.image_size)
    for shape, mask in zip(scene.shapes, masks(scene)):
        image[mask] = COLORS[shape.color]
    return image


# Label colors for segmentation maps (ADE20K-like: saturated, one per class);
# black is background.
SEGMENTATION_COLORS: dict[str, RGB] = {
    "circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
    "star": (255, 255, 0), "hexagon": (255, 0, 255), "diamond": (0, 255, 255),
}


def segmentation_map(scene: Scene) -> np.ndarray:
    """uint8[h, w, 3]: each object painted with its class's SEGMENTATION_COLORS.

    Background black.
    """
    out = np.zeros((scene.image_size, scene.image_size, 3), np.uint8)
    for shape, mask in zip(scene.shapes, masks(scene)):
        out[mask] = SEGMENTATION_COLORS[shape.kind]
    return out


def edge_map(scene: Scene) -> np.ndarray:
    """uint8[h, w, 3]: object outlines (mask pixels with a 4-neighbor outside) white on black.

    Outlines come from the masks rather than from the pixels, so background textures
    add no edges: the condition describes the objects only.
    """
    out = np.zeros((scene.image_size, scene.image_size), bool)
    for mask in masks(scene):
        padded = np.pad(mask, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out |= mask & ~interior
    return np.repeat((out * np.uint8(255))[..., None], 3, axis=-1)
