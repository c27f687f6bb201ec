"""launch.dataflow needs Beam's Dataflow runner (apache-beam[gcp], the `dataflow` extra),
which `make install` leaves out: without it the launch stops before the driver does any
work (it trained the vocabulary, then died at the first submission)."""

import ast
import os
import sys
import types

import pytest

from launch import common, dataflow

# What Beam's DataflowRunner imports to submit a job; it fails without apache-beam[gcp].
APICLIENT = "apache_beam.runners.dataflow.internal.apiclient"
ARGS = ["gin_configs/runs/preprocess.gin", "gs://b/data", "--project=p", "--region=r",
        "--temp_location=gs://b/tmp"]


@pytest.fixture
def driver_runs(monkeypatch) -> list:
    """The commands the launch runs (none is started)."""
    ran = []
    monkeypatch.setattr(common.subprocess, "call", lambda argv, cwd=None: ran.append(argv) or 0)
    return ran


def test_without_the_dataflow_runner_the_driver_never_starts(monkeypatch, driver_runs, capsys):
    monkeypatch.setitem(sys.modules, APICLIENT, None)  # import fails
    assert common.run_main(dataflow.launch, ARGS) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Beam's Dataflow runner is not installed here (")
    assert "install the dataflow extra, pip install -e '.[dataflow]'" in err
    assert len(err.splitlines()) == 1
    assert driver_runs == []


def test_with_the_dataflow_runner_the_driver_starts(monkeypatch, driver_runs, capsys):
    monkeypatch.setitem(sys.modules, APICLIENT, types.ModuleType("apiclient"))
    assert dataflow.launch(ARGS) == 0
    (argv,) = driver_runs
    assert argv[1:3] == ["-m", "cm3leon_jax.main"]


def test_the_extra_the_error_names_installs_beams_gcp_runner():
    tree = ast.parse(open(os.path.join(common.REPO, "setup.py")).read())
    (extras,) = [ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "EXTRAS_REQUIRE"]
    (beam,) = [r for r in extras["dataflow"] if r.startswith("apache-beam[")]
    assert "gcp" in beam.split("[")[1].rstrip("]").split(",")
    assert "gcp" not in extras["beam"][0]  # `make install`'s extras stay without it
