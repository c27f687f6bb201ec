"""The Makefile's demo targets refuse what they cannot do safely (no install is run here:
`make -n` prints the recipe; clean-demo's guard runs before its `rm`)."""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60)


def test_demo_refuses_a_quote_in_demo_dir():
    """DEMO_DIR goes into a gin string literal, which a quote would end (gin's error was
    "Expected newline")."""
    for bad in ("runs/it's", 'runs/say"hi"'):
        got = _make("-n", "demo", f"DEMO_DIR={bad}")
        assert got.returncode == 2 and "holds a quote" in got.stderr, got.stderr
    got = _make("-n", "demo", "DEMO_DIR=runs/my demo")
    assert got.returncode == 0 and "--gin.MODEL_DIR=\"'runs/my demo'\"" in got.stdout


def test_clean_demo_deletes_only_a_demo_folder(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    got = _make("clean-demo", f"DEMO_DIR={notes}")
    assert got.returncode != 0 and "holds no demo run" in got.stderr
    assert (notes / "keep.txt").read_text() == "mine"
    (tmp_path / "demo" / "stages").mkdir(parents=True)
    assert _make("clean-demo", f"DEMO_DIR={tmp_path / 'demo'}").returncode == 0
    assert not (tmp_path / "demo").exists()
