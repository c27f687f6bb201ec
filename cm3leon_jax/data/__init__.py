"""Data: the sources (the synthetic shapes corpus, user image-text data, public SFT
formats), preprocessing to tokenized shards, and the SeqIO side that reads them.

    shapes.py, shapes_language.py  the corpus' scenes and their language
    synthetic.py, synthetic_tfds.py  the built-in corpus, and as a TFDS dataset
    parse.py           the exact parser of a corpus image
    user_data.py       a user's image-text pairs as a TFDS dataset
    preprocess.py      the `preprocess` run mode (Beam): pairs -> tokenized shards
    retrieval_pass.py  its retrieval pass: vectors, memory bank, every shard's neighbors
    shards.py, shard_state.py  the shards on disk; one shard's files and atomic write
    seqio_augment.py   the SeqIO preprocessor: shards -> CM3 examples, through augment.py
    augment.py         retrieval-augmented examples (retrieved documents, then the query)
    cm3.py             the CM3 objective (spans moved to the end)
    sft_prompts.py     the SFT families' templates, for training and inference alike
    sft_examples.py    SFT examples on the built-in corpus
    sft_formats.py     public SFT formats (COCO, VQAv2, ...) -> SFT examples
    sft_preprocess.py  the `sft_preprocess` run mode: SFT examples -> shards per family

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
from cm3leon_jax.data.shapes_language import (
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
