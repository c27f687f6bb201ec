"""The gin entry point: modes, includes, required values and one-line errors."""

import os
import subprocess
import sys
import textwrap

import pytest

from cm3leon_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def gin_dir(tmp_path):
    (tmp_path / "base.gin").write_text(textwrap.dedent("""\
        MODEL_DIR = %gin.REQUIRED
        run.model_dir = %MODEL_DIR
        """))
    (tmp_path / "echo.gin").write_text(textwrap.dedent("""\
        include 'base.gin'
        import cm3leon_jax.testing.echo_mode
        run.mode = @echo_mode
        echo_mode.message = %gin.REQUIRED
        """))
    return tmp_path


def _main(gin_dir, *args):
    """Runs the entry point in a subprocess, as a user would, from gin_dir."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "cm3leon_jax.main", *args], cwd=gin_dir,
        env=env, capture_output=True, text=True, timeout=120)


def test_runs_mode_and_writes_resolved_config(gin_dir):
    out = gin_dir / "out"
    r = _main(gin_dir, "--gin_file=echo.gin", f"--gin.MODEL_DIR='{out}'",
              "--gin.echo_mode.message='hello'")
    assert r.returncode == 0, r.stderr
    assert (out / "echo.txt").read_text() == "hello"
    # gin wraps long values onto a continuation line; compare with the wrapping undone.
    config = " ".join((out / "config.gin").read_text().replace("\\\n", " ").split())
    assert f"MODEL_DIR = '{out}'" in config and "echo_mode.message = 'hello'" in config


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin_file=missing.gin"], "gin file not found: 'missing.gin'"),
        (
            ["--gin_file=echo.gin", "--gin.echo_mode.message='x'"],
            "MODEL_DIR/macro.value set to `%gin.REQUIRED`",
        ),
        (
            ["--gin_file=echo.gin", "--gin.MODEL_DIR='o'"],
            "echo_mode.message set to `%gin.REQUIRED` but not subsequently overridden",
        ),
        (
            ["--gin_file=echo.gin", "--gin.MODEL_DIR='o'", "--gin.nosuch.x=1"],
            "No configurable matching 'nosuch'",
        ),
        (
            ["--gin_file=echo.gin", "--gin.MODEL_DIR='o'", "--gin.echo_mode.volume=1"],
            "Configurable 'echo_mode' doesn't have a parameter named 'volume'",
        ),
        (  # A macro's name mistyped: gin takes it, and the run went on without it.
            ["--gin_file=echo.gin", "--gin.MODEL_DIR='o'", "--gin.echo_mode.message='x'",
             "--gin.MODEL_DRI='p'"],
            "--gin.MODEL_DRI=... sets a macro that no binding of these gin files reads "
            "(%MODEL_DRI): a typo? The macros they read: MODEL_DIR.",
        ),
        (["--gin_file=bad_include.gin"], "Unable to open file: nope.gin"),
        (["--gin_file=unbound.gin"], "Required bindings for `run` not provided in config"),
    ],
)
def test_config_mistakes_are_one_line_errors(gin_dir, args, message):
    (gin_dir / "bad_include.gin").write_text("include 'nope.gin'\n")
    (gin_dir / "unbound.gin").write_text(
        "import cm3leon_jax.testing.echo_mode\nrun.mode = @echo_mode\n")
    r = _main(gin_dir, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_a_folder_another_run_mode_wrote_is_refused(gin_dir):
    """build_retrieval's and serve_retrieval's documented MODEL_DIR was the demo's folder:
    each replaced the demo's config.gin (which later runs read its settings from)."""
    out = gin_dir / "demo"
    out.mkdir()
    theirs = "MODEL_DIR = 'demo'\nrun.mode = @demo\nrun.model_dir = %MODEL_DIR\n"
    (out / "config.gin").write_text(theirs)
    r = _main(gin_dir, "--gin_file=echo.gin", f"--gin.MODEL_DIR='{out}'",
              "--gin.echo_mode.message='hello'")
    assert r.returncode == 2
    assert "holds a 'demo' run (its config.gin: run.mode = @demo)" in r.stderr, r.stderr
    assert (out / "config.gin").read_text() == theirs and not (out / "echo.txt").exists()
    (out / "config.gin").write_text(theirs.replace("@demo", "@echo_mode"))  # Its own: rerun.
    r = _main(gin_dir, "--gin_file=echo.gin", f"--gin.MODEL_DIR='{out}'",
              "--gin.echo_mode.message='hello'")
    assert r.returncode == 0, r.stderr


def test_a_bad_host_memory_setting_is_one_line(gin_dir):
    r = subprocess.run([sys.executable, "-m", "cm3leon_jax.main", "--gin_file=echo.gin"],
                       cwd=gin_dir, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, CM3LEON_JAX_HOST_MEMORY="on"))
    assert r.returncode == 2 and r.stderr.startswith("error: $CM3LEON_JAX_HOST_MEMORY='on'")


def test_every_shipped_run_config_parses():
    """Each gin file under gin_configs/runs parses (modules import, names exist).

    Values a run leaves %gin.REQUIRED (step counts, data folders) are the user's
    to give, so the config is not finalized here.
    """
    import gin
    runs = os.path.join(ROOT, "gin_configs", "runs")
    files = sorted(f for f in os.listdir(runs) if f.endswith(".gin"))
    assert "demo.gin" in files
    for f in files:
        gin.clear_config()
        main_lib.configure([os.path.join(runs, f)], ["MODEL_DIR='/tmp/unused'"],
                           finalize=False)
        assert callable(gin.query_parameter("run.mode").scoped_configurable_fn)
    gin.clear_config()
