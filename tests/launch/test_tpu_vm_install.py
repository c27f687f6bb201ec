"""launch.tpu_vm on the workers: the install line, run by bash against stand-ins for the TPU
image's Python (3.10, with pip) and for uv; and which existing queued resources it reuses.

setup.py needs Python >= 3.11 and the TPU images (Ubuntu 22.04) have 3.10, so a venv made
with the image's python3 cannot install the package: the line makes a 3.11 venv with uv.
"""

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from launch import common, tpu_vm

UV = "uv==0.13.9"  # tools/install.py's

# One script stands for every interpreter: its folder's `version` file says which Python it
# is. It logs each call to $HOME/calls; `-m pip install` (of uv), `-m uv venv` and `-m venv`
# do what they would (pip in a 3.10 venv refuses the package, as pip does for >= 3.11).
FAKE_PYTHON = """#!{python}
import os, shutil, sys
home, here = os.environ["HOME"], os.path.dirname(os.path.abspath(__file__))
version = open(os.path.join(here, "version")).read().strip()
args = sys.argv[1:]
with open(os.path.join(home, "calls"), "a") as f:
    f.write(" ".join(["python" + version, *args]) + "\\n")

def interpreter(folder, version):
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.abspath(__file__), os.path.join(folder, "python"))
    with open(os.path.join(folder, "version"), "w") as f:
        f.write(version)

if args[0] == "-c":
    sys.version_info = tuple(int(v) for v in version.split(".")) + (12, "final", 0)
    exec(args[1])
elif args[:2] == ["-m", "pip"]:
    if os.environ.get("FAKE_NO_PIP"):
        sys.exit(f"{{sys.argv[0]}}: No module named pip")
    open(os.path.join(home, "uv_installed"), "w").close()
elif args[:2] == ["-m", "venv"]:
    interpreter(os.path.join(args[-1], "bin"), version)
    with open(os.path.join(args[-1], "bin", "pip"), "w") as f:
        f.write("#!/bin/sh\\necho \\"ERROR: Package 'cm3leon-jax' requires a different "
                "Python: " + version + ".12 not in '>=3.11'\\" >&2; exit 1\\n")
    os.chmod(os.path.join(args[-1], "bin", "pip"), 0o755)
elif args[:2] == ["-m", "uv"]:
    if not os.path.exists(os.path.join(home, "uv_installed")):
        sys.exit(f"{{sys.argv[0]}}: No module named uv")
    if args[2] == "venv":
        interpreter(os.path.join(args[-1], "bin"), args[args.index("--python") + 1])
"""


@pytest.fixture
def worker(tmp_path):
    """A TPU worker's home: the source tarball, and python3 (3.10) first on PATH."""
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    src = tmp_path / "setup.py"
    src.write_text("# the package\n")
    with tarfile.open(home / tpu_vm.ARCHIVE, "w:gz") as tar:
        tar.add(src, arcname="setup.py")
    python3 = home / "bin" / "python3"
    python3.write_text(FAKE_PYTHON.format(python=sys.executable))
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    (home / "bin" / "version").write_text("3.10")
    return home


def run_install(home, **env) -> subprocess.CompletedProcess:
    (home / "calls").unlink(missing_ok=True)
    return subprocess.run(["bash", "-c", tpu_vm.install_command("python3")], capture_output=True,
                          text=True, timeout=60, env={
                              **os.environ, "HOME": str(home),
                              "PATH": f"{home / 'bin'}:{os.environ['PATH']}", **env})


def calls(home) -> list[str]:
    return (home / "calls").read_text().splitlines()


def venv_version(home) -> str:
    return (home / "cm3leon_jax" / ".venv" / "bin" / "version").read_text()


def test_install_makes_a_python_311_venv_on_an_image_with_python_310(worker):
    proc = run_install(worker)
    assert proc.returncode == 0, proc.stderr
    assert calls(worker) == [
        "python3.10 -m uv --version",
        f"python3.10 -m pip install -q --user {UV}",
        "python3.10 -m uv venv -q --python 3.11 .venv",
        "python3.10 -m uv pip install -q --python .venv/bin/python -e .[tpu]"]
    assert venv_version(worker) == "3.11"
    assert (worker / "cm3leon_jax" / "setup.py").exists()
    assert f'UV = "{UV}"' in open(os.path.join(common.REPO, "tools", "install.py")).read()

    # Launched again: uv, the 3.11 venv and the last run's log are kept; a file the
    # launched checkout no longer has is gone (every host runs exactly the code launched).
    (worker / "cm3leon_jax" / "deleted_since.py").write_text("old code\n")
    (worker / "cm3leon_jax" / "run.log").write_text("the last run\n")
    assert run_install(worker).returncode == 0
    assert not (worker / "cm3leon_jax" / "deleted_since.py").exists()
    assert (worker / "cm3leon_jax" / "run.log").read_text() == "the last run\n"
    assert (worker / "cm3leon_jax" / "setup.py").exists()
    assert calls(worker) == [
        "python3.10 -m uv --version",
        "python3.11 -c import sys; print(\"%d.%d\" % sys.version_info[:2])",
        "python3.10 -m uv pip install -q --python .venv/bin/python -e .[tpu]"]


def test_a_venv_of_the_image_python_is_made_again(worker):
    venv = worker / "cm3leon_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (venv / "python").chmod(0o755)
    (venv / "version").write_text("3.10")
    assert run_install(worker).returncode == 0
    assert "python3.10 -m uv venv -q --python 3.11 .venv" in calls(worker)
    assert venv_version(worker) == "3.11"


def test_an_image_without_pip_stops_with_one_clear_line(worker):
    proc = run_install(worker, FAKE_NO_PIP="1")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: python3 -m pip could not install {UV} on this TPU VM; give "
        "--python=<a Python 3 with pip> (uv makes the Python 3.11 venv)")
    assert not (worker / "cm3leon_jax" / ".venv").exists()


GIN = "gin_configs/train/cm3leon_7b.gin"
ARGS = [GIN, "gs://b/7b", "--name=c7b", "--accelerator_type=v5litepod-64", "--zone=z",
        "--project=p", "--gin.data_dirs.user='gs://b/data'"]
V5E = "v2-alpha-tpuv5-lite"


def described(accelerator="v5litepod-64", runtime=V5E, **tier) -> str:
    """`queued-resources describe --format=json` of an ACTIVE queued resource, as gcloud
    prints it: --spot is the `spot` tier, --reserved a reservation name (v2 API)."""
    return json.dumps({"name": "projects/p/locations/z/queuedResources/c7b",
                       "state": {"state": "ACTIVE"}, **tier,
                       "tpu": {"nodeSpec": [{"nodeId": "c7b", "node": {
                           "acceleratorType": accelerator, "runtimeVersion": runtime}}]}})


SPOT = {"spot": {}}
RESERVED = {"reservationName": "projects/p/locations/z/reservations/-"}


def launch_against(monkeypatch, description: str, *flags: str) -> list[list[str]]:
    """Runs tpu_vm.launch where gcloud describes the queued resource so; returns the gcloud
    commands it ran (none: refused)."""
    def query(self, argv):
        if "--format=json" in argv:
            return description
        return "ACTIVE" if "--format=value(state.state)" in argv else None
    ran = []
    monkeypatch.setattr(common.Runner, "query", query)
    monkeypatch.setattr(common.Runner, "run", lambda self, argv, cwd=None: ran.append(argv))
    with contextlib.redirect_stdout(io.StringIO()):
        tpu_vm.launch([*ARGS, *flags, "--skip_install"])
    return ran


@pytest.mark.parametrize("tier,flags,message", [
    ({}, ["--spot"], "has on-demand capacity (neither --spot nor --reserved), not spot "
                     "capacity (--spot)"),
    (SPOT, [], "has spot capacity (--spot), not on-demand capacity (neither --spot nor "
               "--reserved)"),
    (SPOT, ["--reserved"], "has spot capacity (--spot), not reserved capacity (--reserved)"),
    (RESERVED, ["--spot"], "has reserved capacity (--reserved), not spot capacity (--spot)"),
], ids=["on-demand-for-spot", "spot-for-on-demand", "spot-for-reserved", "reserved-for-spot"])
def test_reusing_a_queued_resource_of_other_capacity_is_refused(monkeypatch, tier, flags,
                                                                message):
    with pytest.raises(common.LaunchError, match=r"queued resource 'c7b' .*") as error:
        launch_against(monkeypatch, described(**tier), *flags)
    assert message in str(error.value) and "choose another --name" in str(error.value)


def test_reusing_a_queued_resource_of_another_image_is_refused(monkeypatch):
    with pytest.raises(common.LaunchError) as error:
        launch_against(monkeypatch, described(runtime="tpu-ubuntu2204-base"))
    assert str(error.value).startswith(
        f"queued resource 'c7b' runs the image tpu-ubuntu2204-base, not --runtime_version={V5E}")
    # Every difference is named at once.
    with pytest.raises(common.LaunchError) as error:
        launch_against(monkeypatch, described(accelerator="v5litepod-16", runtime="x"), "--spot")
    assert "holds a v5litepod-16 slice" in str(error.value)
    assert "; it runs the image x" in str(error.value)
    assert "; it has on-demand capacity" in str(error.value)


@pytest.mark.parametrize("tier,flags", [({}, []), (SPOT, ["--spot"]),
                                        (RESERVED, ["--reserved"]),
                                        ({"guaranteed": {"reserved": True}}, ["--reserved"])],
                         ids=["on-demand", "spot", "reserved", "reserved-alpha-api"])
def test_a_queued_resource_that_matches_is_reused(monkeypatch, tier, flags):
    ran = launch_against(monkeypatch, described(**tier), *flags)
    assert not any("create" in argv for argv in ran)
    assert [argv[3:5] for argv in ran] == [["tpu-vm", "ssh"]]


def test_a_queued_resource_of_another_image_is_reused_when_asked_for(monkeypatch):
    ran = launch_against(monkeypatch, described(runtime="tpu-ubuntu2204-base"),
                         "--runtime_version=tpu-ubuntu2204-base")
    assert [argv[3:5] for argv in ran] == [["tpu-vm", "ssh"]]
