"""An eval run into a MODEL_DIR with an earlier run's eval/: refused before config.gin is
touched; with overwrite, the earlier results go only just before decoding. Settings that a
job would fail on hours in are refused before the restore."""

import json
import os
from types import SimpleNamespace

import gin
import pytest

from cm3leon_jax import main as main_lib
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import eval_run, suites
from cm3leon_jax.evaluation.grading import Strategy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _earlier_run(model_dir):
    """What an earlier eval run leaves: its config.gin and its eval/."""
    (model_dir / "eval").mkdir(parents=True)
    (model_dir / "eval" / "report.json").write_text('{"rows": []}')
    (model_dir / "config.gin").write_text("run.mode = @evaluate\nevaluate.seed = 7\n")


def _main(args, monkeypatch) -> int:
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    try:
        return main_lib.main(args)
    finally:
        gin.clear_config()


def test_a_second_run_is_refused_before_config_gin_and_overwrite_keeps_results_on_failure(
        eval_files, tmp_path, capfd, monkeypatch):
    out = tmp_path / "run"
    _earlier_run(out)
    before = {p.name: p.read_bytes() for p in (out / "config.gin", out / "eval" / "report.json")}
    args = ["--gin_file=gin_configs/runs/eval.gin", f"--gin.MODEL_DIR='{out}'",
            f"--gin.evaluate.checkpoint='{eval_files['checkpoint']}'",
            f"--gin.evaluate.vocab_dir='{eval_files['vocab']}'",
            f"--gin.evaluate.clip_encoder_dir='{eval_files['clip']}'",
            "--gin.evaluate.retrieval_dir=None", "--gin.evaluate.num_retrieved=[0]"]
    assert _main(args, monkeypatch) == 2
    assert "earlier run's eval/" in capfd.readouterr().err
    assert sorted(os.listdir(out)) == ["config.gin", "eval"]  # No config.1.gin either.
    assert (out / "config.gin").read_bytes() == before["config.gin"]

    # overwrite=True and a step that is not there: the run fails, the earlier eval/ stays.
    assert _main(args + ["--gin.evaluate.overwrite=True", "--gin.evaluate.step=99"],
                 monkeypatch) == 2
    assert "no checkpoint at step 99" in capfd.readouterr().err
    assert (out / "eval" / "report.json").read_bytes() == before["report.json"]


def test_overwrite_removes_the_earlier_eval_just_before_decoding(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    gen = SimpleNamespace(image_tokenizer=SimpleNamespace(image_size=32))

    def broken(size):
        raise FileNotFoundError("no COCO file")

    with pytest.raises(FileNotFoundError):
        eval_run.evaluate_generator(gen, str(out), suite=broken, caption_metrics=(),
                                    overwrite=True)
    assert (out / "stale.png").exists()  # The suite failed: nothing removed.
    seen = []

    def decode(ctx, suite, out_dir, *args, **kwargs):  # What run_suite finds, and no rows.
        seen.append(sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else [])
        os.makedirs(out_dir, exist_ok=True)
        return []

    monkeypatch.setattr(eval_run, "run_suite", decode)
    eval_run.evaluate_generator(gen, str(out), suite=lambda size: suites.Suite("empty"),
                                caption_metrics=(), overwrite=True)
    assert seen == [[]] and sorted(os.listdir(out)) == ["report.json", "report.md"]


@pytest.fixture
def no_restore(monkeypatch):
    """The restore and what follows it, standing in for a checkpoint; `reached` says how far
    `evaluate` got."""
    reached = []

    def mark(what, value=None):
        def stand_in(*args, **kwargs):
            reached.append(what)
            return value
        return stand_in

    monkeypatch.setattr(eval_run.restore, "restore_decoder", mark("restore", (None, None, 1)))
    monkeypatch.setattr(eval_run.Retriever, "open",
                        mark("retriever", SimpleNamespace(encoder=None)))
    monkeypatch.setattr(eval_run, "MultimodalVocabulary", mark("vocab"))
    monkeypatch.setattr(eval_run, "Generator", mark("generator"))
    monkeypatch.setattr(eval_run, "evaluate_generator", mark("decode"))
    return reached


def _evaluate(**kwargs):
    return eval_run.evaluate("unused", checkpoint="ckpt", vocab_dir="vocab",
                             image_tokenizer=lambda: None, **kwargs)


def test_settings_a_job_would_fail_on_are_refused_before_the_restore(no_restore):
    with pytest.raises(UserInputError, match="evaluate.caption_style='image-first' is unknown; "
                                             "use one of .*'image_first'"):
        _evaluate(caption_style="image-first")
    rerank8 = Strategy("rerank8", num_samples=8)
    with pytest.raises(UserInputError, match=r"evaluate.strategies \['rerank8'\] re-rank .* "
                                             "bind evaluate.clip_encoder_dir"):
        _evaluate(strategies=[Strategy(), rerank8])
    assert no_restore == []
    # A retrieval folder that names no encoder: refused once opened, before decoding.
    with pytest.raises(UserInputError, match="re-rank samples by CLIP score"):
        _evaluate(strategies=[rerank8], retrieval_dir="retrieval")
    assert no_restore == ["vocab", "restore", "retriever", "generator"]
    no_restore.clear()
    _evaluate(strategies=[Strategy()], caption_style="image_first")  # Valid: decoded.
    assert no_restore == ["vocab", "restore", "generator", "decode"]


def test_a_vocabulary_other_than_the_recorded_one_is_refused_before_the_restore(
        eval_files, tmp_path, monkeypatch):
    """The checkpoint's record (the trainer's vocabulary.json) names another vocabulary of the
    same size: refused, naming both, before the restore."""
    from cm3leon_jax.train import vocab_record
    from cm3leon_jax.vocab import multimodal

    def no_restore(*args, **kwargs):
        raise AssertionError("restored before refusing")
    monkeypatch.setattr(eval_run.restore, "restore_decoder", no_restore)
    trained = tmp_path / "trained"
    trained.mkdir()
    vocab = multimodal.MultimodalVocabulary(eval_files["vocab"])
    (trained / vocab_record.FILE).write_text(json.dumps(
        {**vocab_record.of(vocab), "fingerprint": "0123456789abcdef"}))
    with pytest.raises(UserInputError, match=r"^evaluate.vocab_dir .* does not fit the model of "
                       r"evaluate.checkpoint .*fingerprint 0123456789abcdef\), not this one "
                       f"\\(fingerprint {vocab.fingerprint}"):
        eval_run.evaluate("unused", checkpoint=str(trained), vocab_dir=eval_files["vocab"],
                          image_tokenizer=lambda: None)


def test_a_mistyped_caption_style_is_refused_before_config_gin(eval_files, tmp_path, capfd,
                                                               monkeypatch):
    """A plain setting the run would refuse is refused before `main.run` writes config.gin
    (a rerun into an earlier run's folder would otherwise have replaced its config.gin)."""
    out = tmp_path / "run"
    args = ["--gin_file=gin_configs/runs/eval.gin", f"--gin.MODEL_DIR='{out}'",
            f"--gin.evaluate.checkpoint='{eval_files['checkpoint']}'",
            f"--gin.evaluate.vocab_dir='{eval_files['vocab']}'",
            "--gin.evaluate.retrieval_dir=None", "--gin.evaluate.num_retrieved=[0]",
            "--gin.evaluate.caption_style='image-first'"]
    assert _main(args, monkeypatch) == 2
    assert "evaluate.caption_style='image-first' is unknown" in capfd.readouterr().err
    assert not out.exists() or os.listdir(out) == []


def test_image_first_captions_of_a_caption_first_model_are_refused(tmp_path, monkeypatch):
    """Data laid out caption first only (preprocess_user.gin's): eval.gin's image-first
    caption prompt is one its model never saw; refused when the suite captions, naming the
    infill; a suite without captioning, or the infill, goes on."""
    data = tmp_path / "data"
    (data / "vocab").mkdir(parents=True)
    (data / "plan.json").write_text(json.dumps({"preprocess.image_first_prob": 0.0}))
    gen = SimpleNamespace(image_tokenizer=SimpleNamespace(image_size=32),
                          vocab=SimpleNamespace(directory=str(data / "vocab")))
    def decode(ctx, suite, out_dir, *args, **kwargs):  # No rows: what is checked is before.
        os.makedirs(out_dir, exist_ok=True)
        return []

    monkeypatch.setattr(eval_run, "run_suite", decode)
    captions = lambda size: suites.Suite("c", captioning=object())  # noqa: E731
    with pytest.raises(UserInputError, match=r"evaluate.caption_style='image_first', and the "
                                             r"data .* Bind evaluate.caption_style='infill'"):
        eval_run.evaluate_generator(gen, str(tmp_path / "a"), suite=captions,
                                    caption_metrics=(), caption_style="image_first")
    eval_run.evaluate_generator(gen, str(tmp_path / "b"), suite=captions, caption_metrics=(),
                                caption_style="infill")
    eval_run.evaluate_generator(gen, str(tmp_path / "c"), suite=lambda size: suites.Suite("t"),
                                caption_metrics=(), caption_style="image_first")
