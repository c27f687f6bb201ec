"""`synthetic_shapes`: the built-in corpus as a TFDS dataset, generated locally.

Every example is `synthetic.synthetic_example(split, index, ...)`, a pure function
of (config.seed, split, index): an example never depends on generation order or
on the other splits, two builds with the same config write identical records, and
the tokenizer's and retriever's training scenes are these same scenes.

Configs: `32px` (tiny, for tests and smoke runs), `64px`, `256px`. For other split
sizes or seeds, build a custom config with `make_config`:

    builder = SyntheticShapes(config=make_config(32, {"train": 16, "test": 4}), data_dir=d)
    prepare(builder)

or simply `load_synthetic("train", 64, data_dir)`.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cm3leon_jax.data import shapes
from cm3leon_jax.data.synthetic import synthetic_example

DEFAULT_SPLIT_SIZES: dict[int, dict[str, int]] = {
    32: {"train": 1000, "validation": 100, "test": 100},
    64: {"train": 10000, "validation": 500, "test": 500},
    256: {"train": 10000, "validation": 500, "test": 500},
}


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """A synthetic_shapes variant. `split_sizes` maps split name -> number of examples."""

    image_size: int = 64
    split_sizes: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_SPLIT_SIZES[64])
    )
    seed: int = 0
    max_objects: int = shapes.MAX_OBJECTS


def _named_config(image_size: int) -> SyntheticShapesConfig:
    return SyntheticShapesConfig(
        name=f"{image_size}px", image_size=image_size,
        split_sizes=dict(DEFAULT_SPLIT_SIZES[image_size]),
        description=f"{image_size}x{image_size} scenes, splits {DEFAULT_SPLIT_SIZES[image_size]}.")


def make_config(image_size: int, split_sizes: dict[str, int] | None = None, seed: int = 0,
                ) -> SyntheticShapesConfig:
    """The registered config for `image_size` when sizes and seed are the defaults,
    else a custom config whose name encodes them (so its data gets its own folder)."""
    sizes = dict(split_sizes) if split_sizes is not None else DEFAULT_SPLIT_SIZES.get(image_size)
    if sizes is None:
        raise ValueError(f"No default split sizes for image_size={image_size}; pass split_sizes "
                         f"or use one of {sorted(DEFAULT_SPLIT_SIZES)}.")
    if sizes == DEFAULT_SPLIT_SIZES.get(image_size) and seed == 0:
        return SyntheticShapes.builder_configs[f"{image_size}px"]
    splits = "_".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    return SyntheticShapesConfig(name=f"{image_size}px_{splits}_seed{seed}", image_size=image_size,
                                 split_sizes=sizes, seed=seed)


def make_example(config: SyntheticShapesConfig, split: str, index: int) -> dict:
    """One example as the dict `SyntheticShapes` features expect."""
    example = synthetic_example(split, index, config.image_size, config.seed,
                                max_objects=config.max_objects)
    scene, size = example.scene, float(config.image_size)
    return {
        "id": example.doc_id,
        "image": example.image,
        "captions": example.captions,
        "scene": scene.to_json(),
        "objects": [{
            "label": s.kind, "color": s.color, "size": s.size,
            "box": np.array(s.box, np.int32),
            "bbox": tfds.features.BBox(ymin=s.box[1] / size, xmin=s.box[0] / size,
                                       ymax=s.box[3] / size, xmax=s.box[2] / size),
        } for s in scene.shapes],
    }


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Scenes of 1-3 colored shapes with captions; see `cm3leon_jax.data.shapes`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 6 classes, 8 colors, 3 sizes, plain/striped/checkered/"
                 "speckled backgrounds, 4 captions per scene, scene JSON, int and "
                 "normalized boxes.",
    }
    BUILDER_CONFIGS = [_named_config(32), _named_config(64), _named_config(256)]
    DEFAULT_CONFIG_NAME = "64px"

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description="Synthetic shapes: flat-colored shapes on plain or textured "
            "backgrounds, exactly parseable (cm3leon_jax.data.parse).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(n, n, 3)),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "scene": tfds.features.Text(
                        doc="Scene JSON: shapes.Scene.from_json re-renders it."
                    ),
                    "objects": tfds.features.Sequence(
                        {
                            "label": tfds.features.ClassLabel(names=list(shapes.KINDS)),
                            "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
                            "size": tfds.features.ClassLabel(names=list(shapes.SIZES)),
                            "box": tfds.features.Tensor(
                                shape=(4,),
                                dtype=np.int32,
                                doc="x0, y0, x1, y1 pixels, ends exclusive",
                            ),
                            "bbox": tfds.features.BBoxFeature(),
                        }
                    ),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/cm3leon-jax",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: everything is generated here
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            example = make_example(self.builder_config, split, index)
            yield example["id"], example


def offline_download_config() -> tfds.download.DownloadConfig:
    """A DownloadConfig that never reaches the network (no GCS mirror, no stats job)."""
    return tfds.download.DownloadConfig(try_download_gcs=False,
                                        compute_stats=tfds.download.ComputeStatsMode.SKIP)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """`builder.download_and_prepare` with no network access; a no-op once built."""
    builder.download_and_prepare(download_config=offline_download_config())
    return builder


@gin.configurable
def load_synthetic(split: str, image_size: int = 64, data_dir: str | None = None, *,
                   split_sizes: dict[str, int] | None = None, seed: int = 0,
                   shuffle_files: bool = False) -> tf.data.Dataset:
    """The `split` of synthetic_shapes at `image_size`, built under `data_dir` if needed.

    data_dir: TFDS data folder (default: TFDS_DATA_DIR or ~/tensorflow_datasets).
    Returns a tf.data.Dataset of dicts with the features of `SyntheticShapes`.
    """
    config = make_config(image_size, split_sizes, seed)
    if split.split("[")[0] not in config.split_sizes:
        raise ValueError(f"Unknown split {split!r}; this config has {sorted(config.split_sizes)}.")
    builder = prepare(SyntheticShapes(config=config, data_dir=data_dir))
    return builder.as_dataset(split=split, shuffle_files=shuffle_files)
