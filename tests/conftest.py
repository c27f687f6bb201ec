"""Test-wide setup: eight fake CPU devices, so sharding tests need no hardware.

XLA reads the flag once, when the backend starts, so it is set here before any
test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (used by the data layer) must never take the accelerator from JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests run on CPU devices only, even where libtpu or CUDA is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
