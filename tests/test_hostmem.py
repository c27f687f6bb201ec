"""`hostmem.retain_freed_memory`: with it, XLA:CPU's per-call temporaries stop faulting in
fresh pages on every call; the switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cm3leon_jax import hostmem

# Minor page faults of a jitted call with large temporaries, after two warm-up calls.
_PROBE = """
import resource
from cm3leon_jax import hostmem
retained = hostmem.retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x) + jnp.sum(jnp.sort(x * 3.0, axis=0)))
for _ in range(2):
    jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(f(x))
print(retained, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_call(setting: str) -> tuple[bool, float]:
    env = dict(os.environ, **{hostmem.ENV: setting}, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.slow  # Run by `make test-slow` (kept out of the default run's time, 6 Dec)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retained_memory_stops_the_page_faults_of_every_call():
    retained, kept = _faults_per_call("retain")
    plain, default = _faults_per_call("default")
    assert retained and not plain
    if default < 50_000:  # e.g. transparent huge pages "always": 2 MiB a fault
        pytest.skip(f"{default:.0f} page faults a call without it: this host faults in "
                    "large pages, there is little to save")
    # 280,000 faults a call (1.1 GB of fresh pages) against about 5,000 where measured.
    assert kept < default / 10, (kept, default)


def test_it_is_off_unless_asked_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(hostmem.ENV, raising=False)
    assert not hostmem.retain_freed_memory()
    monkeypatch.setenv(hostmem.ENV, "default")
    assert not hostmem.retain_freed_memory()
    monkeypatch.setenv(hostmem.ENV, "always")
    with pytest.raises(ValueError, match=r"CM3LEON_JAX_HOST_MEMORY='always'.*\"retain\""):
        hostmem.retain_freed_memory()
