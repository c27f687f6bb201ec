"""`xla_flags.add`: flags go into $XLA_FLAGS only while XLA has not started here."""

import os

import jax
import pytest
from jax._src import xla_bridge

from cm3leon_jax import xla_flags
from cm3leon_jax.errors import UserInputError

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_flags_are_appended_before_xla_starts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    assert xla_flags.add([FLAG], "demo.xla_flags") == [FLAG]
    assert xla_flags.add([FLAG], "demo.xla_flags") == []  # Already there: nothing to add.
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"


def test_after_xla_started_new_flags_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", FLAG)
    jax.devices()  # XLA has started in this process.
    assert xla_flags.add([FLAG], "demo.xla_flags") == []  # The same flags: fine.
    with pytest.raises(UserInputError, match="demo.xla_flags=.*already started"):
        xla_flags.add(["--xla_cpu_use_onednn=true"], "demo.xla_flags")
    with pytest.raises(UserInputError, match="not XLA flags"):
        xla_flags.add(["xla_cpu_use_onednn=true"], "demo.xla_flags")
