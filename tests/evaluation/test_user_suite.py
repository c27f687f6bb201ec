"""`user_suite`: a user's own held-out pairs as an eval suite (gin_configs/runs/eval_user.gin).

A JSONL source whose images carry one to three captions, prepared as preprocessing prepares
it, and a data folder whose plan.json records it as preprocessing records it."""

import json

import gin
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import preprocess, user_data
from cm3leon_jax.data.user_data import user_data_builder
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.evaluation import suites

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A JSONL file: image i (a flat color) captioned 1 + i % 3 times."""
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for i in range(NUM_IMAGES):
        Image.fromarray(np.full((40, 48, 3), (20 * i, 200 - 10 * i, 90), np.uint8)).save(
            root / f"im{i}.png")
        lines += [{"image": f"im{i}.png", "text": f"picture {i} caption {c}"}
                  for c in range(1 + i % 3)]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _source(pairs, tfds_dir, fraction=0.25):
    return preprocess.TfdsSource(lambda prepare=True: user_data_builder(
        str(pairs), 32, str(tfds_dir), validation_fraction=fraction, prepare=prepare))


def _data_dir(tmp_path, source):
    """A data folder as preprocessing leaves it, as far as the suite reads it."""
    data_dir = tmp_path / "my_data"
    data_dir.mkdir()
    (data_dir / "plan.json").write_text(json.dumps({
        "source": source.identity(), preprocess.SOURCE_FINGERPRINT: source.fingerprint()}))
    return data_dir


def test_the_held_out_images_with_every_caption_and_train_images_as_the_others(
        pairs, tmp_path):
    source = _source(pairs, tmp_path / "tfds")
    suite = suites.user_suite(str(_data_dir(tmp_path, source)), source)(24)
    held_out = list(source.read("validation", 0, source.num_examples("validation")))
    by_image = {}
    for pair in held_out:
        by_image.setdefault(pair.doc_id.split("#")[0], []).append(pair.captions[0].decode())
    task = suite.captioning
    assert len(task.images) == len(by_image) >= 2 and task.images.shape[1:] == (24, 24, 3)
    # Each image once, with all its captions (an image of three captions is one example).
    assert sorted(map(sorted, task.references)) == sorted(map(sorted, by_image.values()))
    assert sorted(task.ids) == sorted(by_image)  # Named by their images.
    assert suite.text_to_image.prompts == [r[0] for r in task.references]
    np.testing.assert_array_equal(suite.text_to_image.reference_images, task.images)
    # The chance row's images come from train, none of them held out.
    others = suite.text_to_image.other_images
    assert len(others) == len(task.images)
    assert not {o.tobytes() for o in others} & {i.tobytes() for i in task.images}
    assert suite.name == f"user_validation_{len(task.images)}"


def test_max_images_keeps_the_first_images_and_all_their_captions(pairs, tmp_path):
    source = _source(pairs, tmp_path / "tfds", fraction=0.6)
    data_dir = str(_data_dir(tmp_path, source))
    full = suites.user_suite(data_dir, source, max_images=None)(24)
    two = suites.user_suite(data_dir, source, max_images=2, tasks=("captioning",))(24)
    assert two.text_to_image is None and len(two.captioning.images) == 2
    assert two.captioning.references == full.captioning.references[:2]
    np.testing.assert_array_equal(two.captioning.images, full.captioning.images[:2])


def test_pairs_other_than_the_data_folders_are_refused(pairs, tmp_path):
    """Another held-out share makes another split: images the model trained on. Refused when
    the suite is bound, before the eval restores its model (not when it is built)."""
    data_dir = str(_data_dir(tmp_path, _source(pairs, tmp_path / "tfds")))
    with pytest.raises(UserInputError, match=r"was preprocessed from .*val0p25.* but this "
                       r"run's pairs are .*val0p5.*validation_fraction as preprocessing"):
        suites.user_suite(data_dir, _source(pairs, tmp_path / "tfds", fraction=0.5))
    # Refused before they were prepared: TFDS's folder holds the data folder's pairs alone.
    assert [p.name for p in (tmp_path / "tfds" / "user_image_text").iterdir()] == [
        "pairs_32px_val0p25_" + _source(pairs, tmp_path / "tfds").identity().split("_")[-1]
        .split("/")[0]]
    with pytest.raises(MissingInputError, match="holds no plan.json"):
        suites.user_suite(str(tmp_path), _source(pairs, tmp_path / "tfds"))


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "user_suite.split='test'"),
    ({"tasks": ("vqa",)}, "user_suite.tasks=.*no questions or edits"),
    ({"max_images": 1}, "user_suite.max_images=1"),
    ({"tasks": []}, "user_suite.tasks=\\[\\]: give a list"),
])
def test_settings_that_cannot_work_are_refused_before_any_read(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        suites.user_suite("unused", None, **kwargs)


@pytest.mark.parametrize("record_id, image", [
    ("im1.png#0badcafe", "im1.png"),             # a JSONL record: image name, caption hash
    ("a#b/im1.png#0badcafe", "a#b/im1.png"),
    ("photos/x#0badcafe.png", "photos/x#0badcafe.png"),  # a folder's: a path, as it is
])
def test_the_records_of_an_image_name_it(record_id, image):
    assert user_data.image_of(record_id) == image


def test_pairs_changed_since_preprocessing_are_refused(pairs, tmp_path):
    """Prepared again after an edit (as the builder asks), they hold another split."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in pairs.parent.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data_dir = str(_data_dir(tmp_path, _source(copy / "pairs.jsonl", tmp_path / "tfds")))
    with (copy / "pairs.jsonl").open("a") as f:
        f.write(json.dumps({"image": "im0.png", "text": "one caption more"}) + "\n")
    changed = r"the pairs changed since the data folder .* was preprocessed from them"
    # Told so, not asked to prepare them again (preparing cannot help: it once asked).
    with pytest.raises(UserInputError, match=changed + r".*preprocess them again into a new"):
        suites.user_suite(data_dir, _source(copy / "pairs.jsonl", tmp_path / "tfds"))
    again = preprocess.TfdsSource(lambda prepare=True: user_data_builder(
        str(copy / "pairs.jsonl"), 32, str(tmp_path / "tfds"), validation_fraction=0.25,
        overwrite=True, prepare=prepare))
    assert again.fingerprint() != _source(pairs, tmp_path / "tfds").fingerprint()  # Prepared.
    with pytest.raises(UserInputError, match=changed):  # Prepared again: still not theirs.
        suites.user_suite(data_dir, again)


def test_the_other_images_are_read_no_further_than_they_lie():
    """The chance row needs as many train images as held-out ones, not the whole split."""
    class Source:
        read_count = 0

        def num_examples(self, split):
            return 1000

        def read(self, split, start, stop):
            for i in range(start, stop):
                Source.read_count += 1
                yield preprocess.RawPair(f"im{i}.png#0badcafe", np.zeros((8, 8, 3), np.uint8),
                                         [b"a caption"])

    images = suites._user_images(Source(), "train", 3, 8, captions=False)[0]  # noqa: SLF001
    assert len(images) == 3 and Source.read_count == 4


def test_the_eval_preflight_leaves_the_user_suite_to_the_run(eval_files, tmp_path,
                                                                monkeypatch):
    """The user's source is listed once per eval: by the run, not also by its preflight."""
    from cm3leon_jax.evaluation import eval_run
    checked = []
    monkeypatch.setattr(suites, "check_user_source", lambda *args: checked.append(args))
    gin.clear_config()
    try:
        gin.parse_config("\n".join([
            "import cm3leon_jax.evaluation.suites",
            f"evaluate.checkpoint = {eval_files['checkpoint']!r}",
            f"evaluate.vocab_dir = {eval_files['vocab']!r}",
            "evaluate.suite = @user_suite()",
            "user_suite.data_dir = 'my_data'",
            "user_suite.source = None"]))
        eval_run.evaluate.preflight(str(tmp_path / "eval"))
        assert checked == []
        gin.get_bindings(eval_run.evaluate)  # What calling the run resolves: the check.
        assert checked == [("my_data", None)]
    finally:
        gin.clear_config()
