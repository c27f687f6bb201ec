"""Data sources: the synthetic shapes corpus, its parser, and user image-text data.

The numpy-only parts (scenes, rendering, parsing, task text) import eagerly. The
TFDS builders import TensorFlow, which costs seconds, so they load on first use
(`cm3leon_jax.data.load_synthetic` works; `import cm3leon_jax.data` stays light).
Import `cm3leon_jax.data.synthetic_tfds` / `user_data` to register the builders
with `tfds.builder`.
"""

import importlib

from cm3leon_jax.data.parse import ParsedObject, box_iou, match, parse_image
from cm3leon_jax.data.shapes import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    SIZES,
    Background,
    Scene,
    Shape,
    edge_map,
    example_rng,
    make_shape,
    masks,
    render,
    sample_scene,
    segmentation_map,
)
from cm3leon_jax.data.shapes_tasks import (
    add,
    box_phrases,
    captions,
    edit,
    recolor,
    refer,
    remove,
    render_text,
    reshape,
    vqa_pairs,
)

_LAZY = {
    "SyntheticShapes": "synthetic_tfds", "SyntheticShapesConfig": "synthetic_tfds",
    "make_config": "synthetic_tfds", "load_synthetic": "synthetic_tfds",
    "UserImageText": "user_data", "UserDataConfig": "user_data", "make_user_config": "user_data",
    "user_data_builder": "user_data", "load_user_data": "user_data", "read_report": "user_data",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKGROUNDS", "COLORS", "KINDS", "SIZES", "Background", "Scene", "Shape", "ParsedObject",
    "make_shape", "example_rng", "sample_scene", "render", "masks", "segmentation_map", "edge_map",
    "captions", "vqa_pairs", "box_phrases", "refer", "edit", "recolor", "reshape", "remove",
    "add", "render_text", "parse_image", "match", "box_iou", *_LAZY,
]
