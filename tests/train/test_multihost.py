"""Two processes on localhost (gloo CPU collectives) train exactly like one with 2 devices.

The two-process job uses a DCN axis (`train_mesh.dcn_data = 2`, one device per
process), so the multi-slice mesh path is exercised too; the data is cut into the same
2 data shards either way, so both jobs see the same global batches. The one-process
reference runs in the test's own process, on two of its eight fake devices.
"""

import json
import os
import socket

import gin
import jax
import train_testlib as lib


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
