"""Fixtures of the trainer tests: one tiny tokenized corpus per session."""

import pytest
import train_testlib


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(path, vocab_size) of a tiny tokenized corpus (train/validation/test)."""
    root = str(tmp_path_factory.mktemp("train_corpus"))
    return root, train_testlib.build_corpus(root)
