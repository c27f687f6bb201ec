"""benchmarks/image_tokenizer.py edits: what an edit leaves of the source's codes."""

import dataclasses
from types import SimpleNamespace

import numpy as np

from benchmarks import image_tokenizer as bench
from cm3leon_jax.data import shapes, shapes_language


@dataclasses.dataclass
class _CellTokenizer:
    """A stand-in tokenizer of 8 x 8 codes: each 4 x 4 cell's mean color, quantized; with
    `global_shift` every code also moves with the whole image's mean, as GroupNorm's
    statistics make a trained one's."""

    global_shift: bool
    image_size: int = 32
    config: SimpleNamespace = dataclasses.field(
        default_factory=lambda: SimpleNamespace(grid_size=8))

    def encode(self, images):
        x = np.asarray(images, np.float64)
        cells = x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4))
        if self.global_shift:
            cells = cells + x.mean((1, 2), keepdims=True)
        return np.floor(cells / 16).astype(np.int64).reshape(len(x), -1, 3) @ [1, 64, 4096]


def _edits(n):
    rng = np.random.default_rng(0)
    pairs = [(s, shapes_language.recolor(s, 0, next(c for c in shapes.COLORS
                                                 if c != s.shapes[0].color))[0])
             for s in (shapes.sample_scene(rng, 32) for _ in range(n))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def test_a_local_tokenizer_keeps_every_code_away_from_the_edit_and_a_global_one_does_not():
    sources, targets = _edits(40)
    local = bench.edit_locality(_CellTokenizer(global_shift=False), sources, targets)
    spread = bench.edit_locality(_CellTokenizer(global_shift=True), sources, targets)
    assert local["edits"] == 40
    # Cells off the recolored object's box see the same pixels: a local code stays.
    assert local["kept_at_1"] == local["kept_at_2"] == local["kept_at_3"] == 1.0
    assert local["kept_at_0"] < 0.9  # On the object the colors changed.
    assert spread["kept_at_3"] < 0.9 and spread["codes_kept"] < local["codes_kept"]


def test_a_cells_distance_is_counted_in_whole_cells_from_the_box():
    d = bench._cells_from((4, 4, 12, 8), grid=8, cell=4)   # cells rows 1, columns 1-2
    assert d[1, 1] == d[1, 2] == 0 and d[0, 0] == 1 and d[1, 4] == 2 and d[7, 7] == 6
