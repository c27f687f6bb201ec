"""Global batches from data shards, and the iterator position saved and restored."""

import functools

import gin
import jax
import numpy as np
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.train import data as data_lib
from cm3leon_jax.train import step as step_lib

SEQ_LEN = 128


@pytest.fixture
def make_data(corpus):
    gin.clear_config()
    gin.bind_parameter("data_dirs.synthetic", corpus[0])
    yield functools.partial(data_lib.seqio_shard_dataset, task="cm3leon_synthetic",
                            seq_len=SEQ_LEN, seed=1)
    gin.clear_config()


def _batches(make_data, mesh_shape=(2, 4, 1), num_shards=2, batch=8):
    mesh = partitioning.make_mesh(*mesh_shape)
    sharding = step_lib.batch_sharding(mesh, (batch, SEQ_LEN))
    return data_lib.ShardedBatches(make_data, batch, SEQ_LEN, sharding, num_shards)


def _take(it, n):
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def test_global_batch_is_the_shards_side_by_side(make_data):
    it = _batches(make_data)
    (batch,) = _take(it, 1)
    assert batch["decoder_target_tokens"].shape == (8, SEQ_LEN)
    assert batch["decoder_loss_weights"].dtype == np.float32
    for s in (0, 1):
        expected = next(make_data(s, 2, 4).as_numpy_iterator())
        for k, v in expected.items():
            np.testing.assert_array_equal(batch[k][4 * s:4 * (s + 1)], v)
    # Another layout of the same devices reads the same global batches.
    (again,) = _take(_batches(make_data, mesh_shape=(1, 2, 4)), 1)
    for k in batch:
        np.testing.assert_array_equal(batch[k], again[k])


def test_restored_iterator_continues_where_the_saved_one_was(make_data, tmp_path):
    it = _batches(make_data)
    first, _ = _take(it, 2)  # What an unrestored iterator (same seed) starts with.
    it.save(str(tmp_path))
    expected = _take(it, 3)
    fresh = _batches(make_data)
    fresh.restore(str(tmp_path))
    got = _take(fresh, 3)
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(first["decoder_target_tokens"],  # The test can fail.
                              expected[0]["decoder_target_tokens"])


def test_restoring_with_another_layout_is_a_clear_error(make_data, tmp_path):
    it = _batches(make_data)
    it.save(str(tmp_path))
    with pytest.raises(ValueError, match="num_data_shards"):
        _batches(make_data, num_shards=1).restore(str(tmp_path))  # 1 pipeline to build, not 4.
    with pytest.raises(ValueError, match="does not split"):
        _batches(make_data, num_shards=3)


def test_without_the_autotuner_the_batches_and_their_restore_are_the_same(make_data, tmp_path):
    plain = functools.partial(make_data, autotune=False)
    assert plain(0, 1, 4).options().autotune.enabled is False
    tuned, untuned = _batches(make_data), _batches(plain)
    expected = _take(tuned, 2)
    got = _take(untuned, 2)
    untuned.save(str(tmp_path))
    after = _take(untuned, 1)
    fresh = _batches(plain)
    fresh.restore(str(tmp_path))
    for a, b in zip(expected + after, got + _take(fresh, 1)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # A position saved with the autotuner does not restore without it (another graph):
    # refused by name, before tf.data's own error.
    tuned.save(str(tmp_path / "tuned"))
    other = _batches(plain)
    with pytest.raises(ValueError, match="autotune True in the checkpoint, False now"):
        other.restore(str(tmp_path / "tuned"))
    # Any other change of the pipeline: tf.data's refusal, named as ours.
    other.layout_difference = lambda directory: None
    with pytest.raises(UserInputError, match="does not fit this run's input pipeline"):
        other.restore(str(tmp_path / "tuned"))
