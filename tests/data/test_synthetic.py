"""One source of synthetic scenes: the corpus, the tokenizer's images, the retriever's
pairs and the bank's documents are the same examples for the same seed and split."""

import numpy as np
import pytest

from cm3leon_jax.data import shapes, synthetic_tfds
from cm3leon_jax.data.synthetic import (
    document_caption,
    synthetic_documents,
    synthetic_example,
    synthetic_images,
    synthetic_pairs,
)


@pytest.mark.parametrize("seed,split", [(0, "test"), (3, "train")])
def test_every_consumer_sees_the_corpus_examples(seed, split):
    cfg = synthetic_tfds.make_config(32, {split: 4}, seed=seed)
    corpus = [synthetic_tfds.make_example(cfg, split, i) for i in range(4)]
    images = synthetic_images(32, split, seed)
    pair_images, pair_captions = synthetic_pairs(split, 4, 32, seed)
    docs = list(synthetic_documents(split, 4, 32, seed))
    for i, ex in enumerate(corpus):
        np.testing.assert_array_equal(images(i), ex["image"])
        np.testing.assert_array_equal(pair_images[i], ex["image"])
        assert pair_captions[i] == ex["captions"]
        assert docs[i].doc_id == ex["id"]
        np.testing.assert_array_equal(docs[i].image, ex["image"])
        assert docs[i].text == document_caption(ex["id"], ex["captions"])
        assert shapes.Scene.from_json(ex["scene"]) == synthetic_example(split, i, 32, seed).scene


def test_examples_depend_on_seed_split_and_index_only():
    a = synthetic_example("train", 5, 32, seed=1)
    assert a.doc_id == "train_0000005"
    np.testing.assert_array_equal(a.image, synthetic_example("train", 5, 32, seed=1).image)
    assert not np.array_equal(a.image, synthetic_example("test", 5, 32, seed=1).image)
    assert not np.array_equal(a.image, synthetic_example("train", 5, 32, seed=2).image)
    src = synthetic_images(32, "test")
    np.testing.assert_array_equal(synthetic_images(32, "test", num_examples=5)(6), src(1))


def test_document_caption_skips_blanks_and_is_stable():
    caps = ["", "a red circle", "  ", "two shapes"]
    assert document_caption("x", caps) in ("a red circle", "two shapes")
    assert document_caption("x", caps) == document_caption("x", list(caps))
    assert document_caption("x", ["", " "]) is None
