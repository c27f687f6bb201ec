"""The synthetic_shapes TFDS builder: offline, deterministic, self-consistent."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cm3leon_jax.data import parse, shapes
from cm3leon_jax.data import synthetic_tfds as st

TINY = {"train": 12, "test": 4}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def build(data_dir) -> tfds.core.DatasetBuilder:
    return st.prepare(st.SyntheticShapes(config=st.make_config(32, TINY), data_dir=str(data_dir)))


def shard_bytes(builder) -> dict[str, bytes]:
    files = sorted(builder.data_path.glob("*.tfrecord*"))
    assert files, f"no records under {builder.data_path}"
    return {f.name: f.read_bytes() for f in files}


def test_tiny_build_is_offline_and_byte_identical_twice(tmp_path, no_network):
    first = build(tmp_path / "a")
    second = st.SyntheticShapes(config=st.make_config(32, TINY), data_dir=str(tmp_path / "b"))
    second.download_and_prepare()  # the plain call must stay offline too
    assert (
        first.info.splits["train"].num_examples == 12
        and first.info.splits["test"].num_examples == 4
    )
    assert shard_bytes(first) == shard_bytes(second)


def test_examples_have_the_declared_features_and_agree_with_their_scene(tmp_path, no_network):
    builder = build(tmp_path)
    assert set(builder.info.features) == {"id", "image", "captions", "scene", "objects"}
    examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
    assert sorted(e["id"].decode() for e in examples) == [f"test_{i:07d}" for i in range(4)]
    labels = builder.info.features["objects"]["label"].names
    colors = builder.info.features["objects"]["color"].names
    for e in examples:
        scene = shapes.Scene.from_json(e["scene"].decode())
        assert e["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(e["image"], shapes.render(scene))
        assert len(e["captions"]) == 4
        objects = e["objects"]
        assert [labels[i] for i in objects["label"]] == [s.kind for s in scene.shapes]
        assert [colors[i] for i in objects["color"]] == [s.color for s in scene.shapes]
        np.testing.assert_array_equal(objects["box"], [s.box for s in scene.shapes])
        ymin_xmin_ymax_xmax = np.array([[b[1], b[0], b[3], b[2]] for b in objects["box"]]) / 32
        np.testing.assert_allclose(objects["bbox"], ymin_xmin_ymax_xmax, atol=1e-6)
        assert parse.match(parse.parse_image(e["image"]), scene, exact=True)["all_correct"]


def test_examples_do_not_depend_on_order_or_split_sizes():
    small, large = st.make_config(32, {"train": 3}), st.make_config(32, {"train": 50, "test": 5})
    assert small.name != large.name
    for index in (0, 2):
        a, b = st.make_example(small, "train", index), st.make_example(large, "train", index)
        assert a["scene"] == b["scene"] and a["captions"] == b["captions"]
    assert st.make_example(large, "train", 0)["scene"] != st.make_example(large, "test", 0)["scene"]
    reseeded = st.make_config(32, {"train": 3}, seed=1)
    assert (
        st.make_example(reseeded, "train", 0)["scene"]
        != st.make_example(small, "train", 0)["scene"]
    )


def test_registered_configs_and_helpful_errors(tmp_path):
    assert {"32px", "64px", "256px"} <= set(st.SyntheticShapes.builder_configs)
    assert st.make_config(64) is st.SyntheticShapes.builder_configs["64px"]
    assert st.SyntheticShapes.builder_configs["64px"].split_sizes == {
        "train": 10000,
        "validation": 500,
        "test": 500,
    }
    assert "1.0.0" in st.SyntheticShapes.RELEASE_NOTES
    with pytest.raises(ValueError, match="No default split sizes"):
        st.make_config(48)
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        st.load_synthetic("dev", 32, str(tmp_path), split_sizes=TINY)


def test_load_synthetic_builds_then_reuses(tmp_path):
    ds = st.load_synthetic("train", 32, str(tmp_path), split_sizes=TINY)
    assert sum(1 for _ in ds) == 12
    again = st.load_synthetic("train[:5]", 32, str(tmp_path), split_sizes=TINY)
    assert sum(1 for _ in again) == 5
