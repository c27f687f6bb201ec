"""A tiny random decoder checkpoint, vocabulary, image tokenizer and CLIP encoder on disk,
shared by the eval-run tests (the decode tests' tiny vocabulary: 16 codes of 64)."""

import pytest

from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from tests.conftest import shared_vq_config
from tests.decode.conftest import CAPTIONS
from tests.model.model_testlib import tiny_config, write_run_config, write_train_checkpoints

# 32 px (the corpus' smallest scenes) -> 4x4 = 16 codes of a 64-entry codebook.
VQ = shared_vq_config()
CONFIG = tiny_config()


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory, random_clip_encoder):
    root = tmp_path_factory.mktemp("eval_model")
    words = CAPTIONS + ["Edit first image following the instruction", "Question: how many",
                        "what color is the shape make turn into remove add"]
    MultimodalVocabulary.create(str(root / "vocab"), TextTokenizer.train(words, vocab_size=290),
                                image_codes=64, num_sentinels=8, image_length=16)
    params = write_train_checkpoints(str(root / "train" / "checkpoints"), CONFIG, (1,))[1].params
    write_run_config(str(root / "train"), CONFIG)
    random_clip_encoder.save(str(root / "clip"))
    return {"root": root, "vocab": str(root / "vocab"), "checkpoint": str(root / "train"),
            "clip": str(root / "clip"), "params": params}


@pytest.fixture(scope="session")
def image_tokenizer(random_image_tokenizer):
    return random_image_tokenizer
