"""Two processes on localhost (gloo CPU collectives) train exactly like one with 2 devices.

The two-process job uses a DCN axis (`train_mesh.dcn_data = 2`, one device per
process), so the multi-slice mesh path is exercised too; the data is cut into the same
2 data shards either way, so both jobs see the same global batches. The one-process
reference runs in the test's own process, on two of its eight fake devices.
"""

import json
import os
import socket
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import train_testlib as lib
from test_sft_run import SFT_GIN, sft_bindings
from test_sft_run import base as sft_base  # noqa: F401  (a fixture, under this name here)


@gin.configurable
def multihost_reference_devices(count: int = 2) -> list:
    """The first `count` of this process's devices (the suite has eight fake ones)."""
    return jax.devices()[:count]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, \
        [r["eval/loss"] for r in rows if "eval/loss" in r]


def _xla_flags(devices: int) -> str:
    """This many fake CPU devices, LLVM at -O0 like the rest of the suite (tests/conftest.py)."""
    return (f"--xla_force_host_platform_device_count={devices} "
            "--xla_backend_optimization_level=0")


def test_two_processes_match_one_process_with_two_devices(corpus, tmp_path):
    path, vocab = corpus
    common = {"train.num_steps": 4, "train.num_data_shards": 2, "Checkpointer.save_every": 2,
              "make_mesh.fsdp": 1}
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    two = [lib.start_subprocess(
        lib.bindings(two_dir, path, vocab, **common,
                     **{"make_mesh.data": -1, "train_mesh.dcn_data": 2}),
        env={"XLA_FLAGS": _xla_flags(1),
             "CM3LEON_COORDINATOR": f"127.0.0.1:{port}", "CM3LEON_NUM_PROCESSES": "2",
             "CM3LEON_PROCESS_ID": str(i)},
        log_path=str(tmp_path / f"two_{i}.log")) for i in range(2)]
    try:
        # The one-process reference runs here, on two of this process's devices, while the
        # two processes run.
        lib.run_in_process(lib.bindings(
            one_dir, path, vocab, **common,
            **{"make_mesh.data": 2, "train_mesh.devices": "@multihost_reference_devices()"}))
        for proc, log in [(two[0], "two_0.log"), (two[1], "two_1.log")]:
            assert proc.wait(timeout=400) == 0, open(tmp_path / log).read()[-3000:]
    finally:  # A failed reference or a hung process leaves no job behind.
        for proc in two:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    (train_one, eval_one), (train_two, eval_two) = _losses(one_dir), _losses(two_dir)
    assert sorted(train_one) == [1, 2, 3, 4] and train_one == train_two
    assert eval_one and eval_one == eval_two
    assert sorted(int(n) for n in os.listdir(os.path.join(two_dir, "checkpoints"))
                  if n.isdigit()) == [2, 4]


def _run_job(args, tmp_path, name, timeout=400):
    """`python <args>` as 2 processes of one job (one fake device each, gloo collectives on
    localhost); returns their exit codes and logs. A process still running at `timeout` is
    killed (-9)."""
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(tmp_path / f"{name}_{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, *args], cwd=lib.REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": _xla_flags(1),
                 "CM3LEON_COORDINATOR": f"127.0.0.1:{port}", "CM3LEON_NUM_PROCESSES": "2",
                 "CM3LEON_PROCESS_ID": str(i)}))
    codes = []
    try:
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                codes.append(-9)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes, [(tmp_path / f"{name}_{i}.log").read_text() for i in range(2)]


def _start_jobs(gin_file, binding_list, tmp_path, name):
    """`python -m cm3leon_jax.main --gin_file=<gin_file>` as 2 processes of one job; both
    must succeed."""
    codes, logs = _run_job(["-m", "cm3leon_jax.main", f"--gin_file={gin_file}",
                            *[f"--gin.{b}" for b in binding_list]], tmp_path, name)
    for code, log in zip(codes, logs):
        assert code == 0, log[-3000:]


_STAGED_FAILS_ON_PROCESS_0 = """
import sys
import jax
from cm3leon_jax.train import distributed, staging
distributed.initialize()
try:
    with staging.staged(sys.argv[1]) as tmp:
        if jax.process_index() == 0:
            raise OSError("a copy only process 0 makes failed")
except Exception as e:
    print(f"raised {type(e).__name__}: {e}")
    sys.exit(3)
"""


@pytest.mark.slow
def test_a_staged_write_that_fails_on_one_process_fails_on_every_one(tmp_path):
    """Process 0 writes an export's manifest and copies alone: when that fails, the other
    processes raise too (they waited at a barrier until the job was killed), and nothing
    is left at the target."""
    target = str(tmp_path / "export")
    codes, logs = _run_job(["-c", _STAGED_FAILS_ON_PROCESS_0, target], tmp_path, "staged",
                           timeout=90)
    assert codes == [3, 3], logs
    assert "raised OSError: a copy only process 0" in logs[0]
    assert "raised RuntimeError: another process failed while writing" in logs[1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("export")]


@pytest.mark.slow
def test_sft_and_export_run_as_two_processes(sft_base, tmp_path):  # noqa: F811
    """A pod's fine-tuning and export: SFT restores the base over the job's mesh (restored
    onto one host's device, the parameters could not be put onto the job's shardings), and
    the export saves the image tokenizer restored on every host (orbax saves only arrays
    that span the processes)."""
    from cm3leon_jax.decode import restore
    from cm3leon_jax.vocab import vqgan_checkpoint
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    from tests.export.conftest import TINY_VQ

    sft_dir, export_dir = str(tmp_path / "sft"), str(tmp_path / "export")
    _start_jobs(SFT_GIN, sft_bindings(sft_dir, sft_base, **{
        "train.num_steps": 1, "train.num_data_shards": 2, "make_mesh.data": -1,
        "make_mesh.fsdp": 1, "train_mesh.dcn_data": 2}), tmp_path, "sft")
    assert lib.losses(sft_dir).keys() == {1}

    tokenizer = ImageTokenizer.random_init(TINY_VQ, seed=0)
    vqgan_checkpoint.save_params(str(tmp_path / "vq"), 0, TINY_VQ, tokenizer.params)
    _start_jobs(os.path.join(lib.REPO, "gin_configs", "runs", "export.gin"), [
        f"MODEL_DIR={export_dir!r}", f"export.checkpoint={sft_dir!r}",
        f"export.vocab_dir={sft_base[2]!r}", f"export.image_tokenizer_dir={str(tmp_path / 'vq')!r}",
        "export.dtype=None"], tmp_path, "export")
    config, params, step = restore.restore_decoder(os.path.join(export_dir, "export"))
    want = restore.restore_decoder(sft_dir, config=config)[1]
    assert step == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored, _, _ = vqgan_checkpoint.restore_params(os.path.join(export_dir, "export",
                                                                  "image_tokenizer"))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tokenizer.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_model_dir_process_0_cannot_make_stops_every_process(tmp_path):
    """Process 0 alone writes MODEL_DIR/config.gin: when it cannot, every process stops with
    the error (the others went on into the run and failed at its first collective, exit 1,
    without saying why)."""
    (tmp_path / "a_file").write_text("")
    model_dir = str(tmp_path / "a_file" / "run")
    codes, logs = _run_job(["-m", "cm3leon_jax.main",
                            "--gin_file=tests/launch/processes.gin",
                            f"--gin.MODEL_DIR={model_dir!r}"], tmp_path, "model_dir", timeout=90)
    assert codes == [2, 2], logs
    assert "cannot create MODEL_DIR" in logs[0]
    assert "process 0 could not write" in logs[1]


_RESTORE_WITH_A_FAULT_ON_PROCESS_1 = """
import json, os, sys, traceback
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from cm3leon_jax.train import distributed
distributed.initialize()
from cm3leon_jax.decode import restore
from cm3leon_jax.train import checkpoints, optimizer, state as state_lib
from cm3leon_jax.vocab import vqgan_checkpoint
from tests.model.model_testlib import random_params, tiny_config

root, me, config = sys.argv[1], jax.process_index(), tiny_config()

# Process 1 alone cannot read step 2's metadata (a flaky mount, a bad cache on one host).
stored_shapes, metadata = checkpoints.Checkpointer._stored_shapes, ocp.PyTreeCheckpointer.metadata
def failing_stored_shapes(self, step):
    if me == 1 and step == 2:
        raise OSError("process 1 cannot read step 2")
    return stored_shapes(self, step)
def failing_metadata(self, directory, *args, **kwargs):
    if me == 1 and os.path.basename(os.path.dirname(str(directory))) == "2":
        raise OSError("process 1 cannot read step 2")
    return metadata(self, directory, *args, **kwargs)
verify_checksums = checkpoints.verify_checksums
def failing_verify_checksums(step_dir):
    if me == 1 and str(step_dir).endswith("/vq/checkpoints/2"):
        raise checkpoints.CorruptCheckpointError("params/d/0 does not match its checksum")
    return verify_checksums(step_dir)
checkpoints.Checkpointer._stored_shapes = failing_stored_shapes
ocp.PyTreeCheckpointer.metadata = failing_metadata
checkpoints.verify_checksums = failing_verify_checksums

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 1, decay_steps=4))
params = random_params(config, seed=0)
state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        state)

def resume(name):
    ckpt = checkpoints.Checkpointer(os.path.join(root, name), async_save=False)
    try:
        return int(ckpt.restore(abstract, None).step)
    finally:
        ckpt.close()

for name, read in [("verified", lambda: resume("verified")),
                   ("unverified", lambda: resume("unverified")),
                   ("decoder", lambda: restore.restore_decoder(
                       os.path.join(root, "decoder"), None, config, every_process=True)[2]),
                   ("tokenizer", lambda: vqgan_checkpoint.restore_params(
                       os.path.join(root, "vq"), every_process=True)[2])]:
    try:
        print("RESULT", json.dumps([name, read()]), flush=True)
    except Exception as e:
        traceback.print_exc()
        print("RESULT", json.dumps([name, f"{type(e).__name__}: {e}"]), flush=True)
"""


@pytest.mark.slow
def test_processes_restore_the_same_step_when_one_cannot_read_the_newest(tmp_path):
    """Process 1 alone fails to read step 2. Without checksums that is corruption: every
    process sets it aside once and resumes step 1 (each decided alone: process 1 went back
    to step 1 while process 0 trained on from step 2). With checksums that match, it is
    not corruption and every process stops, the checkpoints untouched. An export on every
    process (`every_process=True`) reads the decoder's and the image tokenizer's step 1 on
    all when process 1 alone finds their step 2 damaged."""
    import shutil

    from cm3leon_jax.vocab import vqgan_checkpoint
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    from tests.data.test_preprocess import TINY_VQ
    from tests.model.model_testlib import tiny_config, write_train_checkpoints

    for step in (1, 2):
        vqgan_checkpoint.save_params(str(tmp_path / "vq"), step, TINY_VQ,
                                     ImageTokenizer.random_init(TINY_VQ, seed=step).params)
    write_train_checkpoints(str(tmp_path / "verified"), tiny_config(), (1, 2))
    shutil.copytree(tmp_path / "verified", tmp_path / "unverified")
    shutil.copytree(tmp_path / "verified", tmp_path / "decoder" / "checkpoints")
    for name in ("unverified", "decoder/checkpoints"):
        for step in ("1", "2"):
            os.remove(tmp_path / name / step / "checksums.json")
    codes, logs = _run_job(["-c", _RESTORE_WITH_A_FAULT_ON_PROCESS_1, str(tmp_path)], tmp_path,
                           "restore", timeout=180)
    assert codes == [0, 0], logs
    results = [dict(json.loads(line.split("RESULT ", 1)[1]) for line in log.splitlines()
                    if line.startswith("RESULT ")) for log in logs]
    assert results[1]["verified"] == "OSError: process 1 cannot read step 2", logs[1]
    assert results[0]["verified"].startswith("RuntimeError: restoring the checkpoint at step 2"), \
        logs[0]
    assert "failed on process 1" in results[0]["verified"]
    assert [r["unverified"] for r in results] == [1, 1], logs
    assert [r["decoder"] for r in results] == [1, 1], logs
    assert [r["tokenizer"] for r in results] == [1, 1], logs
    assert sorted(os.listdir(tmp_path / "verified")) == ["1", "2"]
    assert sorted(os.listdir(tmp_path / "unverified")) == ["1", "corrupt.2"]
    assert sorted(os.listdir(tmp_path / "decoder" / "checkpoints")) == ["1", "2"]
    assert sorted(os.listdir(tmp_path / "vq" / "checkpoints")) == ["1", "2"]
