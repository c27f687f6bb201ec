"""A tiny vocabulary whose id space fits the tiny test decoder (384 ids <= 512)."""

import pytest

from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

CAPTIONS = [f"a {size} {color} {shape} {rel} a {color2} {shape2}"
            for size in ("small", "large") for color in ("red", "blue", "green")
            for shape in ("circle", "star") for rel in ("above", "left of")
            for color2 in ("yellow", "purple") for shape2 in ("square", "triangle")]


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("decode_vocab"))
    return MultimodalVocabulary.create(directory, TextTokenizer.train(CAPTIONS, vocab_size=290),
                                       image_codes=64, num_sentinels=8, image_length=16)
