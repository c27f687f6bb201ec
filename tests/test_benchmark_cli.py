"""How every benchmark script runs as a command (`benchmarks/reporting.py`)."""

import pathlib
import re

import pytest

from benchmarks import reporting
from cm3leon_jax.errors import UserInputError

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_a_mistake_in_a_benchmarks_input_is_one_error_line_and_status_2(capsys):
    def refuse():
        raise UserInputError("no shards for split 'train' in 'runs/nope'; run preprocess")

    with pytest.raises(SystemExit) as stopped:
        reporting.cli(refuse)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("error: no shards for split 'train' in 'runs/nope'; run "
                                       "preprocess\n")
    with pytest.raises(SystemExit) as stopped:
        reporting.cli(lambda: 3)  # A script's own exit status.
    assert stopped.value.code == 3
    reporting.cli(lambda: {"result": 1})  # What most mains return: not an exit status.
    with pytest.raises(KeyError):  # Anything else keeps its traceback.
        reporting.cli(lambda: {}["x"])


def test_every_script_runs_through_cli():
    scripts = [p for p in BENCHMARKS.glob("*.py") if p.name != "reporting.py"]
    assert len(scripts) > 15
    for script in scripts:
        main_block = script.read_text().split('if __name__ == "__main__":')[-1]
        assert re.search(r"reporting\.cli\(main\)", main_block), script.name


def test_a_host_without_libtpu_is_told_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def missing(**_):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(UserInputError, match=r"needs libtpu .*pip install 'jax\[tpu\]"):
        reporting.tpu_topology("v5p:2x2x1")

    def other(**_):
        raise RuntimeError("unknown topology")

    monkeypatch.setattr(topologies, "get_topology_desc", other)
    with pytest.raises(RuntimeError, match="unknown topology"):
        reporting.tpu_topology("v5p:9x9x9")
