"""`demo/apart.py`: a demo stage in a process of its own sees this process's gin config,
keeps freed host memory, hands back its result, its input errors and its preemption."""

import os
import signal
import threading
import time

import gin
import pytest

from cm3leon_jax import hostmem
from cm3leon_jax.demo import apart
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError

PROBE = "cm3leon_jax.testing.stage_probe"


@pytest.fixture
def demo_config(monkeypatch):
    monkeypatch.delenv(hostmem.ENV, raising=False)
    gin.clear_config()
    gin.parse_config(["import cm3leon_jax.demo", "demo.image_size = 48"])
    yield
    gin.clear_config()


def test_the_child_sees_the_config_keeps_memory_and_returns_its_result(demo_config):
    seen = apart.run(f"{PROBE}:report", {"binding": "demo.image_size"}, "probe")
    assert seen["value"] == 48
    assert seen["host_memory"] == "retain" and seen["pid"] != os.getpid()


def test_an_explicit_memory_policy_is_kept(demo_config, monkeypatch):
    monkeypatch.setenv(hostmem.ENV, "default")
    seen = apart.run(f"{PROBE}:report", {"binding": "demo.image_size"}, "probe")
    assert seen["host_memory"] == "default"


def test_input_errors_come_back_as_they_are_and_other_failures_name_the_stage(demo_config):
    with pytest.raises(UserInputError, match="^no such folder: x; give another$"):
        apart.run(f"{PROBE}:refuse", {"message": "no such folder: x; give another"}, "probe")
    with pytest.raises(apart.StageProcessError, match="demo's probe stage failed .*status 1"):
        apart.run(f"{PROBE}:crash", {"message": "a bug"}, "probe")
    # A checkpoint of another config stays that kind of error (main.run undoes for it).
    with pytest.raises(ModelDirMismatchError, match="^built by another config$"):
        apart.run(f"{PROBE}:refuse", {"message": "built by another config", "mismatch": True},
                  "probe")


def test_a_sigterm_here_reaches_the_child_which_stops_as_preempted(demo_config, tmp_path):
    marker = str(tmp_path / "listening")

    def terminate_once_listening():
        while not os.path.exists(marker):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the demo would

    killer = threading.Thread(target=terminate_once_listening, daemon=True)
    killer.start()
    start = time.monotonic()
    result = apart.run(f"{PROBE}:wait_for_sigterm", {"marker": marker, "seconds": 60}, "probe")
    killer.join()
    assert result == {"preempted": True} and time.monotonic() - start < 50


def test_a_sigterm_before_the_child_listens_is_a_preemption_not_a_failure(demo_config,
                                                                          tmp_path):
    """The child dies of the SIGTERM passed on (no trainer listening yet): preempted."""
    marker = str(tmp_path / "started")

    def terminate_once_started():
        while not os.path.exists(marker):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_started, daemon=True)
    killer.start()
    result = apart.run(f"{PROBE}:sleep_without_listening", {"marker": marker, "seconds": 60},
                       "probe")
    killer.join()
    assert result == {"preempted": True}
