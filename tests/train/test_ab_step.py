"""`benchmarks/ab_step.py` reads its variants: gin bindings and environment settings."""

import pytest

from benchmarks import ab_step


def test_a_variant_splits_into_bindings_and_environment():
    assert ab_step.parse_variant("base:") == ("base", [], {})
    assert ab_step.parse_variant(
        "v:DecoderConfig.loss_chunk=128;ENV:XLA_FLAGS=--a=b;ENV:CM3LEON_JAX_HOST_MEMORY=retain"
    ) == ("v", ["DecoderConfig.loss_chunk=128"],
          {"XLA_FLAGS": "--a=b", "CM3LEON_JAX_HOST_MEMORY": "retain"})
    for bad in ("no_colon", ":x", "v:ENV:NOVALUE"):
        with pytest.raises(SystemExit, match="ab_step.py"):
            ab_step.parse_variant(bad)
