"""Shared fixtures of the export tests: a training run's checkpoints, a vocabulary and an
image tokenizer, all tiny (written once per session)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cm3leon_jax.vocab import vqgan_checkpoint
from cm3leon_jax.vocab.chameleon_vqgan_weights import abstract_params
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from cm3leon_jax.vocab.vqgan import VQGANConfig
from tests.model.model_testlib import tiny_config, write_run_config, write_train_checkpoints

CONFIG = tiny_config()
# 4 x 4 codes of 32: what the `vocab_dir` fixture's layout holds (export checks it fits).
TINY_VQ = VQGANConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2, 2),
                      num_res_blocks=1, attn_levels=(), mid_attention=True, latent_channels=8,
                      embed_dim=4, codebook_size=32, num_groups=4)
TEXTS = [f"a {c} {s} {r} a {c2} {s2}" for c in ("red", "blue", "green")
         for s in ("circle", "star") for r in ("above", "left of")
         for c2 in ("yellow", "purple") for s2 in ("square", "triangle")]


@pytest.fixture(scope="session")
def train_run(tmp_path_factory):
    """(MODEL_DIR, params) of a train run with a checkpoint at step 3 (params + Adam)."""
    model_dir = tmp_path_factory.mktemp("train_run")
    states = write_train_checkpoints(str(model_dir / "checkpoints"), CONFIG, (3,))
    write_run_config(str(model_dir), CONFIG)
    return str(model_dir), states[3].params


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vocab"))
    MultimodalVocabulary.create(directory, TextTokenizer.train(TEXTS, vocab_size=280),
                                image_codes=32, num_sentinels=4, image_length=16)
    return directory


@pytest.fixture(scope="session")
def image_tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("image_tokenizer"))
    vqgan_checkpoint.save_params(directory, 5, TINY_VQ, random_vq_params(TINY_VQ, seed=1))
    return directory


# The HF Chameleon VQ encoder has 32 GroupNorm groups and middle attention, always.
HF_VQ = VQGANConfig(image_size=8, base_channels=32, channel_multipliers=(1, 1),
                    num_res_blocks=1, attn_levels=(), mid_attention=True, latent_channels=32,
                    embed_dim=4, codebook_size=32, num_groups=32)


@pytest.fixture(scope="session")
def hf_image_tokenizer():
    """(config, params) of a random VQGAN that transformers' Chameleon can hold."""
    return HF_VQ, random_vq_params(HF_VQ, seed=2)


def random_vq_params(config: VQGANConfig, seed: int) -> dict:
    """Random VQGAN weights of a plausible scale, without compiling the network's init."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape)
        if name.endswith("['scale']"):
            noise = 1.0 + 0.1 * noise
        elif name.endswith("['bias']"):
            noise = 0.1 * noise
        elif not name.endswith("['embedding']"):
            noise = noise / np.sqrt(np.prod(x.shape[:-1]))  # Kernels: 1 / sqrt(fan_in).
        return noise.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))
