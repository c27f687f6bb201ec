"""Mistakes in a user's input found while a run mode runs: one line, exit status 2.

Each case goes through the entry point (`main.main`, or a subprocess where the exit
status and the absence of a traceback are the point) with a real run mode and a real
mistake: a missing checkpoint folder, a prompts file that is not UTF-8, an image that
is not an image, a data folder that does not exist. Internal errors keep their traceback.
"""

import os
import re
import subprocess
import sys
import textwrap

import gin
import pytest

from cm3leon_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(ROOT, "gin_configs", "runs", "generate.gin")
TRAIN = os.path.join(ROOT, "gin_configs", "train", "tiny.gin")


def _main(capsys, *argv):
    """(exit status, the `error:` lines on stderr) of main.main(argv), in this process."""
    gin.clear_config()
    try:
        code = main_lib.main(list(argv))
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error: ")]


def _subprocess(cwd, *argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "cm3leon_jax.main", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _generate(tmp_path, *bindings):
    return (f"--gin_file={GENERATE}", f"--gin.MODEL_DIR='{tmp_path / 'out'}'",
            *[f"--gin.{b}" for b in bindings])


def test_a_missing_checkpoint_folder_is_one_line_and_status_2(tmp_path):
    r = _subprocess(tmp_path, *_generate(tmp_path, f"generate.checkpoint='{tmp_path}/nowhere'",
                                         "generate.captions=['a red circle']"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: no checkpoints in '{tmp_path}/nowhere': give the MODEL_DIR of "
                      "a train run (it holds checkpoints/<step>/state)."], r.stderr[-2000:]


def test_an_empty_model_dir_is_named(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, errors = _main(capsys, *_generate(tmp_path, f"generate.checkpoint='{tmp_path}/run'",
                                            "generate.captions=['a red circle']"))
    assert code == 2 and len(errors) == 1
    assert f"'{tmp_path}/run' has no committed checkpoint yet; train first" in errors[0]


@pytest.mark.parametrize("binding, message", [
    ("generate.captions_file='{d}/missing.txt'",
     "generate.captions_file '{d}/missing.txt' does not exist or is not a file"),
    ("generate.captions_file='{d}/latin1.txt'",
     "generate.captions_file '{d}/latin1.txt' is unreadable ('utf-8' codec can't decode"),
    ("generate.image_files=['{d}/missing.png']",
     "generate.image_files: '{d}/missing.png' does not exist"),
    ("generate.image_files=['{d}/not_an_image.png']",
     "generate.image_files: '{d}/not_an_image.png' is not a readable image"),
])
def test_unreadable_prompts_and_images_are_named(tmp_path, capsys, binding, message):
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 on a red square\n".encode("latin-1"))
    (tmp_path / "not_an_image.png").write_text("these are words, not pixels")
    # The inputs are checked before the checkpoint is read: none is needed here.
    code, errors = _main(capsys, *_generate(tmp_path, "generate.checkpoint='/nowhere'",
                                            binding.format(d=tmp_path)))
    assert code == 2 and len(errors) == 1, errors
    assert message.format(d=tmp_path) in errors[0], errors[0]


@pytest.mark.parametrize("folder, message", [
    ("missing", "data_dirs.synthetic = '{d}/missing' does not exist: run the preprocess mode"),
    ("empty", "no layout.json in '{d}/empty/vocab': not a vocabulary directory"),
])
def test_a_missing_or_empty_data_folder_is_named(tmp_path, capsys, folder, message):
    (tmp_path / "empty").mkdir()
    code, errors = _main(capsys, f"--gin_file={TRAIN}", f"--gin.MODEL_DIR='{tmp_path}/run'",
                         f"--gin.data_dirs.synthetic='{tmp_path}/{folder}'")
    assert code == 2 and len(errors) == 1, errors
    assert message.format(d=tmp_path) in errors[0], errors[0]


def test_an_internal_error_keeps_its_traceback(tmp_path):
    (tmp_path / "echo.gin").write_text(textwrap.dedent("""\
        import cm3leon_jax.testing.echo_mode
        run.mode = @echo_mode
        run.model_dir = 'out'
        """))
    # A number where the mode writes text: a bug (TypeError), not a user's input mistake.
    r = _subprocess(tmp_path, "--gin_file=echo.gin", "--gin.echo_mode.message=3")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "TypeError" in r.stderr
    assert not any(line.startswith("error: ") for line in r.stderr.splitlines())


def test_gin_search_path_finds_files_and_their_includes(tmp_path):
    configs = tmp_path / "my_configs"
    configs.mkdir()
    (configs / "base.gin").write_text("run.model_dir = 'out'\n")
    (configs / "echo.gin").write_text(textwrap.dedent("""\
        include 'base.gin'
        import cm3leon_jax.testing.echo_mode
        run.mode = @echo_mode
        echo_mode.message = 'found'
        """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _subprocess(elsewhere, f"--gin_search_path={configs}", "--gin_file=echo.gin")
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "out" / "echo.txt").read_text() == "found"
    r = _subprocess(elsewhere, "--gin_file=echo.gin")
    assert r.returncode == 2 and "--gin_search_path" in r.stderr.strip().splitlines()[-1]


def test_paths_the_user_names_that_do_not_exist_are_input_errors(tmp_path):
    """Each raises MissingInputError (main prints it as one `error:` line, status 2), which
    is still a FileNotFoundError for callers that catch that."""
    from cm3leon_jax.decode import generate_families
    from cm3leon_jax.errors import MissingInputError
    from cm3leon_jax.retrieval.retriever import Retriever
    from cm3leon_jax.train import params_checkpoint
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

    nowhere = str(tmp_path / "nowhere")
    for call in (lambda: Retriever.open(nowhere), lambda: TextTokenizer.load(nowhere),
                 lambda: params_checkpoint.read_manifest(nowhere),
                 lambda: generate_families.read_requests(nowhere)):
        with pytest.raises(MissingInputError, match="nowhere"):
            call()
    assert issubclass(MissingInputError, FileNotFoundError)


def test_a_config_value_that_cannot_work_is_one_line_and_status_2(tmp_path, capsys):
    code, errors = _main(capsys, f"--gin_file={TRAIN}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                         "--gin.DecoderConfig.num_heads=3")
    assert code == 2
    assert errors == ["error: DecoderConfig: d_model=64 is not divisible by num_heads=3; set "
                      "head_dim explicitly."]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unquoted_string_value_names_the_binding_and_the_quotes(tmp_path, capsys):
    """gin said "malformed node or string on line 1: <ast.Name object at 0x...>" or "Unable
    to parse value. (line 4)"."""
    for binding in ("generate.checkpoint=runs/demo/pretrain", "generate.vocab_dir=vocab"):
        code, errors = _main(capsys, *_generate(tmp_path, binding))
        key, value = binding.split("=")
        assert code == 2 and errors == [
            f"error: --gin.{binding}: gin reads values as Python literals and {value} is not "
            f"one; a string needs quotes: --gin.{key}=\"'{value}'\""], errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("binding,message", [
    ("generate_stage.num_retrieved=-1", "generate_stage.num_retrieved=-1: give a whole number"),
    ("generate_stage.rerank_samples=2.5", "generate_stage.rerank_samples=2.5: give a whole"),
    ("generate_stage.split='valid'", "generate_stage.split='valid'; use one of"),
    ("generate_stage.caption_style='first'", "generate_stage.caption_style='first' is unknown"),
    ("evaluate_stage.num_examples=1", "evaluate_stage.num_examples=1: give a whole number >= 2"),
    ("evaluate_stage.tasks=['vqa', 'ocr']", r"corpus_suite.tasks: \['ocr'\] unknown"),
    ("evaluate_stage.caption_metrics=['cider']", r"evaluate_stage.caption_metrics=\['cider'\]")])
def test_the_demos_late_stages_settings_are_refused_before_its_first_stage(
        tmp_path, capsys, binding, message):
    """The generate and evaluate stages come after minutes of training: a setting of theirs
    that cannot work was found only there (num_retrieved=-1 as "SelectionConfig.k=-1")."""
    out = tmp_path / "demo"
    code, errors = _main(capsys, f"--gin_file={os.path.join(ROOT, 'gin_configs/runs/demo.gin')}",
                         f"--gin.MODEL_DIR='{out}'", f"--gin.{binding}")
    assert code == 2 and len(errors) == 1 and re.search(message, errors[0]), errors
    assert not out.exists()  # Refused before anything was written.


def test_a_missing_user_data_folder_names_the_users_preprocess_file():
    """The user's corpus is made by preprocess_user.gin: its missing folder names that file
    (it named the built-in corpus' preprocess.gin)."""
    import gin

    from cm3leon_jax.errors import MissingInputError
    from tasks import pretrain
    gin.clear_config()
    try:
        gin.bind_parameter("data_dirs.user", "/nowhere/my_data")
        with pytest.raises(MissingInputError, match=r"data_dirs.user = '/nowhere/my_data' does "
                                                    r"not exist: run the preprocess mode "
                                                    r"\(gin_configs/runs/preprocess_user.gin\)"):
            pretrain._data_dir("user")  # noqa: SLF001
    finally:
        gin.clear_config()
