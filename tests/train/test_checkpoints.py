"""Checkpoints: restore onto another mesh shape, fall back past a corrupt one, refuse one
that does not fit without touching it, and survive a write that fails part-way."""

import errno
import functools
import logging
import os
import subprocess

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf
import train_testlib as lib
from train_testlib import tiny_config

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import partitioning
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.train import checkpoints, optimizer
from cm3leon_jax.train import data as data_lib
from cm3leon_jax.train import state as state_lib
from cm3leon_jax.train import step as step_lib

CONFIG = tiny_config()
TX = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, decay_steps=10))


def _batches(corpus, rows=8, seq_len=128):
    """(At 64 tokens no document of the corpus fits beside the CM3 reserve: the pipeline,
    never read here until the tasks checked it, held nothing.)"""
    gin.bind_parameter("data_dirs.synthetic", corpus[0])
    make = functools.partial(data_lib.seqio_shard_dataset, task="cm3leon_synthetic",
                             seq_len=seq_len, seed=0)
    mesh = partitioning.make_mesh(data=-1)
    return data_lib.ShardedBatches(make, rows, seq_len,
                                   step_lib.batch_sharding(mesh, (rows, seq_len)), 1)


@pytest.fixture
def data(corpus):
    """A real data iterator (its position is part of every checkpoint)."""
    gin.clear_config()
    yield _batches(corpus)
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

    # Step 4 goes bad again: set aside beside the first one, which is never deleted.
    victim = _largest_file(tmp_path / "4" / "state")
    with open(victim, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        restored = checkpoints.Checkpointer(str(tmp_path), save_every=2).restore(abstract, data)
    _assert_equal(states[2], restored)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("corrupt")) == [
        "corrupt.4", "corrupt.4.2", "corrupt.6"]


def test_a_checkpoint_that_does_not_fit_is_one_error_and_left_byte_identical(tmp_path, data,
                                                                             corpus):
    """Another model size, then another batch: one error each, naming what differs and
    what to do; no file changes, nothing is set aside, and the same Checkpointer still
    restores with the right config."""
    mesh = partitioning.make_mesh(data=-1)
    states = {step: _state(mesh, seed=step) for step in (2, 4)}
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=2)
    for step, state in states.items():
        ckpt.save(step, state, data)
    ckpt.close()
    before = lib.tree_digests(tmp_path)

    bigger = tiny_config(d_model=128, mlp_dim=512)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=2)
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        ckpt.restore(state_lib.abstract_train_state(Decoder(bigger), TX, mesh), data)
    message = str(error.value)
    assert isinstance(error.value, UserInputError) and "\n" not in message
    assert "step 4" in message and "does not fit" in message
    assert ("params/layers/attention/key/kernel is (2, 64, 4, 16) float32 in the checkpoint "
            "but (2, 128, 4, 32) float32 in this config") in message, message
    assert "another MODEL_DIR" in message and f"{tmp_path}/config.gin" in message

    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"data layout differs \(global_batch 8 in the checkpoint, 16 now\)"):
        ckpt.restore(abstract, _batches(corpus, rows=16))
    assert lib.tree_digests(tmp_path) == before

    _assert_equal(states[4], ckpt.restore(abstract, data))  # The manager is still usable.


def test_what_is_not_corruption_is_refused_and_left_in_place(tmp_path, data, monkeypatch):
    """Three checkpoints that are whole but not this run's: another trainer's (no data
    position: an image tokenizer's MODEL_DIR), one of another dtype (a restore would cast
    it), and an unverified one whose data position the input pipeline refuses. Each is one
    error; nothing is set aside or changed, and the iterators are back at their start."""
    mesh = partitioning.make_mesh(data=-1)
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    state = _state(mesh, seed=1)
    other = checkpoints.Checkpointer(str(tmp_path / "tokenizer"), save_every=2)
    other.save(2, state, None)  # What a trainer without a data position writes.
    other.close()
    before = lib.tree_digests(tmp_path)
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"holds no data item .*another kind of run wrote it"):
        checkpoints.Checkpointer(str(tmp_path / "tokenizer")).restore(abstract, data)

    # An image tokenizer's checkpoints record their batches in a data item of their own
    # (`vqgan_train.RunRecord`); unverified, a decoder restore set them aside as corrupt.
    from cm3leon_jax.vocab.vqgan_train import RunRecord
    for name, theirs, ours in (("tokenizer2", RunRecord(16, 32, 100), data),
                               ("decoder", data, RunRecord(16, 32, 100))):
        other = checkpoints.Checkpointer(str(tmp_path / name), save_every=2, checksums=False)
        other.save(2, state, theirs)
        other.close()
        before = lib.tree_digests(tmp_path)
        with pytest.raises(checkpoints.CheckpointMismatchError,
                           match="another kind of run wrote"):
            checkpoints.Checkpointer(str(tmp_path / name), checksums=False).restore(
                abstract, ours)
        assert lib.tree_digests(tmp_path) == before

    ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), save_every=2, checksums=False)
    ckpt.save(2, state, data)
    ckpt.close()
    before = lib.tree_digests(tmp_path)
    as_bf16 = abstract.replace(params=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.bfloat16, sharding=x.sharding),
        abstract.params))
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"float32 in the checkpoint but \(\d+(, \d+)*\) bfloat16"):
        checkpoints.Checkpointer(str(tmp_path / "run")).restore(as_bf16, data)

    restarts = []
    restart = data.restart
    monkeypatch.setattr(data, "restart", lambda: (restarts.append(1), restart()))

    def refuse(directory):
        raise UserInputError(f"the data position saved in {directory} does not fit")
    monkeypatch.setattr(data, "restore", refuse)
    with pytest.raises(UserInputError, match="does not fit"):
        checkpoints.Checkpointer(str(tmp_path / "run"), checksums=False).restore(abstract, data)
    assert restarts and lib.tree_digests(tmp_path) == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("corrupt")]
    ckpt.close()
    assert lib.tree_digests(tmp_path) == before


def test_an_unverified_unreadable_checkpoint_falls_back_and_the_manager_works(tmp_path, data,
                                                                              caplog):
    """Without checksums, a truncated file is found by orbax's read; that read fails inside
    orbax, which must not leave the manager broken for the fallback and the next save."""
    mesh = partitioning.make_mesh(data=-1)
    states = {step: _state(mesh, seed=step) for step in (1, 2)}
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, checksums=False)
    for step, state in states.items():
        ckpt.save(step, state, data)
    ckpt.close()
    victim = _largest_file(tmp_path / "2" / "state")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, checksums=False)
    with caplog.at_level(logging.WARNING):
        _assert_equal(states[1], ckpt.restore(abstract, data))
    assert (tmp_path / "corrupt.2").is_dir()
    assert ckpt.save(2, states[2], data)
    ckpt.close()
    _assert_equal(states[2], checkpoints.Checkpointer(str(tmp_path)).restore(abstract, data))


def test_a_storage_outage_or_the_last_unverified_checkpoint_is_never_set_aside(
        tmp_path, data, monkeypatch):
    """A read that fails for the storage's sake (here orbax's restore raising a 503) moved
    good checkpoints aside one by one and trained from step 0. Now it is raised, and the
    last unverified checkpoint that cannot be read stays in place: the run stops."""
    mesh = partitioning.make_mesh(data=-1)
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, checksums=False)
    for step in (1, 2):
        ckpt.save(step, _state(mesh, seed=step), data)
    ckpt.close()
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    before = lib.tree_digests(tmp_path)
    reader = checkpoints.Checkpointer(str(tmp_path), save_every=1, checksums=False)

    def outage(*args, **kwargs):
        raise ConnectionError("503 Service Unavailable")
    monkeypatch.setattr(reader._manager, "restore", outage)
    with pytest.raises(ConnectionError, match="503"):
        reader.restore(abstract, data)
    assert lib.tree_digests(tmp_path) == before
    reader.close()
    monkeypatch.undo()
    for step in (2, 1):  # Both truncated: 2 is set aside for 1, which stays.
        victim = _largest_file(tmp_path / str(step) / "state")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    reader = checkpoints.Checkpointer(str(tmp_path), save_every=1, checksums=False)
    with pytest.raises(checkpoints.UnreadableCheckpointError,
                       match=r"step 1 .* no earlier one.*left in place"):
        reader.restore(abstract, data)
    reader.close()
    assert (tmp_path / "corrupt.2").is_dir() and (tmp_path / "1").is_dir()


def _fail_partway_through_iterator_writes(monkeypatch):
    """tf.train.Checkpoint.write writes half a file, then the disk is full."""
    def write(self, prefix, *args, **kwargs):
        with open(f"{prefix}.index", "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", prefix)
    monkeypatch.setattr(tf.train.Checkpoint, "write", write)


@pytest.fixture
def tiny_disk(tmp_path):
    """mount(size_bytes) -> a tmpfs of that size (unmounted after the test)."""
    mounted = []

    def mount(size):
        where = tmp_path / "tmpfs"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the raising write "
                        "case covers a failed write")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def _size(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("fault", ["raising write", "tiny tmpfs"])
def test_a_write_that_fails_partway_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch,
                                                                  request, fault):
    mesh = partitioning.make_mesh(data=-1)
    states = {step: _state(mesh, seed=step) for step in (2, 4)}
    root = tmp_path
    if fault == "tiny tmpfs":  # Room for one checkpoint and a half: the second cannot fit.
        measure = checkpoints.Checkpointer(str(tmp_path / "measure"), save_every=2)
        measure.save(2, states[2], data)
        measure.close()
        root = request.getfixturevalue("tiny_disk")(_size(tmp_path / "measure") * 3 // 2)
    ckpt = checkpoints.Checkpointer(str(root / "checkpoints"), save_every=2, keep=3)
    assert ckpt.save(2, states[2], data)
    ckpt.wait()
    before = lib.tree_digests(root / "checkpoints" / "2")
    if fault == "raising write":
        _fail_partway_through_iterator_writes(monkeypatch)
    with pytest.raises(checkpoints.CheckpointSaveError) as error:
        ckpt.save(4, states[4], data)
        ckpt.close()  # An asynchronous write fails here, at the latest.
    message = str(error.value)
    assert "checkpoint of step 4 failed" in message and "No space left" in message, message
    assert f"last complete checkpoint is step 2 in {root}/checkpoints/2, untouched" in message
    assert ckpt.describe_last_good().startswith("step 2 in")
    monkeypatch.undo()
    assert lib.tree_digests(root / "checkpoints" / "2") == before
    abstract = state_lib.abstract_train_state(Decoder(CONFIG), TX, mesh)
    ckpt = checkpoints.Checkpointer(str(root / "checkpoints"), save_every=2)
    _assert_equal(states[2], ckpt.restore(abstract, data))
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


def _step_folders(root, *names):
    for name in names:
        (root / name / "state").mkdir(parents=True)


def test_a_save_not_yet_finished_is_not_a_step(tmp_path, monkeypatch):
    """On local disks orbax renames a finished save into `<step>` (a temporary name until
    then); on gs:// it writes `<step>` in place and adds commit_success.txt last, so a
    digit folder without one there is a save in flight or cut off, which restore must
    not take for the newest checkpoint."""
    from orbax.checkpoint._src.path import gcs_utils

    from cm3leon_jax.decode import restore
    from cm3leon_jax.vocab import vqgan_checkpoint

    root = tmp_path / "checkpoints"
    _step_folders(root, "1", "2", "3.orbax-checkpoint-tmp-1700000000", "corrupt.4")
    listings = (lambda: checkpoints.finished_steps(str(root)),
                lambda: restore.checkpoint_steps(str(tmp_path)),
                lambda: vqgan_checkpoint.steps(str(tmp_path)))
    assert [f() for f in listings] == [[1, 2]] * 3
    # As on a bucket: only the steps orbax marked committed.
    monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)
    (root / "1" / "commit_success.txt").write_text("")
    assert [f() for f in listings] == [[1]] * 3
    assert checkpoints.finished_steps(str(tmp_path / "none")) == []


def _agreed_with(monkeypatch, codes, read):
    """`checkpoints.agreed(read)` on process 0 of a job whose processes report `codes`."""
    monkeypatch.setattr(checkpoints.distributed, "gather", lambda code: [code, *codes[1:]])
    return checkpoints.agreed(read, "reading step 2")


def test_processes_agree_on_what_a_checkpoint_read_came_to(monkeypatch):
    """A step that another process could not read is corrupt here too (every process sets
    it aside and tries the previous one); one that failed otherwise there stops this one
    too; this process's own error wins over what the others report."""
    assert _agreed_with(monkeypatch, [0, 0], lambda: "params") == "params"
    with pytest.raises(checkpoints.CorruptCheckpointError, match="process 1 could not read"):
        _agreed_with(monkeypatch, [0, 1], lambda: "params")
    with pytest.raises(RuntimeError, match="reading step 2 failed on process 2"):
        _agreed_with(monkeypatch, [0, 1, 2], lambda: "params")

    def fails(error):
        def read():
            raise error
        return read
    with pytest.raises(checkpoints.CorruptCheckpointError, match="its files"):
        _agreed_with(monkeypatch, [0, 0], fails(checkpoints.CorruptCheckpointError("its files")))
    with pytest.raises(UserInputError, match="another size"):
        _agreed_with(monkeypatch, [0, 1], fails(UserInputError("another size")))
    with pytest.raises(RuntimeError, match="on process 1"):  # Another's error outranks it.
        _agreed_with(monkeypatch, [0, 2], fails(checkpoints.CorruptCheckpointError("x")))


def test_checksums_read_files_together_and_name_the_first_damaged_one(tmp_path, monkeypatch):
    """Files are summed several at a time (a 7B state on gs:// in one stream would take
    much of orbax's commit timeout); the record is what one reader would write, and a
    check names the first damaged file in the record's order, whichever finished first."""
    import json
    import zlib

    from etils import epath

    rng = np.random.default_rng(0)
    blobs = {f"state/d/{i:02d}": rng.bytes(int(n)) for i, n in
             enumerate(rng.integers(0, 3 << 20, size=24))}
    for rel, blob in blobs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(blob)
    monkeypatch.setattr(checkpoints, "READERS", 4)
    root = epath.Path(tmp_path)
    checkpoints.write_checksums(root)
    recorded = json.loads((tmp_path / checkpoints.CHECKSUMS).read_text())["crc32"]
    assert recorded == {rel: [len(b), zlib.crc32(b)] for rel, b in blobs.items()}
    assert checkpoints.verify_checksums(root)

    (tmp_path / "state/d/20").write_bytes(b"")  # Damaged late in the order...
    flipped = bytearray(blobs["state/d/07"])
    flipped[len(flipped) // 2] ^= 1  # ...and earlier: that one is named.
    (tmp_path / "state/d/07").write_bytes(bytes(flipped))
    with pytest.raises(checkpoints.CorruptCheckpointError, match="d/07 does not match"):
        checkpoints.verify_checksums(root)
    (tmp_path / "state/d/03").unlink()
    with pytest.raises(checkpoints.CorruptCheckpointError, match="d/03 is missing"):
        checkpoints.verify_checksums(root)
