"""A small random encoder and a built retrieval folder, shared by the retrieval tests."""

import functools

import pytest
from retrieval_testlib import NUM_DOCS, SELECTION, documents_with_tokens, small_config

from cm3leon_jax.retrieval import build, clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder")
    cfg = small_config()
    DocumentEncoder(cfg, clip.init_params(cfg, 0), clip_tokenizer.WordTokenizer(4096)).save(str(d))
    return str(d)


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory, encoder_dir):
    model_dir = tmp_path_factory.mktemp("built")
    docs = functools.partial(documents_with_tokens, num=NUM_DOCS, text_only_fraction=0.1,
                             image_only_fraction=0.1)
    build.build_retrieval(str(model_dir), encoder_dir, docs, docs_per_shard=100,
                          selection=SELECTION, seed=0)
    return str(model_dir / "retrieval")
