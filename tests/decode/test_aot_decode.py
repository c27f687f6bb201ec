"""`benchmarks/aot_decode.py`: the decode step compiles sharded, with its cache donated.

On the 8 fake CPU devices (every run) and, where libtpu is installed (the `tpu` extra),
for a TPU topology: a tiny config, so each takes seconds. The 7B figures it records are
in benchmarks/RESULTS_pod_configs.md.
"""

import importlib.util
import os
import sys

import gin
import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import aot_decode  # noqa: E402

from cm3leon_jax.model import partitioning  # noqa: E402
from cm3leon_jax.model.decode_step import DecoderStep  # noqa: E402
from tests.model.model_testlib import tiny_config  # noqa: E402


def test_decode_step_compiles_sharded_with_the_cache_updated_in_place():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    config = tiny_config()
    mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4, devices=jax.devices()[:8])
    model = DecoderStep(config)
    weights, cache = aot_decode.decode_inputs(model, mesh, rows=4, length=48)
    # Weights split by the training rules (heads over tensor), the cache's batch over data.
    assert "tensor" in weights["layers"][0]["query"].sharding.spec
    assert cache["keys"][0].sharding.spec[:2] == ("data", "tensor")
    step = aot_decode.compile_call(model, mesh, weights, cache, tokens=1)
    # Donated: the updated cache is written over the old one, not beside it.
    assert step["memory"]["alias_size_in_bytes"] >= aot_decode.per_chip_bytes(cache)
    # XLA counts every layer (no scan): its FLOPs match the model's own count.
    want = aot_decode.model_step_flops(config, rows=4, length=48) / 8
    assert 0.8 * want <= step["flops"] <= 1.6 * want


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tiny_decode_compiles_for_a_tpu_topology():
    try:
        result = aot_decode.main(["--model=tiny", "--topology=v5p:2x2x1", "--prompt=16",
                                  "--codes=32"])
    finally:
        gin.clear_config()  # main() parses a model file; leave gin as the next test expects.
    assert result["fits"] and result["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    assert result["step"]["memory"]["alias_size_in_bytes"] > 0
    assert 0 < result["implied"]["step_ms"] < 1
