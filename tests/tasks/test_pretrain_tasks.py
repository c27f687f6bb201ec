"""The registered pretraining tasks, end to end on a tiny tokenized corpus."""

import functools

import gin
import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  (registers)
from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.data import shards
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.document import Document, Image, Text
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from tests.tasks.tasks_testlib import batches, cached_and_fresh

CAPTIONS = [f"a {c} {s} next to a {c2} {s2}" for c in ("red", "blue", "green")
            for s in ("circle", "star", "square") for c2 in ("pink", "grey")
            for s2 in ("heart", "moon")]
SEQ_LEN = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 documents per split, each with 3 neighbors, like preprocess writes."""
    root = str(tmp_path_factory.mktemp("tokenized"))
    vocab = MultimodalVocabulary.create(
        f"{root}/vocab", TextTokenizer.train(CAPTIONS, 280), image_codes=32,
        num_sentinels=8, image_length=16)
    rng = np.random.default_rng(0)
    docs = [document_lib.encode(Document([Text(c), Image(rng.integers(0, 32, 16))]), vocab)
            for c in CAPTIONS[:12]]
    for split in tasks.pretrain.SPLITS:
        records = [shards.TokenizedDocument(
            doc_id=f"{split}-{i}", ids=d,
            neighbors=[docs[(i + j) % 12] for j in (1, 2, 3)],
            neighbor_doc_ids=[f"{split}-{(i + j) % 12}" for j in (1, 2, 3)])
            for i, d in enumerate(docs)]
        assert shards.write_split(records, root, split, num_shards=2) == 12
    return root


@pytest.fixture
def bound(data_dir):
    gin.clear_config()
    gin.bind_parameter("data_dirs.synthetic", data_dir)
    yield data_dir
    gin.clear_config()


_batches = functools.partial(batches, seq_len=SEQ_LEN)


def test_tasks_and_mixture_are_registered():
    for name in ("cm3leon_synthetic", "cm3leon_synthetic_no_retrieval",
                 "cm3leon_user", "cm3leon_user_no_retrieval"):
        assert name in seqio.TaskRegistry.names()
    assert "cm3leon_synthetic_mix" in seqio.MixtureRegistry.names()


def test_retrieval_task_yields_valid_packed_examples(bound):
    rows = _batches("cm3leon_synthetic", pack=False)
    assert len(rows) == 12
    vocab = seqio.get_mixture_or_task("cm3leon_synthetic").output_features["targets"].vocabulary
    layout = vocab.layout
    for row in rows:
        targets = row["decoder_target_tokens"]
        n = int((targets != 0).sum())
        ids = cm3_lib.uncm3(targets[:n], layout)
        docs = [document_lib.decode(p, vocab) for p in document_lib.split_documents(ids)]
        assert len(docs) == 3  # k = 2 neighbors by default, then the query
        assert all(d.is_multimodal for d in docs)
        np.testing.assert_array_equal(row["decoder_loss_weights"][:n] == 0,
                                      layout.is_sentinel(targets[:n]))


def test_no_retrieval_task_has_only_the_query(bound):
    vocab = seqio.get_mixture_or_task("cm3leon_synthetic").output_features["targets"].vocabulary
    for row in _batches("cm3leon_synthetic_no_retrieval", pack=False):
        targets = row["decoder_target_tokens"]
        ids = cm3_lib.uncm3(targets[targets != 0], vocab.layout)
        assert len(document_lib.split_documents(ids)) == 1


def test_same_seed_same_batches_and_packing(bound):
    a = _batches("cm3leon_synthetic", seed=5, seq_len=4 * SEQ_LEN)
    b = _batches("cm3leon_synthetic", seed=5, seq_len=4 * SEQ_LEN)
    assert len(a) == len(b) and len(a) < 12  # packed: several examples a row
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _batches("cm3leon_synthetic", seed=6, seq_len=4 * SEQ_LEN)
    assert any(not np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
               for x, y in zip(a, c))


def test_mixture_draws_each_task_at_its_rate(bound):
    """cm3leon_synthetic_mix mixes retrieval-augmented and plain CM3 3:1. Over 300 draws
    the observed share of each (3 documents vs 1 per example) is its rate within 4
    binomial standard deviations (a 1:1 mixture would be 10 away)."""
    mix = seqio.get_mixture_or_task("cm3leon_synthetic_mix")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {"cm3leon_synthetic": 3.0, "cm3leon_synthetic_no_retrieval": 1.0}
    layout = mix.tasks[0].output_features["targets"].vocabulary.layout
    ds = mix.get_dataset({"targets": SEQ_LEN}, split="train", shuffle=False, seed=0,
                         num_epochs=None)
    # No example shuffling (its 1,000-example buffers are slow to fill); the draw of
    # tasks is still seeded.
    n, counts = 300, {1: 0, 3: 0}
    for ex in ds.take(n).as_numpy_iterator():
        counts[len(document_lib.split_documents(cm3_lib.uncm3(ex["targets"], layout)))] += 1
    assert sum(counts.values()) == n
    share = rates["cm3leon_synthetic"] / sum(rates.values())
    assert abs(counts[3] / n - share) <= 4 * np.sqrt(share * (1 - share) / n), counts


def test_user_tasks_read_the_user_folder_both_splits(data_dir):
    """What gin_configs/train/tiny_user.gin trains and evaluates on: `cm3leon_user` reads
    `data_dirs.user`, its train split and the held-out validation split."""
    gin.clear_config()
    try:
        gin.bind_parameter("data_dirs.synthetic", "/nonexistent/synthetic")
        gin.bind_parameter("data_dirs.user", data_dir)
        for split in ("train", "validation"):
            rows = _batches("cm3leon_user", split=split, pack=False)
            assert len(rows) == 12, split
    finally:
        gin.clear_config()


def test_unset_user_corpus_is_a_clear_error():
    gin.clear_config()
    with pytest.raises(ValueError, match="data_dirs.user"):
        _batches("cm3leon_user")


@pytest.mark.slow
def test_seqio_caching(data_dir, tmp_path):
    """cache_tasks_main (Beam) stores the parsed records; reading the cache gives
    the same examples as reading the shards."""
    a, b = cached_and_fresh("cm3leon_synthetic", {"CM3LEON_DATA_DIR": data_dir},
                            ("data_dirs.synthetic", data_dir), tmp_path / "cache", SEQ_LEN)
    assert len(a) == 12 and a == b
