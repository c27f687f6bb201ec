"""SFT preprocessing (Beam, tiny VQGAN) and the registered SFT tasks and mixture."""

import collections
import functools
import json
import os
import shutil

import gin
import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  (registers)
from cm3leon_jax.data import augment, sft_examples, sft_preprocess, sft_prompts, shards
from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.document import Document, Image, Text
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from tests.data.test_preprocess import tiny_image_tokenizer
from tests.data.test_preprocess_settings import retrained_image_tokenizer
from tests.tasks.tasks_testlib import batches, cached_and_fresh

SEQ_LEN = 512
SIZES = {"train": 6, "validation": 2, "test": 2}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """Every family on 6 + 2 + 2 corpus scenes, tokenized like `make demo` would."""
    root = tmp_path_factory.mktemp("sft")
    texts = [t for i in range(20) for t in
             (sft_examples.long_caption(sft_examples.corpus_scene(0, "train", i, 32)),)]
    MultimodalVocabulary.create(str(root / "pre_vocab"), TextTokenizer.train(texts, 300),
                                image_codes=64, num_sentinels=8, image_length=64)
    source = sft_preprocess.SyntheticSftSource(image_size=32, split_sizes=SIZES)
    result = sft_preprocess.sft_preprocess(
        str(root / "data"), vocab_dir=str(root / "pre_vocab"), source=source,
        image_tokenizer_fn=tiny_image_tokenizer, docs_per_shard=8, batch_size=16,
        seq_len=SEQ_LEN)
    return str(root / "data"), result


@pytest.fixture
def bound(sft_dir):
    gin.clear_config()
    gin.bind_parameter("sft_data_dirs.synthetic", sft_dir[0])
    yield sft_dir[0]
    gin.clear_config()


def test_preprocess_writes_every_family_and_counts(sft_dir):
    out, result = sft_dir
    assert set(result["families"]) == set(sft_prompts.FAMILIES)
    for family, splits in result["families"].items():
        want = 6 if family != "vqa" else sum(
            len(sft_examples.corpus_examples(0, "train", i, 32, "vqa", vqa_questions=None))
            for i in range(6))
        assert splits["train"]["written"] == splits["train"]["read"] == want, family
        assert splits["train"]["skipped"] == {} and splits["validation"]["written"] == 2
    assert result["families"]["vqa"]["train"]["written"] >= 6 * 5  # 5-11 questions a scene
    assert json.load(open(os.path.join(out, "manifest.json"))) == result
    # A rerun finds every shard done and writes the same manifest.
    again = sft_preprocess.sft_preprocess(
        out, vocab_dir=os.path.join(out, "vocab"),
        source=sft_preprocess.SyntheticSftSource(image_size=32, split_sizes=SIZES),
        image_tokenizer_fn=tiny_image_tokenizer, docs_per_shard=8, seq_len=SEQ_LEN)
    assert again == result


def test_shard_records_are_the_prompt_builders_examples(sft_dir):
    """The stored ids are exactly sft_prompts' layout of the family's example."""
    out, _ = sft_dir
    vocab = MultimodalVocabulary(os.path.join(out, "vocab"))
    for family in ("edit", "vqa", "depth_to_image"):
        records = list(shards.read_split(os.path.join(out, family), "train")
                       .as_numpy_iterator())
        record = next(r for r in records if r["doc_id"].decode().endswith("_0000002"))
        ex = sft_examples.corpus_example(0, "train", 2, 32, family)
        want = sft_preprocess.encode_examples([ex], vocab, tiny_image_tokenizer())[0]
        np.testing.assert_array_equal(record["ids"], want)
        breaks = int((record["ids"] == BREAK_ID).sum())
        assert breaks == len(ex.prompt.segments)
        assert (record["ids"][-1] == EOS_ID) == (family == "vqa")


def test_every_question_of_a_training_scene_is_an_example(sft_dir):
    """VQA asks each training scene all its questions (one image, several answers: the
    question decides), and each held-out scene the one the evaluation asks."""
    out, _ = sft_dir
    vocab = MultimodalVocabulary(os.path.join(out, "vocab"))
    for split in ("train", "validation"):
        records = {r["doc_id"].decode(): r["ids"] for r in
                   shards.read_split(os.path.join(out, "vqa"), split).as_numpy_iterator()}
        examples = sft_examples.corpus_examples(0, split, 1, 32, "vqa",
                                                vqa_questions=None if split == "train" else 1)
        assert examples[0].truth == sft_examples.corpus_example(0, split, 1, 32, "vqa").truth
        assert len({ex.truth["question"] for ex in examples}) == len(examples)
        assert len(examples) >= (5 if split == "train" else 1)
        for ex, want in zip(examples, sft_preprocess.encode_examples(
                examples, vocab, tiny_image_tokenizer())):
            np.testing.assert_array_equal(records[ex.doc_id], want)
        more = [k for k in records if k.startswith(examples[0].doc_id + "/q")]
        assert bool(more) == (split == "train")
    with pytest.raises(ValueError, match="vqa_questions=0"):
        sft_examples.corpus_examples(0, "train", 1, 32, "vqa", vqa_questions=0)


def test_a_vqa_answer_is_the_piece_it_is_after_a_space(sft_dir):
    """The text model has no dummy prefix: "red" alone would be letters, " red" the piece
    the captions taught. The answer reads back without the space."""
    vocab = MultimodalVocabulary(os.path.join(sft_dir[0], "vocab"))
    prompt = sft_prompts.vqa(np.zeros(64, np.int32), "What color is the circle?")
    shorter = []
    for answer in ("red", "circle", "square", "large", "small", "yes", "plain"):
        ids = sft_prompts.output_ids(prompt, answer, vocab)
        np.testing.assert_array_equal(ids, list(vocab.encode(" " + answer)) + [EOS_ID])
        text = vocab.text_tokenizer.decode(vocab.layout.ids_to_text(ids[:-1]))
        assert text.strip() == answer
        shorter += [answer] * (len(ids) - 1 < len(vocab.encode(answer)))
    assert shorter, "no answer word is a piece after a space in this vocabulary"
    caption = sft_prompts.caption(np.zeros(64, np.int32))
    np.testing.assert_array_equal(sft_prompts.output_ids(caption, "red circle", vocab)[:-1],
                                  vocab.encode("red circle"))


def test_a_worker_encodes_each_image_once_across_families(sft_dir):
    """The scene's own image recurs across families and VQA questions: encoded once, the
    same codes as encoding every example on its own."""
    vocab = MultimodalVocabulary(os.path.join(sft_dir[0], "vocab"))
    tokenizer, seen = tiny_image_tokenizer(), []

    class Counting:
        def encode(self, images):
            seen.append(len(images))
            return tokenizer.encode(images)

    known = {}
    batches = [sft_examples.corpus_examples(0, "train", 1, 32, f, vqa_questions=None)
               for f in ("vqa", "caption", "edit", "segment")]
    got = [ids for b in batches for ids in sft_preprocess.encode_examples(b, vocab, Counting(),
                                                                            known)]
    want = [sft_preprocess.encode_examples([ex], vocab, tokenizer)[0] for b in batches
            for ex in b]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # The scene, then nothing new (caption), the edited scene, the mask.
    assert seen == [1, 1, 1] and len(known) == 3


def test_too_long_examples_are_counted_not_dropped_silently(sft_dir, tmp_path):
    out, _ = sft_dir
    result = sft_preprocess.sft_preprocess(
        str(tmp_path), vocab_dir=os.path.join(out, "vocab"),
        source=sft_preprocess.SyntheticSftSource(image_size=32, split_sizes={"train": 3}),
        image_tokenizer_fn=tiny_image_tokenizer, families=("edit", "caption"),
        splits=("train",), seq_len=160)
    edit = result["families"]["edit"]["train"]  # two images: 128 codes + text > 160 - 24
    assert edit["written"] == 0 and edit["skipped"] == {"document_too_long": 3}
    assert edit["min_tokens"] > 160 - 24 and result["seq_len"] == 160
    assert result["families"]["caption"]["train"]["written"] == 3
    # A task of a family with no example is one clear error, not a dataset repeated forever.
    gin.clear_config()
    gin.bind_parameter("sft_data_dirs.synthetic", str(tmp_path))
    try:
        with pytest.raises(UserInputError, match=r"'edit' has no 'train' example.*all 3 "
                                                 r"were longer than sft_preprocess.seq_len=160"):
            _batches("cm3leon_sft_edit", seq_len=160)
        assert len(_batches("cm3leon_sft_caption", seq_len=160, pack=False)) == 3
    finally:
        gin.clear_config()


def test_a_seq_len_its_longest_examples_do_not_fit_is_one_clear_error(bound, sft_dir,
                                                                     tmp_path):
    """Examples written at SEQ_LEN, trained at a length one of them does not fit: the length
    filter would drop it without a word, so the error names the family, both lengths and
    the least train.seq_len (from the manifest's longest example); that one fits."""
    longest = max(c["max_tokens"] for c in sft_dir[1]["families"]["edit"].values())
    assert longest <= SEQ_LEN - 24  # Written at SEQ_LEN: it fits there.
    seq_len = longest + 24 - 1  # One short (24 = the CM3 reserve of 3 * max_spans).
    with pytest.raises(UserInputError, match=rf"SFT family 'edit' has .* examples of up to "
                                             rf"{longest} tokens, longer than train.seq_len="
                                             rf"{seq_len} allows.*sft_preprocess.seq_len="
                                             rf"{SEQ_LEN}: train with train.seq_len >= "
                                             rf"{seq_len + 1}"):
        _batches("cm3leon_sft_edit", seq_len=seq_len)
    assert _batches("cm3leon_sft_edit", seq_len=seq_len + 1)  # One more token: it fits.
    # A manifest from before max_tokens: the budget of the seq_len it was written for.
    old = json.load(open(os.path.join(bound, "manifest.json")))
    for counts in old["families"]["edit"].values():
        del counts["max_tokens"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    check = functools.partial(sft_preprocess.check_fits, data_dir=str(tmp_path), family="edit")
    check(augment.AugmentConfig(seq_len=SEQ_LEN))
    with pytest.raises(UserInputError, match=rf"up to {SEQ_LEN - 24} tokens"):
        check(augment.AugmentConfig(seq_len=SEQ_LEN - 1))


def test_a_rerun_of_another_plan_is_refused(sft_dir, tmp_path):
    """Shards of two runs in one folder would be read as one split: another
    docs_per_shard, seq_len, source or families is refused and nothing is written; in a
    folder from before plan.json a stray shard is refused, and a shard's stats of another
    slice of the source do not count as done."""
    def run(n=6, per=6, seq_len=SEQ_LEN, families=("caption",)):
        return sft_preprocess.sft_preprocess(
            str(tmp_path), vocab_dir=os.path.join(sft_dir[0], "vocab"),
            source=sft_preprocess.SyntheticSftSource(image_size=32, split_sizes={"train": n}),
            image_tokenizer_fn=tiny_image_tokenizer, families=families, splits=("train",),
            docs_per_shard=per, seq_len=seq_len)

    run()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["shards"] == {"caption/train": [1, 6]} and plan["seq_len"] == SEQ_LEN
    assert plan["families"] == ["caption"] and plan["source"]["synthetic"]["seed"] == 0
    before = sorted(os.listdir(tmp_path / "caption"))
    with pytest.raises(UserInputError, match=r"shards: .*\[1, 6\].* then, .*\[2, 6\].* now"):
        run(per=3)
    with pytest.raises(UserInputError, match=rf"seq_len: {SEQ_LEN} then, 20000 now"):
        run(seq_len=20000)
    with pytest.raises(UserInputError, match=r"another source or shard layout \(source: "):
        run(n=8)
    with pytest.raises(UserInputError, match=r"families: \['caption'\] then"):
        run(families=("caption", "edit"))
    assert sorted(os.listdir(tmp_path / "caption")) == before
    os.remove(tmp_path / "plan.json")  # A folder from before plan.json: its shards are checked.
    with pytest.raises(UserInputError, match=r"shards of another layout "
                                             r"\(caption/train-00000-of-00001"):
        run(per=3)
    assert run(n=5)["families"]["caption"]["train"]["written"] == 5  # [0, 6) is not [0, 5)
    assert len(list(shards.read_split(str(tmp_path / "caption"), "train"))) == 5


def test_a_rerun_with_other_image_tokenizer_weights_is_refused(sft_dir, tmp_path, caplog):
    """A retrained image tokenizer of the same shape gives other codes: finished shards would
    keep the old ones beside the new. A plan.json from before the tokenizer was recorded in
    it is accepted with a warning. (The vocabulary is a copy without its data folder's
    plan.json: the data's own record refuses another tokenizer before, the last lines.)"""
    vocab_dir = str(tmp_path / "pretraining" / "vocab")
    shutil.copytree(os.path.join(sft_dir[0], "vocab"), vocab_dir)
    out = tmp_path / "sft_data"

    def run(tokenizer_fn):
        return sft_preprocess.sft_preprocess(
            str(out), vocab_dir=vocab_dir,
            source=sft_preprocess.SyntheticSftSource(image_size=32, split_sizes={"train": 4}),
            image_tokenizer_fn=tokenizer_fn, families=("caption",), splits=("train",),
            docs_per_shard=4, seq_len=SEQ_LEN)

    run(tiny_image_tokenizer)
    with pytest.raises(UserInputError, match=r"sft_preprocess.image_tokenizer_fn."
                                             r"config_and_weights: \w+ then, \w+ now"):
        run(retrained_image_tokenizer)
    run(tiny_image_tokenizer)  # The same weights: every shard is done.
    plan = json.loads((out / "plan.json").read_text())
    del plan["sft_preprocess.image_tokenizer_fn"]
    (out / "plan.json").write_text(json.dumps(plan))
    run(retrained_image_tokenizer)
    assert "predates recording sft_preprocess.image_tokenizer_fn" in caplog.text
    # The data folder whose vocabulary it is recorded its tokenizer: another is refused.
    with pytest.raises(UserInputError, match=r"sft_preprocess.image_tokenizer_fn is not the "
                                             r"image tokenizer the data in .* was made with"):
        sft_preprocess.sft_preprocess(
            str(tmp_path / "other"), vocab_dir=os.path.join(sft_dir[0], "vocab"),
            source=sft_preprocess.SyntheticSftSource(image_size=32, split_sizes={"train": 4}),
            image_tokenizer_fn=retrained_image_tokenizer, families=("caption",),
            splits=("train",), docs_per_shard=4, seq_len=SEQ_LEN)


def test_a_mixture_leaves_out_families_at_rate_0_or_without_shards(bound, sft_dir, tmp_path):
    """A user folder with captions only (no adapter writes most families): the mixture
    draws captions; a family task without shards names sft_preprocess."""
    user = tmp_path / "user"
    for folder in ("vocab", "caption"):
        shutil.copytree(os.path.join(bound, folder), user / folder)
    shutil.copy(os.path.join(bound, "manifest.json"), user / "manifest.json")
    gin.bind_parameter("sft_data_dirs.user", str(user))
    mix = seqio.get_mixture_or_task("cm3leon_sft_user_mix")
    captions = {tuple(r["ids"]) for r in shards.read_split(str(user / "caption"), "train")
                .as_numpy_iterator()}
    vocab = MultimodalVocabulary(os.path.join(bound, "vocab"))
    ds = mix.get_dataset({"targets": SEQ_LEN}, split="train", shuffle=False, seed=0)
    assert all(tuple(cm3_lib.uncm3(ex["targets"], vocab.layout)) in captions
               for ex in ds.take(4).as_numpy_iterator())
    with pytest.raises(FileNotFoundError, match="run the `sft_preprocess` mode first"):
        _batches("cm3leon_sft_user_vqa")
    gin.bind_parameter("sft_mixture_rates.rates", {"caption": 0.0})
    with pytest.raises(UserInputError, match=r"nothing to draw from .* rate 0: \['caption'\]"):
        mix.get_dataset({"targets": SEQ_LEN}, split="train")


def test_mixture_rates_are_finite_and_one_is_positive(bound):
    """All zero would leave nothing to draw (a bare StopIteration later); NaN passes
    `rate < 0`."""
    all_zero = {f: 0.0 for f in sft_prompts.FAMILIES}
    gin.bind_parameter("sft_mixture_rates.rates", all_zero)
    with pytest.raises(UserInputError, match="nothing to draw from"):
        seqio.get_mixture_or_task("cm3leon_sft_mix").get_dataset({"targets": SEQ_LEN})
    for bad in (float("nan"), float("inf"), "1"):
        gin.bind_parameter("sft_mixture_rates.rates", {"vqa": bad})
        with pytest.raises(UserInputError, match=r"rates\['vqa'\]=.*finite numbers >= 0"):
            seqio.get_mixture_or_task("cm3leon_sft_mix").get_dataset({"targets": SEQ_LEN})


def test_another_vocabulary_is_refused(sft_dir, tmp_path):
    out, _ = sft_dir
    other = tmp_path / "other_vocab"
    MultimodalVocabulary.create(str(other), TextTokenizer.train(["a b c d e"] * 10, 263),
                                image_codes=64, num_sentinels=8, image_length=64)
    with pytest.raises(ValueError, match="another vocabulary"):
        sft_preprocess.copy_vocabulary(str(other), out)


_batches = functools.partial(batches, seq_len=SEQ_LEN)


def test_every_family_task_yields_cm3_examples(bound):
    names = seqio.TaskRegistry.names()
    vocab = MultimodalVocabulary(os.path.join(bound, "vocab"))
    for family in sft_prompts.FAMILIES:
        assert f"cm3leon_sft_{family}" in names and f"cm3leon_sft_user_{family}" in names
    for family in ("edit", "caption", "segment"):
        rows = _batches(f"cm3leon_sft_{family}", pack=False)
        assert len(rows) == 6
        for row in rows:
            targets = row["decoder_target_tokens"]
            n = int((targets != 0).sum())
            ids = cm3_lib.uncm3(targets[:n], vocab.layout)
            assert ids[0] != BREAK_ID and int((ids == BREAK_ID).sum()) >= 1
            np.testing.assert_array_equal(row["decoder_loss_weights"][:n] == 0,
                                          vocab.layout.is_sentinel(targets[:n]))


def test_sft_cm3_spans_and_loss_come_from_gin(bound):
    gin.bind_parameter("sft_cm3.mean_spans", 0.0)
    vocab = MultimodalVocabulary(os.path.join(bound, "vocab"))
    for row in _batches("cm3leon_sft_vqa", pack=False):
        targets = row["decoder_target_tokens"]
        n = int((targets != 0).sum())
        assert not vocab.layout.is_sentinel(targets[:n]).any()  # Left to right, as written.
        assert targets[n - 1] == EOS_ID and (row["decoder_loss_weights"][:n] == 1).all()
    gin.bind_parameter("sft_cm3.loss_on", "output")  # The answer and its <eos> only.
    for row in _batches("cm3leon_sft_vqa", pack=False):
        targets, weights = row["decoder_target_tokens"], row["decoder_loss_weights"]
        last_break = int(np.flatnonzero(targets == BREAK_ID)[-1])
        n = int((targets != 0).sum())
        assert (weights[:last_break + 1] == 0).all() and (weights[last_break + 1:n] == 1).all()
    gin.bind_parameter("sft_cm3.mean_spans", 1.0)  # CM3 moves spans across the boundary.
    with pytest.raises(ValueError, match="loss_on='output'"):
        _batches("cm3leon_sft_vqa", pack=False)
    gin.bind_parameter("sft_cm3.mean_spans", -1.0)
    with pytest.raises(ValueError, match="sft_cm3.mean_spans=-1.0"):
        _batches("cm3leon_sft_vqa", pack=False)


def test_mixture_is_deterministic_and_rates_come_from_gin(bound):
    mix = seqio.get_mixture_or_task("cm3leon_sft_mix")
    gin.bind_parameter("sft_mixture_rates.rates", {"vqa": 0.0})
    assert mix.get_rate(seqio.get_mixture_or_task("cm3leon_sft_vqa")) == 0.0
    assert mix.get_rate(seqio.get_mixture_or_task("cm3leon_sft_edit")) == 1.0
    gin.bind_parameter("sft_mixture_rates.rates", {"not_a_family": 1.0})
    with pytest.raises(ValueError, match="not_a_family"):
        mix.get_rate(seqio.get_mixture_or_task("cm3leon_sft_edit"))
    gin.bind_parameter("sft_mixture_rates.rates", {})

    def first(seed):
        ds = mix.get_dataset({"targets": SEQ_LEN}, split="train", shuffle=True, seed=seed,
                             num_epochs=1)
        return [x["targets"] for x in ds.take(6).as_numpy_iterator()]

    a, b, c = first(1), first(1), first(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_mixture_draws_each_family_at_its_gin_rate(bound):
    """Rates bound in gin (vqa off, edit tripled): over 300 draws each family's observed
    share is its rate's share within 4.5 binomial standard deviations (11 families; a mixture
    that ignored the rates, or drew them uniformly, fails by more), and vqa never comes."""
    rates = dict(tasks.sft.DEFAULT_RATES, vqa=0.0, edit=3.0)
    gin.bind_parameter("sft_mixture_rates.rates", {"vqa": 0.0, "edit": 3.0})
    vocab = MultimodalVocabulary(os.path.join(bound, "vocab"))
    family_of = {tuple(r["ids"]): family for family in sft_prompts.FAMILIES
                 for r in shards.read_split(os.path.join(bound, family), "train")
                 .as_numpy_iterator()}
    ds = seqio.get_mixture_or_task("cm3leon_sft_mix").get_dataset(
        {"targets": SEQ_LEN}, split="train", shuffle=False, seed=0, num_epochs=None)
    n = 300  # No example shuffling (slow buffers to fill); the draw of families is seeded.
    drawn = collections.Counter(
        family_of[tuple(cm3_lib.uncm3(ex["targets"], vocab.layout))]
        for ex in ds.take(n).as_numpy_iterator())
    assert drawn["vqa"] == 0 and sum(drawn.values()) == n
    total = sum(rates.values())
    for family, rate in rates.items():
        share = rate / total
        assert abs(drawn[family] / n - share) <= 4.5 * np.sqrt(share * (1 - share) / n) + 1e-9, \
            (family, drawn)


def _pretraining_data(root: str, vocab_dir: str) -> str:
    """Documents with 2 neighbors each, in the SFT shards' vocabulary, like preprocess
    writes them (a caption and an image)."""
    vocab = MultimodalVocabulary(vocab_dir)
    rng = np.random.default_rng(0)
    docs = [document_lib.encode(Document([Text(f"pretraining caption {i}"),
                                          Image(rng.integers(0, 64, 64))]), vocab)
            for i in range(8)]
    shutil.copytree(vocab_dir, os.path.join(root, "vocab"))
    for split in tasks.pretrain.SPLITS:
        records = [shards.TokenizedDocument(
            doc_id=f"{split}-{i}", ids=d, neighbors=[docs[(i + j) % 8] for j in (1, 2)],
            neighbor_doc_ids=[f"{split}-{(i + j) % 8}" for j in (1, 2)])
            for i, d in enumerate(docs)]
        shards.write_split(records, root, split, num_shards=1)
    return root


def test_the_replay_mixture_draws_pretraining_documents_at_its_gin_rate(bound, sft_dir,
                                                                       tmp_path):
    """cm3leon_sft_replay_mix: every family at its rate plus the pretraining task at
    `sft_replay.rate`; with only captions besides, half the draws are pretraining
    documents (retrieval-augmented), half caption examples."""
    vocab_dir = os.path.join(os.path.dirname(sft_dir[0]), "pre_vocab")
    gin.bind_parameter("data_dirs.synthetic", _pretraining_data(str(tmp_path), vocab_dir))
    mix = seqio.get_mixture_or_task("cm3leon_sft_replay_mix")
    pretraining = seqio.get_mixture_or_task("cm3leon_synthetic")
    assert pretraining in mix.tasks and len(mix.tasks) == len(sft_prompts.FAMILIES) + 1
    assert mix.get_rate(pretraining) == 1.0
    gin.bind_parameter("sft_replay.rate", -1.0)
    with pytest.raises(ValueError, match="sft_replay.rate=-1.0"):
        mix.get_rate(pretraining)
    gin.bind_parameter("sft_replay.rate", 1.0)
    gin.bind_parameter("sft_mixture_rates.rates",
                       {f: 0.0 for f in sft_prompts.FAMILIES if f != "caption"})
    vocab = MultimodalVocabulary(os.path.join(bound, "vocab"))
    captions = {tuple(r["ids"]) for r in shards.read_split(os.path.join(bound, "caption"),
                                                           "train").as_numpy_iterator()}
    ds = mix.get_dataset({"targets": SEQ_LEN}, split="train", shuffle=False, seed=0,
                         num_epochs=None)
    n = 100
    from_sft = sum(tuple(cm3_lib.uncm3(ex["targets"], vocab.layout)) in captions
                   for ex in ds.take(n).as_numpy_iterator())
    assert abs(from_sft / n - 0.5) <= 4.5 * np.sqrt(0.25 / n), from_sft


@pytest.mark.slow  # The same cache path as tests/tasks/test_pretrain_tasks.py's (default run).
def test_seqio_caching(sft_dir, tmp_path):
    """seqio's Beam cache of an SFT task gives the examples reading the shards gives."""
    a, b = cached_and_fresh("cm3leon_sft_vqa", {"CM3LEON_SFT_DATA_DIR": sft_dir[0]},
                            ("sft_data_dirs.synthetic", sft_dir[0]), tmp_path / "cache", SEQ_LEN)
    assert len(a) == 2 and a == b
