"""Retrieval-augmented example assembly and the packed feature converter."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.data import augment
from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.train.feature_converter import CM3FeatureConverter
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, IdLayout

LAYOUT = IdLayout(text_size=100, image_codes=50, num_sentinels=16, image_length=8)


def _doc(rng, n_text):
    """caption <break> image: n_text text ids, then one 8-code image."""
    text = LAYOUT.text_to_ids(rng.integers(0, 100, n_text))
    image = LAYOUT.codes_to_ids(rng.integers(0, 50, 8))
    return np.concatenate([text, [BREAK_ID], image]).astype(np.int32)


def test_k_distribution_is_respected():
    config = augment.AugmentConfig(k_probs=(0.25, 0.25, 0.5))
    rng = np.random.default_rng(0)
    ks = [len(augment.choose_neighbors(3, rng, config)) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(ks, minlength=3) / 4000,
                               [0.25, 0.25, 0.5], atol=0.03)
    # Fewer candidates than k: use all of them.
    assert augment.choose_neighbors(1, rng, augment.AugmentConfig()) == [0]


def test_assemble_drops_least_relevant_whole_documents():
    rng = np.random.default_rng(0)
    query, n1, n2 = _doc(rng, 5), _doc(rng, 3), _doc(rng, 4)
    full = augment.assemble(query, [n1, n2], budget=100)
    np.testing.assert_array_equal(full, np.concatenate([n1, [EOS_ID], n2, [EOS_ID], query]))
    # One token short of fitting both: the second (less relevant) neighbor goes.
    short = augment.assemble(query, [n1, n2], budget=full.size - 1)
    np.testing.assert_array_equal(short, np.concatenate([n1, [EOS_ID], query]))
    np.testing.assert_array_equal(augment.assemble(query, [n1], budget=query.size), query)
    assert augment.assemble(query, [], budget=query.size - 1) is None


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(40, 120),
       n_text=st.lists(st.integers(1, 20), min_size=1, max_size=4))
def test_examples_fit_and_never_cut_an_image(seed, seq_len, n_text):
    rng = np.random.default_rng(seed)
    docs = [_doc(rng, n) for n in n_text]
    config = augment.AugmentConfig(seq_len=seq_len, k_probs=(0.2, 0.3, 0.5), max_spans=4)
    out = augment.make_example(docs[0], docs[1:], rng, LAYOUT, config)
    if docs[0].size > config.budget:
        assert out is None
        return
    tokens, weights = out
    assert tokens.size <= seq_len and weights.shape == tokens.shape
    restored = cm3_lib.uncm3(tokens, LAYOUT)
    pieces = document_lib.split_documents(restored)
    # The query is last and intact; every retrieved document is one of the
    # candidates, whole (so every image has all 8 codes).
    np.testing.assert_array_equal(pieces[-1], docs[0])
    for p in pieces[:-1]:
        assert any(np.array_equal(p, d) for d in docs[1:])


def test_same_seed_same_example():
    docs = [_doc(np.random.default_rng(i), 6) for i in range(4)]
    config = augment.AugmentConfig(seq_len=64, k_probs=(0.3, 0.3, 0.4))
    a = augment.make_example(docs[0], docs[1:], np.random.default_rng(7), LAYOUT, config)
    b = augment.make_example(docs[0], docs[1:], np.random.default_rng(7), LAYOUT, config)
    np.testing.assert_array_equal(a[0], b[0])


def _image_first(doc):
    cut = int(np.flatnonzero(doc == BREAK_ID)[0])
    return np.concatenate([doc[cut + 1:], [BREAK_ID], doc[:cut]]).astype(np.int32)


def test_in_order_of_lays_a_caption_and_image_document_out_as_the_query_opens():
    rng = np.random.default_rng(0)
    doc, query = _doc(rng, 4), _doc(rng, 3)
    flipped = _image_first(doc)
    # Before an image-first query the caption-first document turns image first, and back.
    np.testing.assert_array_equal(document_lib.in_order_of(doc, _image_first(query), LAYOUT),
                                  flipped)
    np.testing.assert_array_equal(document_lib.in_order_of(flipped, query, LAYOUT), doc)
    np.testing.assert_array_equal(document_lib.in_order_of(doc, query, LAYOUT), doc)
    # A prompt that opens with a sentinel (a masked caption) reads caption first.
    sentinel_query = np.array([LAYOUT.sentinel_id(0), BREAK_ID], np.int32)
    np.testing.assert_array_equal(document_lib.in_order_of(flipped, sentinel_query, LAYOUT),
                                  doc)
    # Anything but one text and one image segment is left as it is.
    two_images = np.concatenate([doc[-8:], [BREAK_ID], doc[-8:]]).astype(np.int32)
    three = np.concatenate([doc, [BREAK_ID], doc[:4]]).astype(np.int32)
    for other in (two_images, three, doc[:4]):
        np.testing.assert_array_equal(
            document_lib.in_order_of(other, _image_first(query), LAYOUT), other)


def test_neighbors_in_query_order_reorders_only_the_neighbors():
    rng = np.random.default_rng(1)
    query, neighbors = _image_first(_doc(rng, 5)), [_doc(rng, 3), _doc(rng, 4)]
    for in_order in (False, True):
        config = augment.AugmentConfig(seq_len=96, mean_spans=0.0,
                                       neighbors_in_query_order=in_order)
        tokens, _ = augment.make_example(query, neighbors, np.random.default_rng(2), LAYOUT,
                                         config)
        pieces = document_lib.split_documents(tokens)
        np.testing.assert_array_equal(pieces[-1], query)
        want = [_image_first(n) if in_order else n for n in neighbors]
        assert len(pieces) == 3
        for got, expected in zip(pieces[:-1], want):
            np.testing.assert_array_equal(got, expected)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="summing to 1"):
        augment.AugmentConfig(k_probs=(0.5, 0.4))
    with pytest.raises(ValueError, match="leaves no room"):
        augment.AugmentConfig(seq_len=20, max_spans=8)


def _dataset(examples):
    return tf.data.Dataset.from_generator(
        lambda: iter([{"targets": t, "loss_weights": w} for t, w in examples]),
        output_signature={"targets": tf.TensorSpec([None], tf.int32),
                          "loss_weights": tf.TensorSpec([None], tf.int32)})


def test_feature_converter_packs_tokens_and_weights_together():
    s0 = LAYOUT.sentinel_id(0)
    ex1 = (np.array([10, s0, 12, s0, 11, EOSS_ID], np.int32),
           np.array([1, 0, 1, 0, 1, 1], np.int32))
    ex2 = (np.array([20, 21, 22], np.int32), np.ones(3, np.int32))
    out = list(CM3FeatureConverter(bos_id=EOS_ID, pack=True)(_dataset([ex1, ex2]), {"targets": 10})
               .as_numpy_iterator())
    assert len(out) == 1
    row = out[0]
    np.testing.assert_array_equal(
        row["decoder_target_tokens"], [10, s0, 12, s0, 11, EOSS_ID, 20, 21, 22, 0]
    )
    np.testing.assert_array_equal(
        row["decoder_input_tokens"], [EOS_ID, 10, s0, 12, s0, 11, EOS_ID, 20, 21, 0]
    )
    np.testing.assert_array_equal(row["decoder_loss_weights"], [1, 0, 1, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0])
    assert row["decoder_loss_weights"].dtype == np.float32


def test_feature_converter_unpacked_pads_each_example():
    ex = (np.array([20, 21, 22], np.int32), np.array([1, 0, 1], np.int32))
    (row,) = CM3FeatureConverter(bos_id=EOS_ID, pack=False)(
        _dataset([ex]), {"targets": 5}
    ).as_numpy_iterator()
    np.testing.assert_array_equal(row["decoder_input_tokens"], [EOS_ID, 20, 21, 0, 0])
    np.testing.assert_array_equal(row["decoder_loss_weights"], [1, 0, 1, 0, 0])


def test_spans_beyond_the_vocabulary_s_sentinels_are_refused_before_training():
    """No sentinel at all (preprocess.num_sentinels=0) or fewer than max_spans: the count
    named; an imported Chameleon's one sentinel, its <s>: left to right named instead."""
    import types

    from cm3leon_jax.data.augment import AugmentConfig, check_sentinels
    from cm3leon_jax.errors import UserInputError
    from cm3leon_jax.vocab.layout import IdLayout
    config = AugmentConfig(seq_len=64, max_spans=8)
    for n in (0, 4):
        vocab = types.SimpleNamespace(layout=IdLayout(num_sentinels=n), directory="v",
                                      cm3_sentinels=n)
        with pytest.raises(UserInputError, match=f"max_spans=8 is more than the vocabulary's "
                                                 f"{n} sentinels"):
            check_sentinels(config, vocab)
    chameleon = types.SimpleNamespace(layout=IdLayout(num_sentinels=1), directory="v",
                                      cm3_sentinels=0)
    with pytest.raises(UserInputError, match="no CM3 sentinels.*mean_spans=0.0"):
        check_sentinels(config, chameleon)
    check_sentinels(AugmentConfig(seq_len=64, max_spans=8, mean_spans=0.0), chameleon)
