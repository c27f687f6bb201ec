"""A small random encoder and a built retrieval folder, shared by the retrieval tests."""

import functools

import pytest
from retrieval_testlib import NUM_DOCS, SELECTION, documents_with_tokens, save_random_encoder

from cm3leon_jax.retrieval import build


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    return save_random_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory, encoder_dir):
    model_dir = tmp_path_factory.mktemp("built")
    docs = functools.partial(documents_with_tokens, num=NUM_DOCS, text_only_fraction=0.1,
                             image_only_fraction=0.1)
    build.build_retrieval(str(model_dir), encoder_dir, docs, docs_per_shard=100,
                          selection=SELECTION, seed=0)
    return str(model_dir / "retrieval")
