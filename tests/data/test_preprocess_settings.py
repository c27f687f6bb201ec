"""What preprocessing records for the runs after it: the settings in plan.json (a rerun with
other ones is refused), the longest documents in the manifest (a training length they do
not fit is refused), and the errors that name the binding to change."""

import dataclasses
import functools
import json
import logging
import os
import re
import shutil

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers)
from cm3leon_jax.data import preprocess as pp
from cm3leon_jax.data import seqio_augment, shards
from cm3leon_jax.data.augment import AugmentConfig
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder, cached_encoder
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from tests.data.test_preprocess import (
    TINY_VQ,
    _run,
    synthetic_source,  # noqa: F401  (a fixture)
    tiny_image_tokenizer,
)
from tests.data.test_preprocess_retrieval import retrieval  # noqa: F401  (a fixture)
from tests.retrieval.retrieval_testlib import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = ("preprocess.seq_len", "preprocess.max_text_tokens", "preprocess.image_first_prob",
            "preprocess.text_vocab_size", "preprocess.num_sentinels", "preprocess.retrieval")


@pytest.fixture(scope="module")
def folder(synthetic_source, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("data")
    return out, _run(synthetic_source, out)


def _rerun(source, out, **changed):
    """test_preprocess's `_run`, with any setting changed."""
    kw = dict(image_tokenizer_fn=tiny_image_tokenizer, docs_per_shard=10, batch_size=4,
              text_vocab_size=300, num_sentinels=8, seq_len=512)
    return pp.preprocess(str(out), source=source, **{**kw, **changed})


def _copy(folder, tmp_path):
    return shutil.copytree(folder[0], tmp_path / "copy")


# --- plan.json: the settings that decide the records ----------------------------------------

def test_plan_records_the_settings_and_refuses_a_rerun_with_others(synthetic_source, folder,  # noqa: F811
                                                                   tmp_path):
    out = _copy(folder, tmp_path)
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    assert {k: plan[k] for k in SETTINGS} == {
        "preprocess.seq_len": 512, "preprocess.max_text_tokens": 256,
        "preprocess.image_first_prob": 0.0, "preprocess.text_vocab_size": 300,
        "preprocess.num_sentinels": 8, "preprocess.retrieval": None}
    assert _run(synthetic_source, out) == folder[1]  # the same settings: accepted
    before = sorted(os.listdir(out))
    for changed, message in (({"seq_len": 256}, "preprocess.seq_len: 512 then, 256 now"),
                             ({"image_first_prob": 0.5},
                              "preprocess.image_first_prob: 0.0 then, 0.5 now"),
                             ({"max_text_tokens": 10},
                              "preprocess.max_text_tokens: 256 then, 10 now")):
        with pytest.raises(UserInputError, match=re.escape(message) + ".*new MODEL_DIR"):
            _rerun(synthetic_source, out, **changed)
    with pytest.raises(UserInputError, match="preprocess.text_vocab_size: 300 then, 280 now"):
        _rerun(synthetic_source, out, text_vocab_size=280)
    with pytest.raises(UserInputError, match="preprocess.num_sentinels: 8 then, 16 now"):
        _rerun(synthetic_source, out, num_sentinels=16)
    assert sorted(os.listdir(out)) == before


def test_a_vocabulary_left_without_a_plan_is_checked_against_the_settings(
        synthetic_source, folder, tmp_path):  # noqa: F811
    """A first run that died after training its vocabulary (before plan.json) left it; a
    rerun with another size took it silently and recorded the new size in its plan."""
    out = _copy(folder, tmp_path)
    os.remove(out / pp.PLAN_FILE)
    with pytest.raises(UserInputError, match=r"vocab was trained with \{'text_vocab_size': 300"):
        _rerun(synthetic_source, out, text_vocab_size=280)
    with pytest.raises(UserInputError, match="docs_per_shard=0: give a whole number"):
        _rerun(synthetic_source, out, docs_per_shard=0)


def test_a_plan_from_before_the_settings_were_recorded_is_accepted(synthetic_source, folder,  # noqa: F811
                                                                   tmp_path):
    out = _copy(folder, tmp_path)
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    (out / pp.PLAN_FILE).write_text(json.dumps({"source": plan["source"],
                                                "shards": plan["shards"]}))
    assert _run(synthetic_source, out)["splits"] == folder[1]["splits"]
    assert "preprocess.seq_len" not in json.loads((out / pp.PLAN_FILE).read_text())
    # No plan.json at all (a folder from before it): its layout is recorded, not settings
    # that did not make its shards.
    os.remove(out / pp.PLAN_FILE)
    _run(synthetic_source, out)
    assert set(json.loads((out / pp.PLAN_FILE).read_text())) == {"source", "shards"}


@functools.cache
def retrained_image_tokenizer():
    """tiny_image_tokenizer's shape with other weights, as a retrained checkpoint would be."""
    return ImageTokenizer.random_init(TINY_VQ, seed=1, batch_size=4)


def test_a_rerun_with_other_image_tokenizer_weights_is_refused(synthetic_source, folder,  # noqa: F811
                                                               tmp_path, caplog):
    """Finished shards would keep the earlier tokenizer's codes beside the new one's."""
    out = _copy(folder, tmp_path)
    with pytest.raises(UserInputError, match=r"preprocess.image_tokenizer_fn.config_and_weights"
                                             r".*new MODEL_DIR") as refused:
        _rerun(synthetic_source, out, image_tokenizer_fn=retrained_image_tokenizer)
    then, now = tiny_image_tokenizer().fingerprint, retrained_image_tokenizer().fingerprint
    assert f"config_and_weights: {then} then, {now} now" in str(refused.value)
    assert then == ImageTokenizer.random_init(TINY_VQ, seed=0).fingerprint != now
    assert _run(synthetic_source, out) == folder[1]  # the same tokenizer: accepted
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    del plan["preprocess.image_tokenizer_fn"]  # a plan.json from before it was recorded
    (out / pp.PLAN_FILE).write_text(json.dumps(plan))
    with caplog.at_level(logging.WARNING):
        assert _run(synthetic_source, out) == folder[1]
    assert "predates recording preprocess.image_tokenizer_fn" in caplog.text


@pytest.fixture(scope="module")
def with_retrieval(synthetic_source, retrieval, tmp_path_factory):  # noqa: F811
    """A folder preprocessed with retrieval (the train split only: fewer shards to encode),
    its encoder in a folder of this module's."""
    out = tmp_path_factory.mktemp("retrieval_data")
    return out, _rerun_retrieval(synthetic_source, out, retrieval)


def _rerun_retrieval(source, out, retrieval):  # noqa: F811
    return _rerun(source, out, retrieval=retrieval, splits=("train",))


def _save_encoder(directory, seed):
    cfg = small_config()
    DocumentEncoder(cfg, clip.init_params(cfg, seed),
                    clip_tokenizer.WordTokenizer(cfg.vocab_size)).save(str(directory))
    cached_encoder.cache_clear()  # as a new run's process would load it


def test_the_encoder_is_recorded_by_its_contents_not_its_path(
        synthetic_source, with_retrieval, retrieval, tmp_path):  # noqa: F811
    """A data folder moved or copied with its encoder reruns; the plan names no path."""
    out = shutil.copytree(with_retrieval[0], tmp_path / "data")
    moved = shutil.copytree(retrieval.encoder_dir, tmp_path / "encoder")
    assert _rerun_retrieval(synthetic_source, out, dataclasses.replace(
        retrieval, encoder_dir=str(moved))) == with_retrieval[1]
    entry = json.loads((out / pp.PLAN_FILE).read_text())["preprocess.retrieval"]
    assert "encoder_dir" not in entry
    assert entry["encoder_fingerprint"] == cached_encoder(retrieval.encoder_dir).fingerprint


def test_an_encoder_replaced_in_place_is_refused(synthetic_source, with_retrieval,  # noqa: F811
                                                 retrieval, tmp_path):  # noqa: F811
    """The same encoder path with other weights: finished shards would keep vectors and
    neighbors of the earlier encoder."""
    out = shutil.copytree(with_retrieval[0], tmp_path / "data")
    try:
        _save_encoder(retrieval.encoder_dir, seed=1)
        with pytest.raises(UserInputError, match=r"preprocess.retrieval.encoder_fingerprint: "
                                                 r".*new MODEL_DIR") as refused:
            _rerun_retrieval(synthetic_source, out, retrieval)
        now = cached_encoder(retrieval.encoder_dir).fingerprint
    finally:
        _save_encoder(retrieval.encoder_dir, seed=0)  # the module's other tests read it
    then = cached_encoder(retrieval.encoder_dir).fingerprint
    assert f"encoder_fingerprint: {then} then, {now} now" in str(refused.value)


def test_a_plan_naming_the_encoder_by_path_is_compared_by_path(
        synthetic_source, with_retrieval, retrieval, tmp_path):  # noqa: F811
    """plan.json from before the fingerprint: the same encoder path reruns, another is
    refused as before."""
    out = shutil.copytree(with_retrieval[0], tmp_path / "data")
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    entry = plan["preprocess.retrieval"]
    del entry["encoder_fingerprint"]
    entry["encoder_dir"] = os.path.abspath(retrieval.encoder_dir)
    (out / pp.PLAN_FILE).write_text(json.dumps(plan))
    assert _rerun_retrieval(synthetic_source, out, retrieval) == with_retrieval[1]
    assert json.loads((out / pp.PLAN_FILE).read_text()) == plan  # kept in its form
    moved = shutil.copytree(retrieval.encoder_dir, tmp_path / "encoder")
    with pytest.raises(UserInputError, match=re.escape(
            f"preprocess.retrieval.encoder_dir: {entry['encoder_dir']} then, {moved} now")):
        _rerun_retrieval(synthetic_source, out,
                         dataclasses.replace(retrieval, encoder_dir=str(moved)))


# --- the longest documents: which training lengths fit ---------------------------------------

def test_the_manifest_records_the_longest_document_and_seq_len(folder):
    out, result = folder
    for split in ("train", "validation", "test"):
        lengths = shards.query_lengths(str(out), split)
        assert result["splits"][split]["max_tokens"] == int(lengths.max())
    assert result["seq_len"] == 512


def test_a_training_length_the_longest_document_does_not_fit_is_refused(folder):
    out, result = folder
    longest = max(s["max_tokens"] for k, s in result["splits"].items()
                  if k in pp.TRAINING_SPLITS)  # A training run does not read the test split.
    pp.check_fits(AugmentConfig(seq_len=longest + 24), str(out))  # fits exactly
    with pytest.raises(UserInputError, match=r"up to %d tokens longer than train.seq_len=%d.*"
                       r"preprocess.seq_len=512.*train.seq_len >= %d.*"
                       r"retrieval_augment.max_spans <= 7" % (longest, longest + 23,
                                                              longest + 24)):
        pp.check_fits(AugmentConfig(seq_len=longest + 23), str(out))
    with pytest.raises(UserInputError, match=r"train.seq_len=64 allows"):
        pp.check_fits(AugmentConfig(seq_len=64), str(out))


@pytest.fixture
def bound(folder):
    gin.clear_config()
    gin.bind_parameter("data_dirs.synthetic", str(folder[0]))
    yield folder
    gin.clear_config()


def _dataset(task, seq_len):
    return seqio.get_mixture_or_task(task).get_dataset(
        {"targets": seq_len}, split="validation", shuffle=False, num_epochs=1)


@pytest.mark.parametrize("task", ["cm3leon_synthetic", "cm3leon_synthetic_no_retrieval"])
def test_pretraining_tasks_refuse_what_their_filter_would_drop(bound, task):
    """Some documents too long: refused, not dropped without a word (none fitting made the
    first batch hang: seqio repeats the empty dataset)."""
    out, _ = bound
    longest = max(r["ids"].size for split in pp.TRAINING_SPLITS
                  for r in shards.read_split(str(out), split).as_numpy_iterator())
    with pytest.raises(UserInputError, match=r"documents of up to %d tokens" % longest):
        _dataset(task, longest + 20)
    written = len(list(shards.read_split(str(out), "validation").as_numpy_iterator()))
    assert len(list(_dataset(task, longest + 24).as_numpy_iterator())) == written


def test_an_empty_training_split_is_refused(folder, tmp_path):
    """seqio repeats an empty split forever: the first batch (or the held-out loss) hung."""
    out = _copy(folder, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["validation"]["written"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="holds no 'validation' documents"):
        pp.check_fits(AugmentConfig(seq_len=512), str(out))
    manifest["splits"]["validation"]["written"] = 6
    manifest["splits"]["test"]["written"] = 0  # Not read by training.
    (out / "manifest.json").write_text(json.dumps(manifest))
    pp.check_fits(AugmentConfig(seq_len=512), str(out))


def test_a_manifest_without_the_longest_documents_is_counted(folder, tmp_path, caplog,
                                                            monkeypatch):
    out = _copy(folder, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    for counts in manifest["splits"].values():
        del counts["max_tokens"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    lengths = shards.query_lengths(str(out), "validation")
    cut = int(np.sort(lengths)[len(lengths) // 2])  # about half are longer
    dropped = int((lengths > cut).sum())
    with caplog.at_level(logging.WARNING):
        pp.check_fits(AugmentConfig(seq_len=cut + 24), str(out))
    assert f"{dropped} of {lengths.size} 'validation' documents are longer" in caplog.text
    shortest = min(int(shards.query_lengths(str(out), s).min()) for s in manifest["splits"])
    with pytest.raises(UserInputError, match=r"all \d+ of them"):
        pp.check_fits(AugmentConfig(seq_len=shortest + 23), str(out))
    monkeypatch.setattr(pp, "COUNT_AT_MOST", 5)  # A large old folder is not read at every start.
    with caplog.at_level(logging.WARNING):
        pp.check_fits(AugmentConfig(seq_len=shortest + 23), str(out))
    assert "'train' split is too large to count at every start (24 documents)" in caplog.text


# --- CM3 spans and the layout's sentinels -----------------------------------------------------

def test_more_spans_than_sentinels_is_refused_before_any_data_is_read(tmp_path):
    vocab = MultimodalVocabulary.create(
        str(tmp_path / "vocab"), TextTokenizer.train([f"a red circle {i}" for i in range(40)],
                                                     277),
        image_codes=16, num_sentinels=4, image_length=4)
    features = {"targets": seqio.Feature(vocab, add_eos=False, dtype="int32")}

    def unread():
        raise AssertionError("the data was read")
        yield  # (a generator)

    data = tf.data.Dataset.from_generator(unread, output_signature={
        k: tf.TensorSpec([None], tf.int32) for k in ("ids", "neighbor_ids", "neighbor_lengths")})
    augment = functools.partial(seqio_augment.retrieval_augment, data, features, {"targets": 64})
    with pytest.raises(UserInputError, match=r"retrieval_augment.max_spans=8 .* 4 sentinels"):
        augment()
    augment(max_spans=4)
    augment(mean_spans=0.0)  # no span drawn: no sentinel needed


# --- a source without a split named in preprocess.splits --------------------------------------

def test_a_missing_split_names_preprocess_splits(tmp_path):
    source = pp.TfdsSource(functools.partial(
        pp.synthetic_builder, image_size=32, data_dir=str(tmp_path),
        split_sizes={"train": 4, "validation": 2}))
    with pytest.raises(UserInputError, match=r"no split 'test'.*preprocess.splits"):
        pp.plan_shards(source, ("train", "validation", "test"), docs_per_shard=10)


def test_the_documented_own_data_command_binds_the_splits_it_has():
    from cm3leon_jax import main  # noqa: F401  (`run`, which the file binds)
    path = os.path.join(ROOT, "gin_configs/runs/preprocess.gin")
    header = open(path).read().split("Your own data", 1)[1].split("# At scale", 1)[0]
    flags = re.findall(r"--gin\.(\S+?=(?:\"[^\"]*\"|\S+))", header)
    bindings = [f.replace('"', "") for f in flags]
    assert any(b.startswith("preprocess.splits=") for b in bindings), bindings
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([path], bindings + [
            "MODEL_DIR='x'", "IMAGE_TOKENIZER_DIR='x'", "ENCODER_DIR='x'"])
        assert tuple(gin.query_parameter("preprocess.splits")) == ("train", "validation")
        assert "user_data_builder" in str(gin.query_parameter("TfdsSource.builder_fn"))
    finally:
        gin.clear_config()


def test_both_preprocessors_cut_shards_alike_and_refuse_a_shard_size_below_one():
    from cm3leon_jax.data import sft_preprocess
    assert shards.slices(10, 4, "x") == [(0, 3), (3, 6), (6, 10)]
    assert shards.slices(0, 4, "x") == [(0, 0)]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserInputError, match=rf"sft_preprocess.docs_per_shard={bad!r}: "
                                                 "give a whole number >= 1"):
            sft_preprocess.plan_shards(None, ["vqa"], ["train"], bad)


def test_a_second_run_in_the_process_gets_its_own_image_tokenizer():
    """The tokenizer is kept per process for the Beam workers, keyed by the gin config: a
    later preprocessing whose `load_image_tokenizer` gin binds to another tokenizer gets that
    one (it got the first run's, which with the same code count is silently wrong). Only the
    latest is kept."""
    import jax

    from cm3leon_jax.vocab.image_tokenizer import load_image_tokenizer
    config = ["load_image_tokenizer.config = @VQGANConfig()", "VQGANConfig.image_size = 16",
              "VQGANConfig.base_channels = 8", "VQGANConfig.channel_multipliers = (1, 2)",
              "VQGANConfig.num_res_blocks = 1", "VQGANConfig.attn_levels = ()",
              "VQGANConfig.latent_channels = 4", "VQGANConfig.embed_dim = 4",
              "VQGANConfig.codebook_size = 16", "VQGANConfig.num_groups = 4"]
    got = []
    for seed in (0, 1, 0):
        gin.clear_config()
        try:
            gin.parse_config([*config, f"load_image_tokenizer.seed = {seed}"])
            got.append(pp._image_tokenizer(load_image_tokenizer))  # noqa: SLF001
        finally:
            gin.clear_config()
    first, second, third = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t.params)])
                            for t in got)
    assert not np.array_equal(first, second) and np.array_equal(first, third)
    assert len(pp._IMAGE_TOKENIZERS) == 1  # noqa: SLF001  The latest only, not every one.
    gin.parse_config([*config, "load_image_tokenizer.seed = 0"])
    try:  # The same configuration again: the same tokenizer (the Beam workers' reuse).
        assert pp._image_tokenizer(load_image_tokenizer) is got[2]  # noqa: SLF001
    finally:
        gin.clear_config()
