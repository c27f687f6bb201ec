"""A tiny random decoder checkpoint, vocabulary, image tokenizer and CLIP encoder on disk,
shared by the eval-run tests (the decode tests' tiny vocabulary: 16 codes of 64)."""

import pytest

from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from cm3leon_jax.vocab.vqgan import VQGANConfig
from tests.decode.conftest import CAPTIONS
from tests.model.model_testlib import tiny_config, write_train_checkpoints

# 32 px (the corpus' smallest scenes) -> 4x4 = 16 codes of a 64-entry codebook.
VQ = VQGANConfig(image_size=32, base_channels=8, channel_multipliers=(1, 2, 2, 2),
                 num_res_blocks=1, attn_levels=(), latent_channels=8, embed_dim=8,
                 codebook_size=64, num_groups=4)
CONFIG = tiny_config()


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_model")
    words = CAPTIONS + ["Edit first image following the instruction", "Question: how many",
                        "what color is the shape make turn into remove add"]
    MultimodalVocabulary.create(str(root / "vocab"), TextTokenizer.train(words, vocab_size=290),
                                image_codes=64, num_sentinels=8, image_length=16)
    params = write_train_checkpoints(str(root / "train" / "checkpoints"), CONFIG, (1,))[1].params
    cfg = clip.clip_config("tiny")
    DocumentEncoder(cfg, clip.init_params(cfg, 0),
                    clip_tokenizer.WordTokenizer(4096)).save(str(root / "clip"))
    return {"root": root, "vocab": str(root / "vocab"), "checkpoint": str(root / "train"),
            "clip": str(root / "clip"), "params": params}


@pytest.fixture(scope="session")
def image_tokenizer():
    return ImageTokenizer.random_init(VQ, seed=0, batch_size=8)
