"""The build_retrieval mode into a folder that already holds a build: refused unless
`overwrite`, then replaced whole (never mixed with the old build's files); a failed build
leaves the old one as it was."""

import dataclasses
import functools
import os

import numpy as np
import pytest
from retrieval_testlib import SELECTION, documents_with_tokens

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import build, neighbors
from cm3leon_jax.retrieval.memory_bank import MemoryBank
from cm3leon_jax.retrieval.retriever import Retriever


def _build(model_dir, encoder_dir, num, k=SELECTION.k, **kwargs):
    docs = functools.partial(documents_with_tokens, num=num, image_size=32)
    return build.build_retrieval(str(model_dir), encoder_dir, docs, docs_per_shard=20,
                                 selection=dataclasses.replace(SELECTION, k=k), **kwargs)


def _state(out):
    bank_dir = os.path.join(out, "memory_bank")
    rows, _ = neighbors.load_neighbors(bank_dir)
    shards = sorted(d for d in os.listdir(bank_dir) if d.startswith("shard-"))
    return len(MemoryBank(bank_dir)), shards, rows.shape


def test_rebuild_needs_overwrite_and_replaces_the_whole_folder(tmp_path, encoder_dir):
    out = str(tmp_path / "retrieval")
    _build(tmp_path, encoder_dir, num=50)  # 3 shards (20 + 20 + 10), k = 3
    assert _state(out) == (50, ["shard-00000", "shard-00001", "shard-00002"], (50, 3))
    with pytest.raises(UserInputError, match="build_retrieval.overwrite=True"):
        _build(tmp_path, encoder_dir, num=30)
    assert _state(out)[0] == 50

    summary = _build(tmp_path, encoder_dir, num=30, k=2, overwrite=True)  # 2 shards, k = 2
    # Nothing of the first build survives: no third shard, neighbors recomputed with k = 2.
    assert summary["num_docs"] == 30 and summary["shards"] == 2
    assert _state(out) == (30, ["shard-00000", "shard-00001"], (30, 2))
    r = Retriever.open(out, SELECTION, with_encoder=False)
    assert len(r.bank) == r.index.size == 30
    assert sorted(os.listdir(tmp_path)) == ["retrieval"]  # no staging folder left behind


def test_failed_rebuild_leaves_the_old_build_and_no_staging_folder(tmp_path, encoder_dir):
    out = str(tmp_path / "retrieval")
    _build(tmp_path, encoder_dir, num=30)

    def broken(**_):
        yield from documents_with_tokens(num=25, image_size=32)
        raise RuntimeError("the corpus broke")

    with pytest.raises(RuntimeError, match="corpus broke"):
        build.build_retrieval(str(tmp_path), encoder_dir, broken, docs_per_shard=20,
                              selection=SELECTION, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["retrieval"]
    assert _state(out) == (30, ["shard-00000", "shard-00001"], (30, 3))


def test_overwrite_never_replaces_a_folder_that_is_not_a_build(tmp_path, encoder_dir):
    (tmp_path / "retrieval").mkdir()
    (tmp_path / "retrieval" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds no retrieval.json"):
        _build(tmp_path, encoder_dir, num=10, overwrite=True)
    assert os.listdir(tmp_path / "retrieval") == ["notes.txt"]


def test_stale_sharded_index_never_outranks_a_new_single_index(tmp_path):
    """build_index empties the index folder first: a sharded_index.json of an earlier
    build there would otherwise be what load_index opens."""
    from cm3leon_jax.retrieval import index as index_lib
    from cm3leon_jax.retrieval.memory_bank import MemoryBankWriter
    rng = np.random.default_rng(0)
    index_dir = str(tmp_path / "index")
    index_lib.ShardedIndex.build([rng.normal(size=(30, 8)), rng.normal(size=(30, 8))],
                                 index_dir)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    writer = MemoryBankWriter(str(tmp_path / "bank"))
    for i, v in enumerate(vectors):
        writer.add(f"d{i}", v, True, np.array([i]))
    writer.close()
    bank = MemoryBank(str(tmp_path / "bank"))
    assert build.build_index(bank, index_dir, index_lib.IndexConfig())["kind"] == "single"
    index = index_lib.load_index(index_dir)
    assert isinstance(index, index_lib.Index) and index.size == 40


def test_the_encoder_is_found_where_its_run_went_and_refused_when_retrained(tmp_path):
    """retrieval.json records the encoder's path from the folder too, so a run folder moved
    whole still opens with its encoder; an encoder retrained in place (other vectors than
    the bank's) is refused by its fingerprint instead of serving mismatched queries."""
    import json
    import shutil

    from retrieval_testlib import save_random_encoder, small_config

    from cm3leon_jax.errors import MissingInputError
    from cm3leon_jax.retrieval import clip, clip_tokenizer
    from cm3leon_jax.retrieval.encoder import DocumentEncoder, cached_encoder

    run = tmp_path / "run"
    _build(run / "data", save_random_encoder(str(run / "retriever" / "encoder")), num=30)
    with open(run / "data" / "retrieval" / "retrieval.json") as f:
        assert json.load(f)["encoder_from_here"] == os.path.join("..", "..", "retriever",
                                                                 "encoder")
    moved = tmp_path / "moved"
    os.rename(run, moved)
    cached_encoder.cache_clear()  # As a new process would.
    retriever = Retriever.open(str(moved / "data" / "retrieval"), SELECTION)
    assert retriever.encoder is not None
    assert len(retriever.search_texts(["a red circle"], k=2)[0].doc_ids) == 2

    cfg = small_config()
    DocumentEncoder(cfg, clip.init_params(cfg, 1), clip_tokenizer.WordTokenizer(
        cfg.vocab_size)).save(str(moved / "retriever" / "encoder"))
    cached_encoder.cache_clear()
    with pytest.raises(UserInputError, match="is not the one the retrieval folder"):
        Retriever.open(str(moved / "data" / "retrieval"), SELECTION)
    assert Retriever.open(str(moved / "data" / "retrieval"), SELECTION,
                          with_encoder=False).encoder is None
    shutil.rmtree(moved / "retriever")
    with pytest.raises(MissingInputError, match="is at none of"):
        Retriever.open(str(moved / "data" / "retrieval"), SELECTION)


def test_no_documents_and_no_queries_are_named_or_answered_empty(tmp_path, encoder_dir):
    with pytest.raises(UserInputError, match="build_retrieval.documents gave no documents"):
        build.build_retrieval(str(tmp_path / "empty"), encoder_dir, lambda: iter(()))
    assert not os.path.exists(tmp_path / "empty" / "retrieval")  # No staging folder left.
    _build(tmp_path, encoder_dir, num=30)
    retriever = Retriever.open(str(tmp_path / "retrieval"), SELECTION)
    assert retriever.search_texts([]) == [] and retriever.search_images([]) == []
    rows, scores = retriever.search_vectors_raw(np.zeros([0, retriever.dim], np.float32))
    assert rows.shape == scores.shape == (0, SELECTION.k)
