"""Global batches from data shards, and the iterator position saved and restored."""

import functools
import json
import logging

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf

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


def _batches(make_data, mesh_shape=(2, 4, 1), num_shards=2, batch=8, seed=None):
    mesh = partitioning.make_mesh(*mesh_shape)
    sharding = step_lib.batch_sharding(mesh, (batch, SEQ_LEN))
    return data_lib.ShardedBatches(make_data, batch, SEQ_LEN, sharding, num_shards, seed)


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


@pytest.mark.slow
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


def _seed_rows(shard, num_shards, rows, seed):
    """Row i of a shard: its pipeline's seed and i, in every column (no seqio: fast)."""
    del shard, num_shards
    ds = tf.data.Dataset.range(1 << 20).map(lambda i: {
        "seed": tf.fill([SEQ_LEN], tf.constant(seed, tf.int32)),
        "index": tf.fill([SEQ_LEN], tf.cast(i, tf.int32))})
    return ds.batch(rows, drop_remainder=True)


# Like the trainer's make_data before shards had their own seeds: the run's seed bound in.
SEEDED = functools.partial(_seed_rows, seed=7)


def _seeds_of(batch, num_shards=2):
    rows = len(batch["seed"]) // num_shards
    return [int(batch["seed"][s * rows, 0]) for s in range(num_shards)]


def test_each_shard_draws_from_its_own_seed_and_shard_0_from_the_run_seed():
    """On one seed, row j of every shard got the same shuffle, mixture and augmentation
    draws (32 shards: every decision 32 times in a global batch)."""
    (batch,) = _take(_batches(SEEDED, num_shards=4, seed=7), 1)
    seeds = _seeds_of(batch, 4)
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [data_lib.shard_seed(7, s) for s in range(4)]
    assert [data_lib.shard_seed(s, 0) for s in (0, 1, 2**40)] == [0, 1, 2**40]
    assert data_lib.shard_seed(0, 1) != data_lib.shard_seed(1, 0)  # Not `seed + shard`.


def test_a_one_shard_run_reads_what_it_read_before_shards_had_their_own_seeds(make_data):
    """The run's seed given to `ShardedBatches` (the trainer's way now) or bound into
    `make_data` (its way before): the same batches."""
    unseeded = functools.partial(make_data, seed=None)
    (now,) = _take(_batches(unseeded, num_shards=1, seed=1), 1)
    before = next(make_data(0, 1, 8).as_numpy_iterator())  # make_data binds seed=1.
    for k, v in before.items():
        np.testing.assert_array_equal(now[k], v)


def test_a_position_saved_before_shards_had_own_seeds_resumes_on_the_run_seed(tmp_path,
                                                                             caplog):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    # A run before the change: every shard's pipeline on the run's seed, no "shard_seeds".
    before = _batches(SEEDED)
    _take(before, 2)
    before.save(old)
    with open(f"{old}/data_spec.json") as f:
        spec = json.load(f)
    assert "shard_seeds" not in spec
    with open(f"{old}/data_spec.json", "w") as f:
        json.dump({**spec, "seed": 7}, f)  # What such a run with train.seed=7 wrote.
    expected = _take(before, 2)
    resumed = _batches(SEEDED, seed=7)
    with caplog.at_level(logging.WARNING, logger=data_lib.__name__):
        resumed.restore(old)
    assert "saved before data shards had their own seeds" in caplog.text
    got = _take(resumed, 2)
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert _seeds_of(got[0]) == [7, 7] and got[0]["index"][0, 0] == 8
    resumed.save(new)  # It goes on saying so: the next resume stays on the run's seed.
    with open(f"{new}/data_spec.json") as f:
        assert "shard_seeds" not in json.load(f)
    resumed.restart()  # Back to the start (e.g. after a failed read): the shards' own seeds.
    assert _seeds_of(_take(resumed, 1)[0]) == [7, data_lib.shard_seed(7, 1)]


def test_a_position_saved_with_own_seeds_resumes_on_them(tmp_path, caplog):
    it = _batches(SEEDED, seed=7)
    _take(it, 2)
    it.save(str(tmp_path))
    with open(tmp_path / "data_spec.json") as f:
        assert json.load(f)["shard_seeds"] is True
    expected = _take(it, 2)
    resumed = _batches(SEEDED, seed=7)
    with caplog.at_level(logging.WARNING, logger=data_lib.__name__):
        resumed.restore(str(tmp_path))
    assert "own seeds" not in caplog.text
    got = _take(resumed, 2)
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert _seeds_of(got[0]) == [7, data_lib.shard_seed(7, 1)] and got[0]["index"][0, 0] == 8
