"""Test-wide setup: eight fake CPU devices, so sharding tests need no hardware; LLVM at
-O0; one persistent compilation cache per session.

XLA reads the flag once, when the backend starts, so it is set here before any
test imports jax.

Tests build many identical programs (a tiny model's init, train step and sampler in
several tests, and in the subprocesses the CLI tests start); JAX's persistent
compilation cache compiles each once per session. It lives in a temporary folder
removed at exit, so every session starts cold and measures the same.

Property tests (hypothesis) run derandomized (the same examples every run: a failure
reproduces) and without a wall-clock deadline (a loaded 2-core machine is slow, not
wrong). `HYPOTHESIS_PROFILE=explore` searches with fresh random examples instead.
"""

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# Eight fake devices; LLVM at -O0: the suite's tiny programs spend far more time compiling
# than running, and -O0 cut the CPU time of compile-bound and training test files alike by a
# third (tests/model/test_custom_grads.py 81 -> 53 s, test_vqgan_train + test_step 412 ->
# 263 s, one process each). XLA's graph-level passes (fusion, layout) still run.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (used by the data layer) must never take the accelerator from JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests run on CPU devices only, even where libtpu or CUDA is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cm3leon_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # Subprocesses inherit it.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
