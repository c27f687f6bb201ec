"""The suite's run-first list names files that exist (a renamed file would silently lose
its place at the front, and the suite its balance)."""

import os

from tests.conftest import RUN_FIRST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_run_first_file_exists():
    missing = [path for path in RUN_FIRST if not os.path.isfile(os.path.join(ROOT, path))]
    assert not missing, f"tests/conftest.py RUN_FIRST names missing files: {missing}"
