"""The demo's folder and its stages: what a killed export leaves is the demo's own, a failing
stage is named, `make clean-demo` keeps what is not the demo's, and a moved folder reports
paths inside itself."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cm3leon_jax.demo import run as demo
from cm3leon_jax.demo import stages as demo_stages
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_what_a_killed_stage_leaves_beside_its_folder_is_the_demos_own(tmp_path):
    """A hard kill during the export stage left export.tmp-* (staging) or export.old-*, and
    every later demo run, start_over too, was refused: "holds what a demo does not write"."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "export.tmp-1a2b3c4d" / "params").mkdir(parents=True)
    (tmp_path / "export.old-5e6f7a8b").mkdir()
    (tmp_path / "metrics.json.tmp-0badc0de").write_text("{")
    (tmp_path / "config.gin").write_text("x = 1")
    (tmp_path / "config.gin.tmp-deadbeef").write_text("x = ")
    (tmp_path / "exports.tmp-1a2b3c4d").mkdir()  # Not a name the demo writes.
    assert demo_stages.foreign_entries(str(tmp_path)) == ["exports.tmp-1a2b3c4d"]
    with pytest.raises(UserInputError, match=r"\(exports.tmp-1a2b3c4d\)"):
        demo._preflight(str(tmp_path))
    os.rmdir(tmp_path / "exports.tmp-1a2b3c4d")
    demo._preflight(str(tmp_path))
    demo_stages.clear(str(tmp_path))  # What start_over does.
    assert sorted(os.listdir(tmp_path)) == ["config.gin"]


def test_a_folder_that_no_demo_made_is_not_taken_for_one(tmp_path):
    """Without stages/ (made before a demo's first stage) a data/ or eval/ is the user's:
    start_over would have deleted it. A backup named like a cut-short write is the user's
    too: only the names the code writes (.tmp-<8 hex>, .old-<8 hex>) are the demo's."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("mine")
    (tmp_path / "config.gin").write_text("x = 1")
    with pytest.raises(UserInputError, match=r"holds what a demo does not write \(data\)"):
        demo._preflight(str(tmp_path))
    (tmp_path / "data" / "labels.csv").unlink()
    (tmp_path / "data").rmdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pretrain.old-before-start-over").mkdir()
    assert demo_stages.foreign_entries(str(tmp_path)) == ["pretrain.old-before-start-over"]


def test_a_failing_stage_is_named_in_its_line_and_in_its_error(tmp_path):
    lines = []
    runner = demo_stages.StageRunner(str(tmp_path), ["a", "b"], "config", lines.append)

    def refuse():
        raise UserInputError("retriever pairs 'x' are empty; give some")

    with pytest.raises(UserInputError) as raised:
        runner.run("b", refuse)
    assert type(raised.value) is UserInputError  # main prints one error: line, exits 2
    assert str(raised.value) == "the demo's b stage: retriever pairs 'x' are empty; give some"
    assert lines == ["[demo 2/2 ##] b ...", "[demo 2/2 ##] b: failed: retriever pairs 'x' are "
                     "empty; give some"]
    assert runner.cached("b") is None

    def mismatch():
        raise ModelDirMismatchError("built by another config")

    def crash():
        raise RuntimeError("first line\nsecond line")

    with pytest.raises(ModelDirMismatchError, match="^the demo's a stage: built by another"):
        runner.run("a", mismatch)  # main.run puts config.gin back for this kind
    with pytest.raises(RuntimeError, match="^first line\nsecond line") as raised:
        runner.run_together([("b", lambda: {"b": 1}, None), ("a", crash, None)])
    assert str(raised.value) == "first line\nsecond line"  # The error as raised, noted:
    assert raised.value.__notes__ == ["(in the demo's a stage)"]
    assert "[demo 1/2 #-] a: failed: first line" in lines  # b's line may come after it
    assert runner.cached("b") == {"b": 1}


def test_clean_demo_deletes_the_demos_own_entries_and_keeps_the_rest(tmp_path, capsys):
    """It ran rm -rf on the whole folder, the user's files in it too, where the README said
    it deletes the demo's own folders only. (tests/test_makefile.py runs the target on a
    folder it deletes whole; `make -n` shows here that the recipe calls this `clean`.)"""
    folder = tmp_path / "demo"
    (folder / "stages").mkdir(parents=True)
    recipe = subprocess.run(["make", "--no-print-directory", "-n", "clean-demo",
                             f"DEMO_DIR={folder}"], cwd=REPO, text=True, capture_output=True,
                            timeout=60)
    assert recipe.returncode == 0, recipe.stderr
    assert "stages.clean(sys.argv[1])' \"" + str(folder) + "\"" in recipe.stdout
    assert "rm -rf" not in recipe.stdout
    (folder / "pretrain" / "checkpoints").mkdir(parents=True)
    (folder / "export.tmp-1a2b3c4d").mkdir()
    (folder / "metrics.json").write_text("{}")
    (folder / "config.gin").write_text("x = 1")
    (folder / "config.1.gin").write_text("x = 0")
    (folder / "notes.txt").write_text("mine")
    demo_stages.clean(str(folder))
    assert os.listdir(folder) == ["notes.txt"] and "kept notes.txt" in capsys.readouterr().out
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    (folder / "stages").mkdir()
    demo_stages.clean(str(folder))
    assert not folder.exists() and f"deleted {folder}" in capsys.readouterr().out


def _fake_demo(runner: demo_stages.StageRunner, model_dir: str) -> None:
    """Stages that return paths inside MODEL_DIR, as the demo's do (as given and absolute)."""
    runner.run("export", lambda: {"dir": os.path.join(model_dir, "export"), "dtype": "bfloat16",
                                  "elsewhere": "/data/vocab"})
    runner.run("evaluate", lambda: {"sft": {"report": os.path.join(model_dir, "eval", "sft",
                                                                   "report.md")},
                                    "encoders": [os.path.abspath(os.path.join(model_dir, "r"))]})
    runner.run("pictures", lambda: {"contact_sheet": os.path.join(model_dir, "pictures",
                                                                  "contact_sheet.png")})


def _paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return [value] if isinstance(value, str) and "/" in value else []


def test_a_moved_demo_reports_paths_inside_its_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = ["export", "evaluate", "pictures"]
    old = os.path.join("runs", "demo")
    _fake_demo(demo_stages.StageRunner(old, names, "config", lambda line: None), old)
    legacy = json.loads((tmp_path / old / "stages" / "pictures.json").read_text())
    os.rename(old, "demo2")
    # Stored before results recorded their MODEL_DIR: re-rooted from its config.gin's.
    legacy.pop("model_dir", None)
    (tmp_path / "demo2" / "stages" / "pictures.json").write_text(json.dumps(legacy))
    (tmp_path / "demo2" / "config.1.gin").write_text(f"MODEL_DIR = {old!r}\nx = 1\n")
    moved = str(tmp_path / "demo2")

    def not_again():
        raise AssertionError("a stage ran again")

    runner = demo_stages.StageRunner(moved, names, "config", lambda line: None)
    for name in names:
        runner.run(name, not_again)
    assert runner.reused == names
    metrics = demo._report(moved, runner, [])
    assert "/data/vocab" in _paths(metrics["export"])
    inside = [p for name in names for p in _paths(metrics[name]) if p != "/data/vocab"]
    assert len(inside) == 4 and all(p.startswith(moved + "/") for p in inside), inside
    assert metrics["export"]["dir"] == os.path.join(moved, "export")
    on_disk = json.loads((tmp_path / "demo2" / "metrics.json").read_text())
    assert on_disk["pictures"]["contact_sheet"] == os.path.join(moved, "pictures",
                                                                "contact_sheet.png")
    assert f"contact sheet: {moved}/pictures/contact_sheet.png" in capsys.readouterr().out
    # Not moved: the paths stay as they were given.
    again = demo_stages.StageRunner("demo2", names, "config", lambda line: None)
    _fake_demo(again, "demo2")
    assert again.results["export"]["dir"] == os.path.join("demo2", "export")
