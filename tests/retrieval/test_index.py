"""Memory bank on disk and the ScaNN index: exactness, recall, round trips, shards."""

import json

import numpy as np
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import index as index_lib
from cm3leon_jax.retrieval import memory_bank
from cm3leon_jax.retrieval.synthetic_vectors import clustered_vectors, recall_at_k

DIM = 32


@pytest.fixture(scope="module")
def data():
    vectors = clustered_vectors(24_000, DIM, seed=1)
    queries = clustered_vectors(200, DIM, seed=2, num_topics=int(np.sqrt(24_000)))
    truth, _ = index_lib.exact_search(vectors, queries, 10)
    return vectors, queries, truth


def _bank(tmp_path, vectors, shards=4):
    writer = memory_bank.MemoryBankWriter(str(tmp_path / "bank"),
                                          docs_per_shard=-(-len(vectors) // shards))
    for i, v in enumerate(vectors):
        writer.add(f"doc{i}", v, multimodal=i % 3 != 0, tokens=np.arange(i % 5 + 1) + i)
    writer.close()
    return memory_bank.MemoryBank(str(tmp_path / "bank"))


def test_memory_bank_round_trip(tmp_path, data):
    vectors = data[0][:1000]
    bank = _bank(tmp_path, vectors)
    assert len(bank) == 1000 and bank.num_shards == 4 and bank.dim == DIM
    ids = np.array([[0, 999], [251, -1]])
    np.testing.assert_array_equal(bank.vectors(ids)[0], vectors[[0, 999]])
    assert not bank.vectors(ids)[1, 1].any()
    assert bank.doc_ids(ids).tolist() == [["doc0", "doc999"], ["doc251", ""]]
    assert bank.multimodal(np.array([0, 1, 3])).tolist() == [False, True, False]
    np.testing.assert_array_equal(bank.tokens(502), np.arange(3) + 502)
    assert bank.row_of("doc777") == 777 and bank.row_of("nope") == -1
    with pytest.raises(IndexError, match="past the bank"):
        bank.vectors(np.array([1000]))


def test_bank_writer_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="vectors have shape"):
        memory_bank.write_shard(str(tmp_path), "s", ["a", "b"], np.zeros((3, 4)),
                                np.zeros(2, bool), [np.zeros(1)] * 2)
    with pytest.raises(ValueError, match="NaN"):
        memory_bank.write_shard(str(tmp_path), "s", ["a"], np.full((1, 4), np.nan),
                                np.zeros(1, bool), [np.zeros(1)])
    with pytest.raises(FileNotFoundError, match="not a memory bank"):
        memory_bank.MemoryBank(str(tmp_path))


def test_brute_force_is_exact_and_auto_picks_it(data):
    vectors, queries, truth = data
    index = index_lib.Index.build(vectors[:5000], index_lib.IndexConfig())
    assert index.settings["algorithm"] == "brute_force"
    ids, scores = index.search(queries, 10)
    exact, exact_scores = index_lib.exact_search(vectors[:5000], queries, 10)
    assert recall_at_k(ids, exact) == 1.0
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    # a single query, and k larger than the bank
    one, _ = index.search(queries[0], 10)
    np.testing.assert_array_equal(one[0], ids[0])
    small = index_lib.Index.build(vectors[:3])
    got, got_scores = small.search(queries[:2], 5)
    assert (got[:, 3:] == -1).all() and np.isneginf(got_scores[:, 3:]).all()


def test_tree_ah_recall_and_serialization(tmp_path, data):
    vectors, queries, truth = data
    cfg = index_lib.IndexConfig(algorithm="tree_ah", leaves_to_search=120, reorder=300)
    index = index_lib.Index.build(vectors, cfg)
    assert index.settings["algorithm"] == "tree_ah"
    ids, scores = index.search(queries, 10)
    assert recall_at_k(ids, truth) >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    loaded = index_lib.load_index(index.save(str(tmp_path / "idx")))
    ids2, _ = loaded.search(queries, 10)
    np.testing.assert_array_equal(ids, ids2)
    with pytest.raises(ValueError, match="32-d vectors"):
        loaded.search(np.zeros((2, 7)), 10)


def test_sharded_index_matches_one_index(tmp_path, data):
    vectors, queries, truth = data
    bank = _bank(tmp_path, vectors, shards=4)
    cfg = index_lib.IndexConfig(algorithm="tree_ah", leaves_to_search=120, reorder=300)
    index_lib.ShardedIndex.build(
        (v for _, v in bank.iter_shards()), str(tmp_path / "sharded"), cfg)
    single = index_lib.Index.build(vectors, cfg)
    r_single = recall_at_k(single.search(queries, 10)[0], truth)
    bounded = index_lib.load_index(str(tmp_path / "sharded"), max_loaded=1)
    ids, scores = bounded.search(queries, 10)
    assert len(bounded._loaded) == 1
    assert recall_at_k(ids, truth) >= r_single - 0.01
    # merged scores are the true inner products of the merged ids
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", vectors[ids], queries), atol=2e-3)


def test_merge_top_k_orders_by_score_then_id():
    ids = np.array([[5, 3, 9, 1]])
    scores = np.array([[0.5, 0.9, 0.9, 0.1]], np.float32)
    got, s = index_lib.merge_top_k(ids, scores, 3)
    assert got.tolist() == [[3, 9, 5]]


def test_tree_ah_shards_smaller_than_the_leaves_are_brute_force(tmp_path, data):
    """A sharded tree_ah build gives every shard the bank's num_leaves; a last shard with
    fewer vectors than that (10 < 20 here) cannot train a tree and is searched exactly."""
    from cm3leon_jax.retrieval import build
    vectors = data[0][:210]
    writer = memory_bank.MemoryBankWriter(str(tmp_path / "bank"), docs_per_shard=100)
    for i, v in enumerate(vectors):
        writer.add(f"doc{i}", v, multimodal=True, tokens=np.arange(2))
    writer.close()
    bank = memory_bank.MemoryBank(str(tmp_path / "bank"))
    cfg = index_lib.IndexConfig(algorithm="tree_ah", num_leaves=20)
    info = build.build_index(bank, str(tmp_path / "index"), cfg)
    assert info["kind"] == "sharded" and info["num_leaves"] == 20
    index = index_lib.load_index(str(tmp_path / "index"))
    kinds = [index._index(s).settings["algorithm"] for s in range(3)]
    assert kinds == ["tree_ah", "tree_ah", "brute_force"]
    ids, _ = index.search(vectors[200:], 1)
    assert ids[:, 0].tolist() == list(range(200, 210))
    assert index_lib.IndexConfig(algorithm="tree_ah").resolve(10) == {"algorithm": "brute_force"}


def test_an_index_opens_only_over_the_bank_it_was_built_over(tmp_path, data):
    """The index records its bank's fingerprint (and a sharded one its shard sizes): another
    bank of the same size and dim is refused; an index without a fingerprint still opens."""
    from cm3leon_jax.retrieval import build
    from cm3leon_jax.retrieval.retriever import Retriever
    vectors = data[0]
    bank_a = _bank(tmp_path / "a", vectors[:200], shards=1)
    bank_b = _bank(tmp_path / "b", vectors[200:400], shards=1)
    assert bank_a.fingerprint != bank_b.fingerprint
    build.build_index(bank_a, str(tmp_path / "index_a"), index_lib.IndexConfig())
    index_a = index_lib.load_index(str(tmp_path / "index_a"))
    Retriever(index_a, bank_a)
    with pytest.raises(UserInputError, match="another memory bank.*rebuild the index"):
        Retriever(index_a, bank_b)
    Retriever(index_lib.Index.build(vectors[:200]), bank_b)  # no fingerprint: an older build

    sharded_a = _bank(tmp_path / "sa", vectors[:200], shards=2)
    sharded_b = _bank(tmp_path / "sb", vectors[200:400], shards=2)
    build.build_index(sharded_a, str(tmp_path / "sharded_a"), index_lib.IndexConfig())
    sharded_index = index_lib.load_index(str(tmp_path / "sharded_a"))
    Retriever(sharded_index, sharded_a)
    with pytest.raises(UserInputError, match="another memory bank"):
        Retriever(sharded_index, sharded_b)
    # Without a fingerprint, shards of other sizes (150 + 50 against 100 + 100) are refused.
    index_lib.ShardedIndex.build([vectors[:150], vectors[150:200]], str(tmp_path / "old"))
    with pytest.raises(UserInputError, match=r"shards hold \[150, 50\].*\[100, 100\]"):
        Retriever(index_lib.load_index(str(tmp_path / "old")), sharded_a)


def test_bank_fingerprint_is_stored_and_recomputed_alike(tmp_path, data):
    """bank.json stores the fingerprint; a bank finalized before fingerprints computes the
    same one from its shards."""
    bank = _bank(tmp_path, data[0][:100], shards=3)
    stored = bank.fingerprint
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert manifest["fingerprint"] == stored
    del manifest["fingerprint"]
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(manifest))
    assert memory_bank.MemoryBank(str(tmp_path / "bank")).fingerprint == stored
