"""Parity with reference implementations no one here wrote (`transformers`, torch, f32).

Our random weights go through `hf_weights.to_hf` into the reference model (strict
load: every reference weight must be produced), logits must agree within 1e-4
relative, and `from_hf` of the reference's own state dict must give our weights back.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from model_testlib import forward, random_params, tiny_chameleon, tiny_config

from cm3leon_jax.model import hf_weights

RTOL = 1e-4


def _tokens(config, batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def _compare(config, family, hf_model):
    params = random_params(config, seed=11)
    sd = {
        k: torch.from_numpy(np.array(v))
        for k, v in hf_weights.to_hf(params, config, family).items()
    }
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    ignored = hf_weights._IGNORED_PREFIXES[family]
    assert all(k.startswith(ignored) for k in missing) if ignored else not missing, missing

    tokens = _tokens(config)
    ours = np.asarray(forward(config)(params, tokens))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{family} parity: max |ours - hf| / max |hf| = {rel:.2e}")
    assert rel <= RTOL, rel

    back = hf_weights.from_hf(hf_model.state_dict(), config, family)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), back, params)
    return rel


@pytest.mark.parametrize("tie", [True, False])
def test_cm3leon_matches_opt(tie):
    config = tiny_config(tie_embeddings=tie)
    kwargs = hf_weights.hf_config_kwargs(config, "opt")
    hf_model = transformers.OPTForCausalLM(transformers.OPTConfig(**kwargs)).eval()
    _compare(config, "opt", hf_model)


@pytest.mark.parametrize("order", ["pre", "swin"])
def test_successor_matches_chameleon(order):
    config = tiny_chameleon(block_order=order)  # GQA: 4 query heads, 2 kv heads.
    kwargs = hf_weights.hf_config_kwargs(config, "chameleon")
    # The image tokenizer is not part of the text path; keep it small (GroupNorm needs 32).
    tiny_vq = dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=8,
                   base_channels=32, channel_multiplier=[1], num_res_blocks=1)
    hf_config = transformers.ChameleonConfig(**kwargs, vq_config=tiny_vq)
    hf_config._attn_implementation = "eager"
    hf_model = transformers.ChameleonForConditionalGeneration(hf_config).eval()
    _compare(config, "chameleon", hf_model)


def test_mapping_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="cannot be expressed as a transformers 'opt' model"):
        hf_weights.to_hf({}, tiny_chameleon(), "opt")
    sd = hf_weights.to_hf(random_params(tiny_config()), tiny_config(), "opt")
    bad = dict(sd, **{"model.decoder.layers.0.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="layers.0.fc1.weight"):
        hf_weights.from_hf(bad, tiny_config(), "opt")
    with pytest.raises(KeyError, match="embed_tokens"):
        hf_weights.from_hf({}, tiny_config(), "opt")
    with pytest.raises(ValueError, match="no place"):
        hf_weights.from_hf(dict(sd, extra=np.zeros(1)), tiny_config(), "opt")
