"""Preprocessing a user's data: a rerun after the data changed is refused (plan.json records
its fingerprint), images smaller than the tokenizer's input are refused before any work, and
a train split of which nothing was written is explained by the manifest's skip counts."""

import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import preprocess as pp
from cm3leon_jax.data import retrieval_pass, user_data
from cm3leon_jax.errors import UserInputError
from tests.data.test_preprocess import ListSource, _run
from tests.retrieval.retrieval_testlib import SELECTION, save_random_encoder

CAPTIONS = {"grey": "a grey square", "dark": "a dark square", "light": "a light square"}


def _folder(root, side):
    root.mkdir()
    for value, (name, caption) in enumerate(CAPTIONS.items()):
        Image.fromarray(np.full((side, side, 3), 60 * value + 40, np.uint8)).save(
            root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    return root


def _source(folder, tfds_dir, image_size, overwrite=False):
    return pp.TfdsSource(functools.partial(
        user_data.user_data_builder, str(folder), image_size=image_size,
        data_dir=str(tfds_dir), overwrite=overwrite))


def test_a_rerun_after_the_data_changed_is_refused(tmp_path):
    """A caption edited and the source prepared again (overwrite=True): the finished shards
    hold the old caption, so the same MODEL_DIR is refused; a plan.json from before the
    fingerprint was recorded is compared as before."""
    folder = _folder(tmp_path / "pairs", 40)
    source = _source(folder, tmp_path / "tfds", 32, overwrite=True)
    out = tmp_path / "out"
    kw = dict(splits=("train", "validation"), text_vocab_size=269)
    _run(source, out, **kw)
    plan = json.loads((out / pp.PLAN_FILE).read_text())
    assert plan["source_fingerprint"] == source.fingerprint()
    _run(source, out, **kw)  # Unchanged: accepted.
    (folder / "grey.txt").write_text("a grey square, edited")
    with pytest.raises(UserInputError, match=r"before its files changed.*new MODEL_DIR"):
        _run(source, out, **kw)
    del plan["source_fingerprint"]
    (out / pp.PLAN_FILE).write_text(json.dumps(plan))
    _run(source, out, **kw)


def test_the_builder_asks_for_a_new_model_dir_with_overwrite(tmp_path):
    folder = _folder(tmp_path / "pairs", 20)
    user_data.user_data_builder(folder, 16, str(tmp_path / "tfds"))
    (folder / "dark.txt").write_text("edited")
    with pytest.raises(UserInputError, match=r"overwrite=True.*new MODEL_DIR"):
        user_data.user_data_builder(folder, 16, str(tmp_path / "tfds"))


def test_images_smaller_than_the_tokenizer_input_are_refused_before_any_work(tmp_path):
    folder = _folder(tmp_path / "pairs", 20)
    with pytest.raises(UserInputError, match=r"images are 16 px but the image tokenizer "
                                             r"reads 32 px.*user_data_builder.image_size"):
        _run(_source(folder, tmp_path / "tfds", 16), tmp_path / "out",
             splits=("train", "validation"), text_vocab_size=269)
    assert not os.path.exists(tmp_path / "tfds") and not os.path.exists(tmp_path / "out")


def test_a_bank_split_with_nothing_written_names_the_skips(tmp_path):
    """Every train pair skipped (too small for the tokenizer): a UserInputError that names
    the skip counts, which the manifest written before the retrieval step holds."""
    small = np.zeros((16, 16, 3), np.uint8)
    pairs = [pp.RawPair(f"small-{i}", small, [c.encode()]) for i, c in
             enumerate(["a red circle", "a blue star", "a green square", "a red star"])]
    pairs.append(pp.RawPair("empty", np.zeros((32, 32, 3), np.uint8), [b" "]))
    retrieval = retrieval_pass.RetrievalConfig(
        encoder_dir=save_random_encoder(str(tmp_path / "encoder")), selection=SELECTION)
    with pytest.raises(UserInputError, match=r"no 'train' document was written.*of 5 pairs "
                                             r"read, skipped empty_caption 1, "
                                             r"image_too_small 4.*manifest.json"):
        _run(ListSource(pairs), tmp_path / "out", splits=("train",), text_vocab_size=274,
             retrieval=retrieval)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["skipped"] == {"image_too_small": 4, "empty_caption": 1}


def test_an_error_reading_the_source_for_the_vocabulary_is_not_taken_for_its_size(tmp_path):
    class Changed:  # A source that finds its files changed while it is read.
        def num_examples(self, split):
            return 4

        def read(self, split, start, stop):
            raise UserInputError("user data 'pairs' changed since it was prepared")
            yield

    with pytest.raises(UserInputError) as raised:
        pp.train_vocabulary(Changed(), None, str(tmp_path / "vocab"), text_vocab_size=300,
                            num_sentinels=4)
    assert "changed since it was prepared" in str(raised.value)
    assert "text_vocab_size" not in str(raised.value)
