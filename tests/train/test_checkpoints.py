"""Checkpoints: restore onto another mesh shape, fall back past a corrupt one."""

import functools
import logging
import os

import gin
import jax
import numpy as np
import pytest

from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.train import checkpoints, data as data_lib, optimizer
from cm3leon_jax.train import state as state_lib, step as step_lib
from train_testlib import tiny_config

CONFIG = tiny_config()
TX = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, decay_steps=10))


@pytest.fixture
def data(corpus):
    """A real data iterator (its position is part of every checkpoint)."""
    gin.clear_config()
    gin.bind_parameter("data_dirs.synthetic", corpus[0])
    make = functools.partial(data_lib.seqio_shard_dataset, task="cm3leon_synthetic",
                             seq_len=64, seed=0)
    mesh = partitioning.make_mesh(data=-1)
    yield data_lib.ShardedBatches(make, 8, 64, step_lib.batch_sharding(mesh, (8, 64)), 1)
    gin.clear_config()


def _state(mesh, seed):
    with jax.set_mesh(mesh):
        return state_lib.create_train_state(Decoder(CONFIG), TX, mesh, seed)


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_a_different_mesh_shape(tmp_path, data):
    saved = _state(partitioning.make_mesh(data=-1), seed=1)
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=5)
    assert not ckpt.save(3, saved, data)  # Not due.
    assert ckpt.save(5, saved, data)
    ckpt.close()

    other = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, other)
    restored = checkpoints.Checkpointer(str(tmp_path)).restore(abstract, data)
    _assert_equal(saved, restored)
    wi = restored.params["layers"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.spec == abstract.params["layers"]["mlp"]["wi"]["kernel"].sharding.spec
    assert wi.sharding.mesh.shape == other.shape


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_corrupt_checkpoints_fall_back_to_the_newest_good_one(tmp_path, data, caplog):
    """Step 6 truncated, step 4 with flipped bytes (same size): step 2 is restored."""
    mesh = partitioning.make_mesh(data=-1)
    states = {step: _state(mesh, seed=step) for step in (2, 4, 6)}
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=2, keep=3)
    for step, state in states.items():
        assert ckpt.save(step, state, data)
    ckpt.close()
    victim = _largest_file(tmp_path / "6" / "state")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    victim = _largest_file(tmp_path / "4" / "state")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 3)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))

    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=2)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(abstract, data)
    _assert_equal(states[2], restored)
    assert ckpt.last_good_step == 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 2 and "step 6" in warnings[0] and "step 4" in warnings[1]
    assert "checksum" in warnings[1]
    assert (tmp_path / "corrupt.6").exists() and not (tmp_path / "6").exists()
    assert ckpt.save(4, states[4], data)  # Training can reach step 4 again and save it.
    ckpt.close()


def test_no_checkpoint_restores_nothing(tmp_path, data):
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, partitioning.make_mesh())
    assert checkpoints.Checkpointer(str(tmp_path)).restore(abstract, data) is None


def test_a_relative_directory_saves_and_restores(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `MODEL_DIR='runs/x'` as a user types it
    saved = _state(partitioning.make_mesh(data=-1), seed=2)
    ckpt = checkpoints.Checkpointer("runs/x/checkpoints", save_every=1)
    assert ckpt.save(1, saved, data)
    ckpt.close()
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, partitioning.make_mesh(data=-1))
    _assert_equal(saved, checkpoints.Checkpointer("runs/x/checkpoints").restore(abstract, data))
    assert (tmp_path / "runs/x/checkpoints").is_dir()
