"""The preprocess mode with retrieval: vectors, bank and index, neighbors in the shards."""

import dataclasses
import functools
import json
import os
import shutil

import numpy as np
import pytest

from cm3leon_jax.data import preprocess as pp
from cm3leon_jax.data import retrieval_pass, shards
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval.retriever import Retriever
from tests.data.test_preprocess import tiny_image_tokenizer
from tests.retrieval.retrieval_testlib import SELECTION, save_random_encoder

SIZES = {"train": 40, "validation": 10, "test": 10}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return pp.TfdsSource(functools.partial(pp.synthetic_builder, image_size=32,
                                           data_dir=data_dir, split_sizes=SIZES))


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    directory = save_random_encoder(str(tmp_path_factory.mktemp("encoder")))
    return retrieval_pass.RetrievalConfig(encoder_dir=directory, selection=SELECTION)


def _run(source, out, retrieval):
    return pp.preprocess(str(out), source=source, image_tokenizer_fn=tiny_image_tokenizer,
                         docs_per_shard=15, batch_size=8, text_vocab_size=300,
                         num_sentinels=8, seq_len=512, retrieval=retrieval)


def _records(out, split):
    return {r["doc_id"].decode(): r
            for r in shards.read_split(str(out), split).as_numpy_iterator()}


@pytest.fixture(scope="module")
def built(source, retrieval, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return out, _run(source, out, retrieval)


def test_every_document_gets_neighbors_from_the_train_bank(built):
    out, result = built
    summary = result["retrieval"]
    assert summary["bank_documents"] == SIZES["train"]
    train = _records(out, "train")
    for split, n in SIZES.items():
        assert summary["splits"][split]["documents"] == n
        assert summary["splits"][split]["neighbors_per_document"][-1] == n  # all get k = 3
        for doc_id, r in _records(out, split).items():
            ids = [d.decode() for d in r["neighbor_doc_ids"]]
            assert len(ids) == SELECTION.k and doc_id not in ids
            assert all(d in train for d in ids)  # only the train bank is searched
            # The materialized tokens are exactly the neighbors' own documents.
            parts = np.split(r["neighbor_ids"], np.cumsum(r["neighbor_lengths"])[:-1])
            for d, part in zip(ids, parts):
                np.testing.assert_array_equal(part, train[d]["ids"])


def test_data_folder_is_a_retriever(built):
    out, _ = built
    retriever = Retriever.open(retrieval_pass.retrieval_dir(str(out)), SELECTION,
                               with_encoder=False)
    assert len(retriever.bank) == SIZES["train"]
    doc_id = next(iter(_records(out, "train")))
    row = retriever.bank.row_of(doc_id)
    np.testing.assert_array_equal(retriever.bank.tokens(row), _records(out, "train")[doc_id]["ids"])
    # The vocabulary its documents' tokens were made with, which readers check theirs against.
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    with open(os.path.join(retrieval_pass.retrieval_dir(str(out)), "retrieval.json")) as f:
        recorded = json.load(f)["vocabulary"]
    assert recorded["fingerprint"] == MultimodalVocabulary(os.path.join(out, "vocab")).fingerprint


def test_rerun_skips_and_a_retokenized_shard_gives_the_same_shards(built, source, retrieval):
    out, first = built
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".tfrecord")}
    assert _run(source, out, retrieval) == first
    assert before == {f: os.path.getmtime(out / f) for f in before}  # nothing rewritten

    victim = shards.shard_path(str(out), "train", 1, 3)
    os.remove(victim + ".stats.json")  # as if the run had died in this shard
    expected = {split: _records(out, split) for split in SIZES}
    assert _run(source, out, retrieval) == first
    for split in SIZES:  # bank rebuilt, neighbors redone: the same bytes, seeded
        got = _records(out, split)
        for doc_id, r in expected[split].items():
            for key in ("ids", "neighbor_ids", "neighbor_lengths", "neighbor_doc_ids"):
                np.testing.assert_array_equal(got[doc_id][key], r[key])


def test_a_rerun_with_other_retrieval_settings_is_refused(built, source, retrieval, tmp_path):
    """Finished shards would keep neighbors found with the earlier settings: refused, with
    the setting named; a folder whose plan.json predates the settings is checked against
    its retrieval.json instead."""
    out = shutil.copytree(built[0], tmp_path / "data")
    fewer = dataclasses.replace(retrieval, selection=dataclasses.replace(SELECTION, k=1))
    with pytest.raises(UserInputError, match=r"preprocess.retrieval.selection.k: 3 then, 1 now"
                                             r".*new MODEL_DIR"):
        _run(source, out, fewer)
    with pytest.raises(UserInputError, match=r"preprocess.retrieval: \{...\} then, None now"):
        _run(source, out, None)
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    (out / pp.PLAN_FILE).write_text(json.dumps({k: plan[k] for k in ("source", "shards")}))
    with pytest.raises(UserInputError, match=r"retrieval.json was made with another retrieval "
                                             r"setting \(SelectionConfig.k: 3 then, 1 now\)"):
        _run(source, out, fewer)
    with pytest.raises(UserInputError, match="preprocessed with retrieval"):
        _run(source, out, None)
    assert _run(source, out, retrieval) == built[1]  # the earlier settings: accepted


def test_neighbors_by_modality(built, source, retrieval, tmp_path):
    """SelectionConfig.by_modality (the paper's one by image, one by text): the bank keeps
    each train document's query-dropout text and image vectors apart, other splits their
    clean ones, and every document's neighbors are the by-modality search's. Its plan
    differs from the plain folder's: a rerun of that folder with it is refused."""
    by_modality = dataclasses.replace(
        retrieval, selection=dataclasses.replace(SELECTION, by_modality=True))
    out = tmp_path / "data"
    _run(source, out, by_modality)
    retriever = Retriever.open(retrieval_pass.retrieval_dir(str(out)), by_modality.selection,
                               with_encoder=False)
    assert retriever.bank.has_modality_queries
    files = retrieval_pass.ShardFiles.of(str(out), next(
        s for s in pp.plan_shards(source, ("train", "validation", "test"), 15)
        if s.split == "validation"))
    doc_ids, modal = files.read_queries(modalities=True)
    want, _ = retriever.search_by_modality_raw(modal)
    records = _records(out, "validation")
    got = [[d.decode() for d in records[str(d)]["neighbor_doc_ids"]] for d in doc_ids]
    assert got == [[str(x) for x in retriever.bank.doc_ids(row)] for row in want]
    # Train documents: their query-dropout vectors by modality, never themselves.
    bank = retriever.bank
    own = np.arange(bank.shard_sizes[0])
    train_modal = np.asarray(bank.shard_array(0, "modality_queries"))
    want, _ = retriever.search_by_modality_raw(train_modal, exclude_rows=own)
    train = _records(out, "train")
    for row, doc_id in enumerate(bank.shard_array(0, "doc_ids")):
        stored = [d.decode() for d in train[str(doc_id)]["neighbor_doc_ids"]]
        assert stored == [str(x) for x in bank.doc_ids(want[row][want[row] >= 0])]
        assert str(doc_id) not in stored
    plain = _records(built[0], "validation")
    assert any(got[i] != [d.decode() for d in plain[str(d)]["neighbor_doc_ids"]]
               for i, d in enumerate(doc_ids))
    copy = shutil.copytree(built[0], tmp_path / "plain")
    with pytest.raises(UserInputError, match="by_modality"):
        _run(source, copy, by_modality)


def test_a_missing_encoder_is_named_before_the_text_model_is_trained(source, tmp_path):
    """A mistyped ENCODER_DIR was refused after the text model was trained into MODEL_DIR."""
    from cm3leon_jax.errors import MissingInputError
    missing = retrieval_pass.RetrievalConfig(encoder_dir=str(tmp_path / "encodr"))
    with pytest.raises(MissingInputError, match="encodr"):
        _run(source, tmp_path / "data", missing)
    assert not (tmp_path / "data" / "vocab").exists()
