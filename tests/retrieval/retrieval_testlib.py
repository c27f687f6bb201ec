"""Shared pieces of the retrieval tests (constants and helpers; fixtures are in conftest.py).

A uniquely named module, not `conftest`, so test files can import it by name
without clashing with tests/conftest.py."""

import numpy as np

from cm3leon_jax.data.synthetic import synthetic_documents
from cm3leon_jax.retrieval import clip
from cm3leon_jax.retrieval.select import SelectionConfig

NUM_DOCS = 240
# A random encoder puts most documents above the paper's 0.9 (its vectors are
# crowded), so the shared folder uses looser thresholds; the rules are the same.
SELECTION = SelectionConfig(k=3, max_relevance=0.98, max_redundancy=0.98, overfetch=6)


def small_config() -> clip.ClipConfig:
    return clip.ClipConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                           vision_heads=2, vision_mlp=64, vocab_size=4096, context_length=32,
                           text_width=32, text_layers=1, text_heads=2, text_mlp=64,
                           eos_token_id=4095, projection_dim=16)


def documents_with_tokens(**kwargs):
    """The synthetic corpus with stand-in token ids (the tokenized corpus is another job's)."""
    for d in synthetic_documents(**kwargs):
        d.tokens = np.arange(int(d.doc_id[-3:]) % 7 + 2, dtype=np.int32) + 100
        yield d


