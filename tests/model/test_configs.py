"""Every gin model config parses, and its parameter count matches its name.

Counts come from `jax.eval_shape` (nothing is allocated, so the 34B costs nothing).
"""

from __future__ import annotations

import os
import re

import pytest
from model_testlib import GIN_MODELS, config_from_gin

from cm3leon_jax.model.decoder import count_params

NAMED = {"cm3leon_350m": 350e6, "cm3leon_760m": 760e6, "cm3leon_7b": 7e9,
         "chameleon_7b": 7e9, "chameleon_34b": 34e9}
# The paper's 350M (24 layers, d 1024) with the 65,536-entry vocabulary and the 4*d MLP
# the issue fixes has 373.3M parameters (+6.7%): its tied embedding alone is 67M.
# OPT-350M reaches 331M only through a 50K vocab and 512-d projected embeddings, which
# the paper does not describe. Recorded here instead of bending the architecture.
TOLERANCE = {"cm3leon_350m": 0.07}


def _header_count(name: str) -> int:
    """The parameter count the gin file's header comment states."""
    with open(os.path.join(GIN_MODELS, f"{name}.gin")) as f:
        m = re.search(r"^# Parameters: ([\d,]+)", f.read(), re.M)
    assert m, f"{name}.gin: header lacks a '# Parameters: N' line"
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("name", sorted(NAMED) + ["small", "tiny"])
def test_param_count_matches_name_and_header(name):
    config = config_from_gin(name)
    n = count_params(config)
    print(f"{name}: {n:,} parameters")
    assert n == _header_count(name)
    if name in NAMED:
        rel = n / NAMED[name] - 1
        assert abs(rel) <= TOLERANCE.get(name, 0.05), f"{name}: {n:,} is {rel:+.1%} off"


def test_the_paper_sizes():
    """Shapes the papers state, read back from the gin files."""
    for name, layers, width in (("cm3leon_350m", 24, 1024), ("cm3leon_760m", 24, 1536),
                                ("cm3leon_7b", 32, 4096)):
        c = config_from_gin(name)
        assert (c.num_layers, c.d_model, c.mlp_dim, c.max_length) == (
            layers,
            width,
            4 * width,
            4096,
        )
        assert 64 <= c.dims_per_head <= 128 and c.vocab_size == 65536
        assert (c.norm, c.norm_params, c.position_embedding, c.gated_mlp) == (
            "layernorm", False, "learned", False)
    c = config_from_gin("chameleon_34b")
    assert (c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.mlp_dim, c.block_order) == (
        48, 8192, 64, 8, 22016, "swin")
    c = config_from_gin("chameleon_7b")
    assert (c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.qk_norm) == (
        32,
        4096,
        32,
        11008,
        True,
    )
