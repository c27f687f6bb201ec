"""The cloud launchers' commands, as `--dry_run` prints them (nothing reaches a cloud).

Each test parses the printed lines back the way a shell would and checks that the
host command line inside them is `python -m cm3leon_jax.main` with the run's gin
file, MODEL_DIR and every `--gin.KEY='...'` override unchanged, so quoting survives
every layer (local shell, gcloud's remote shell, xpk's container bash and YAML).
"""

import ast
import contextlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from cm3leon_jax import main as main_lib
from launch import common, dataflow, local, slurm, tpu_vm, xpk

GIN = "gin_configs/train/cm3leon_7b.gin"
DATA = "--gin.data_dirs.user='gs://b/data'"  # What the 7B's task, cm3leon_user, reads.
OVERRIDES = ["--gin.train.task='cm3leon_user'", DATA, "--gin.train.num_steps=10",
             """--gin.Checkpointer.note='it''s "x" $HOME \\n'"""]


def dry_run(module, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.launch([*args, *OVERRIDES, "--dry_run"]) == 0
    return out.getvalue().splitlines()


def bindings(argv: list[str]) -> tuple[list[str], list[str]]:
    """(gin files, bindings) of a `python -m cm3leon_jax.main` argv, as main parses them."""
    i = argv.index("cm3leon_jax.main")
    assert argv[i - 1] == "-m"
    files, binds, _search_paths = main_lib.parse_args(argv[i + 1:])
    return files, binds


def option(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    return value


def expect_bindings(got, model_dir, launcher_bindings):
    files, binds = got
    assert files == [GIN]
    assert binds == [f"MODEL_DIR='{model_dir}'", *launcher_bindings,
                     *(o[len("--gin."):] for o in OVERRIDES)]


def test_tpu_vm_creates_installs_and_runs_on_all_workers():
    lines = dry_run(tpu_vm, GIN, "gs://b/7b", "--name=c7b", "--accelerator_type=v5p-256",
                    "--zone=us-east5-a", "--project=p", "--spot")
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    scope = ["--zone=us-east5-a", "--project=p"]
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "c7b",
                "--format=value(state.state)", *scope]
    assert commands[0] == describe
    assert commands[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "c7b",
                           "--node-id=c7b", "--accelerator-type=v5p-256",
                           "--runtime-version=v2-alpha-tpuv5", *scope, "--spot"]
    assert commands[2] == describe  # waited on until ACTIVE
    scp, install, run = commands[3:]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", scp[5]]
    assert scp[5].endswith(tpu_vm.ARCHIVE) and "--worker=all" in scp
    for ssh in (install, run):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "c7b"]
        assert "--worker=all" in ssh
    assert ".[tpu]" in shlex.split(option(install, "--command"))
    remote = shlex.split(option(run, "--command"))
    assert remote[:3] == ["cd", "~/cm3leon_jax", "&&"]
    assert remote[3] == ".venv/bin/python"
    expect_bindings(bindings(remote), "gs://b/7b", ["initialize.auto=True"])


def fake_gcloud(tmp_path, state: str, accelerator: str = "v5litepod-64") -> dict:
    """PATH with a `gcloud` that logs its arguments and reports the queued resource `state`
    and slice type."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    described = json.dumps({"tpu": {"nodeSpec": [{"node": {"acceleratorType": accelerator}}]}})
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
                      f"case \"$*\" in *format=json*) echo '{described}';; "
                      f'*describe*) echo {state};; esac\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("state", ["ACTIVE", "FAILED"])
def test_tpu_vm_reuses_an_active_queued_resource(tmp_path, monkeypatch, state):
    for k, v in fake_gcloud(tmp_path, state).items():
        monkeypatch.setenv(k, v)
    args = [GIN, "gs://b/7b", "--name=c7b", "--accelerator_type=v5litepod-64", "--zone=z",
            "--project=p", DATA]
    with contextlib.redirect_stdout(io.StringIO()):
        if state == "FAILED":
            with pytest.raises(common.LaunchError, match="c7b.*FAILED.*delete it"):
                tpu_vm.launch(args)
            return
        assert tpu_vm.launch(args) == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not any("create" in c for c in calls)
    assert [c.split()[2:4] for c in calls] == [["queued-resources", "describe"]] * 3 + [
        ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]


def test_tpu_vm_refuses_to_reuse_a_slice_of_another_type(tmp_path, monkeypatch):
    """Reusing a v5litepod-16 for a run sized for 64 chips failed only on the hosts."""
    for k, v in fake_gcloud(tmp_path, "ACTIVE", accelerator="v5litepod-16").items():
        monkeypatch.setenv(k, v)
    args = [GIN, "gs://b/7b", "--name=c7b", "--accelerator_type=v5litepod-64", "--zone=z",
            "--project=p", DATA]
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(common.LaunchError, match="'c7b' holds a v5litepod-16 slice, not "
                                                     "--accelerator_type=v5litepod-64"):
            tpu_vm.launch(args)
    assert not any("tpu-vm" in c for c in (tmp_path / "calls").read_text().splitlines())


def bash_argv(command: str, env: dict[str, str]) -> list[tuple[list[str], str]]:
    """What bash passes to each `python3` of `command` (a printer stands in for python3).

    Returns (argv, "COORDINATOR NUM_PROCESSES PROCESS_ID" as python3 would see them) per call.
    """
    script = ('python3() { printf "%s\\0" "$@"; printf "\\2%s %s %s\\1" '
              '"${CM3LEON_COORDINATOR-}" "${CM3LEON_NUM_PROCESSES-}" "${CM3LEON_PROCESS_ID-}"; }\n'
              + command)
    out = subprocess.run(["bash", "-c", script], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout
    calls = []
    for call in out.split("\1")[:-1]:
        args, seen = call.split("\2")
        calls.append((args.split("\0")[:-1], seen))
    return calls


def test_xpk_tpu_multislice():
    lines = dry_run(xpk, GIN, "gs://b/7b", "--cluster=c", "--workload=c7b",
                    "--device_type=v5p-256", "--num_slices=2", "--max_restarts=3")
    (argv,) = [shlex.split(line) for line in lines]
    assert argv[:3] == ["xpk", "workload", "create"]
    for flag in ("--cluster=c", "--workload=c7b", "--device-type=v5p-256", "--num-slices=2",
                 "--max-restarts=3", "--restart-on-exit-codes=1",
                 "--base-docker-image=python:3.11", f"--script-dir={common.REPO}"):
        assert flag in argv
    (install, _), (run, seen) = bash_argv(option(argv, "--command"), {})
    assert install == ["-m", "pip", "install", "-q", "-e", ".[tpu]"]
    assert seen == "  "  # TPU hosts find each other through jax.distributed's discovery
    # A preempted run exits with xpk's restart status, so --max_restarts resumes it (without
    # restarts it exits 0: saved and stopped).
    assert "CM3LEON_PREEMPTED_EXIT_CODE=42 python3 " in option(argv, "--command")
    (once,) = [shlex.split(line) for line in dry_run(
        xpk, GIN, "gs://b/7b", "--cluster=c", "--workload=c7b", "--device_type=v5p-256")]
    assert "CM3LEON_PREEMPTED_EXIT_CODE" not in option(once, "--command")
    expect_bindings(bindings(["python3", *run]), "gs://b/7b",
                    ["initialize.auto=True", "train_mesh.dcn_data=2"])


def test_xpk_gpu_nodes_get_the_coordinator_from_xpk():
    lines = dry_run(xpk, GIN, "gs://b/7b", "--cluster=c", "--workload=c7b",
                    "--device_type=h100-80gb-8", "--num_nodes=4", "--docker_image=gcr.io/p/c")
    (argv,) = [shlex.split(line) for line in lines]
    assert "--num-nodes=4" in argv and "--docker-image=gcr.io/p/c" in argv
    command = option(argv, "--command")
    # xpk also writes the command into a YAML double-quoted string for GPU jobs.
    assert "--gin.MODEL_DIR='gs://b/7b'" in yaml.safe_load(f'COMMAND: "{command}"')["COMMAND"]
    xpk_env = {"JAX_COORDINATOR_ADDRESS": "jobset-0-0.jobset", "JAX_COORDINATOR_PORT": "6002",
               "NNODES": "4", "NODE_RANK": "3"}
    # A user's image: xpk starts the container in the image's folder, not /app.
    assert command.startswith("cd /app && ")
    ((run, seen),) = bash_argv(command.removeprefix("cd /app && "), xpk_env)
    assert seen == "jobset-0-0.jobset:6002 4 3"
    expect_bindings(bindings(["python3", *run]), "gs://b/7b", [])


def test_slurm_sbatch_line():
    lines = dry_run(slurm, GIN, "/shared/runs/7b", "--nodes=2", "--gpus_per_node=4",
                    "--partition=gpu", "--time=1:00:00")
    (argv,) = [shlex.split(line) for line in lines]
    assert argv[0] == "sbatch"
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--time=1:00:00", f"--chdir={common.REPO}"):
        assert flag in argv
    i = argv.index(slurm.SCRIPT)
    assert argv[i + 1:] == [GIN, "/shared/runs/7b", *OVERRIDES]
    # Other gin files go to main after MODEL_DIR, before the bindings (as it parses them).
    mesh = "gin_configs/meshes/fsdp_tensor.gin"
    (argv,) = [shlex.split(line) for line in dry_run(
        slurm, GIN, "/shared/runs/7b", "--nodes=2", f"--gin_file={mesh}")]
    i = argv.index(slurm.SCRIPT)
    assert argv[i + 1:] == [GIN, "/shared/runs/7b", f"--gin_file={mesh}", *OVERRIDES]
    assert main_lib.parse_args(argv[i + 3:])[0][-1].endswith(mesh)
    assert not any(a.startswith("--gpus-per-task") for a in argv)


@pytest.mark.parametrize("module, extra", [
    (tpu_vm, ["--name=c7b", "--accelerator_type=v5litepod-64", "--zone=z", "--project=p"]),
    (xpk, ["--cluster=c", "--workload=c7b", "--device_type=v5litepod-64"])])
def test_a_gin_file_git_ignores_is_refused_where_the_hosts_get_a_copy(module, extra):
    """runs/ is ignored: a run's own config.gin would not reach the hosts of a slice."""
    folder = os.path.join(common.REPO, "runs", f"launch_test_{os.getpid()}")
    os.makedirs(folder)
    try:
        with open(os.path.join(folder, "config.gin"), "w") as f:
            f.write("train.num_steps = 1\n")
        rel = os.path.relpath(os.path.join(folder, "config.gin"), common.REPO)
        with pytest.raises(common.LaunchError, match="git ignores"):
            module.launch([rel, "gs://b/7b", *extra, "--dry_run"])
    finally:
        shutil.rmtree(folder)


def test_device_types_job_names_and_one_slash_paths_are_checked_before_submitting():
    xpk_args = ["--cluster=c", "--workload=c7b"]
    # xpk's GPU types with a variant suffix are GPU node types, not TPU slices.
    lines = dry_run(xpk, GIN, "gs://b/7b", *xpk_args, "--device_type=gb200-4-nolssd",
                    "--num_nodes=2")
    assert "--num-nodes=2" in shlex.split(lines[0])
    with pytest.raises(common.LaunchError, match="not a GPU node type xpk knows"):
        dry_run(xpk, GIN, "gs://b/7b", *xpk_args, "--device_type=n2-standard-32-4")
    with pytest.raises(common.LaunchError, match="--job_name='My_Job'"):
        dry_run(dataflow, "gin_configs/runs/preprocess.gin", "gs://b/data", "--project=p",
                "--region=r", "--temp_location=gs://b/tmp", "--job_name=My_Job")
    with pytest.raises(common.LaunchError, match="one slash after gs:; write gs://"):
        dry_run(slurm, GIN, "gs:/b/run")


def test_the_sbatch_script_passes_any_model_dir_as_a_gin_string(tmp_path):
    """The job script itself, with a stand-in `srun` that prints what it would run: a
    MODEL_DIR holding quotes reaches main as the same path."""
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    model_dir = "/shared/runs/it's \"7b\""
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "SLURM_SUBMIT_DIR": common.REPO, "CM3LEON_PYTHON": sys.executable}
    out = subprocess.run(["bash", slurm.SCRIPT, GIN, model_dir, *OVERRIDES], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    files, binds = bindings(out)
    (literal,) = [b.split("=", 1)[1] for b in binds if b.startswith("MODEL_DIR=")]
    assert files == [GIN] and ast.literal_eval(literal) == model_dir


def test_dataflow_driver_line():
    lines = dry_run(dataflow, "gin_configs/runs/preprocess.gin", "gs://b/data",
                    "--project=p", "--region=r", "--temp_location=gs://b/tmp",
                    "--max_num_workers=8")
    (argv,) = [shlex.split(line) for line in lines]
    files, binds = bindings(argv)
    assert files == ["gin_configs/runs/preprocess.gin"]
    assert binds[:2] == ["MODEL_DIR='gs://b/data'", "preprocess.runner='DataflowRunner'"]
    key, value = binds[2].split("=", 1)
    assert key == "preprocess.pipeline_options"
    assert ast.literal_eval(value) == [
        "--project=p", "--region=r", "--temp_location=gs://b/tmp",
        "--job_name=cm3leon-preprocess-data", f"--setup_file={common.REPO}/setup.py",
        "--max_num_workers=8"]
    assert binds[3:] == [o[len("--gin."):] for o in OVERRIDES]


def test_local_dry_run_sets_each_process_id():
    lines = dry_run(local, GIN, "runs/x", "--num_processes=2", "--cpu_devices_per_process=2")
    assert len(lines) == 2
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert f"CM3LEON_PROCESS_ID={i}" in argv and "CM3LEON_NUM_PROCESSES=2" in argv
        expect_bindings(bindings(argv), "runs/x", [])


@pytest.mark.parametrize("module,args,message", [
    (tpu_vm, [GIN, "runs/local", "--name=n", "--accelerator_type=v5p-8", "--zone=z",
              "--project=p"], "not a gs:// folder"),
    # Cloud TPU offers tpu7x through GKE only: not as a TPU VM, whatever image is named.
    (tpu_vm, [GIN, "gs://b/x", "--name=n", "--accelerator_type=tpu7x-128", "--zone=z",
              "--project=p", "--runtime_version=some-image"], "GKE only, not as TPU VMs: "
     "launch on a GKE cluster with launch.xpk (--device_type=tpu7x-128)"),
    (tpu_vm, [GIN, "gs://b/x", "--name=n", "--accelerator_type=v9-8", "--zone=z",
              "--project=p"], "'v9-8' is not a TPU slice type this launcher knows"),
    (xpk, ["/etc/passwd.gin", "gs://b/x", "--cluster=c", "--workload=w",
           "--device_type=v5p-8"], "not a file inside the repository"),
    (xpk, [GIN, "gs://b/x", "--cluster=c", "--workload=Bad_Name", "--device_type=v5p-8"],
     "lower-case letters"),
    (xpk, [GIN, "gs://b/x", "--cluster=c", "--workload=w", "--device_type=h100-80gb-8",
           "--num_slices=2"], "give --num_nodes"),
    (dataflow, ["gin_configs/runs/preprocess.gin", "gs://b/x", "--project=p", "--region=r",
                "--temp_location=/tmp/x"], "--temp_location '/tmp/x' is not a gs://"),
])
def test_bad_input_is_one_clear_error(module, args, message, capsys):
    assert common.run_main(module.launch, [*args, "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_unknown_argument_names_the_binding_form(capsys):
    with pytest.raises(SystemExit):
        slurm.launch([GIN, "/x", "--nodez=2", "--dry_run"])
    assert "--gin.KEY=VALUE" in capsys.readouterr().err


def test_every_gin_file_the_launchers_name_exists():
    """The commands in launch/'s docstrings and scripts are copied by users: their gin
    files must be there."""
    import glob
    import re
    named = set()
    for path in glob.glob(os.path.join(common.REPO, "launch", "*")):
        with open(path) as f:
            named |= set(re.findall(r"gin_configs/[\w/.]+?\.gin", f.read()))
    assert "gin_configs/train/cm3leon_350m.gin" in named  # launch/slurm.py's example
    missing = sorted(n for n in named if not os.path.exists(os.path.join(common.REPO, n)))
    assert not missing, missing


POD_7B = "gin_configs/pods/cm3leon_7b_v5p256.gin"  # make_mesh 1 x 128 x 1: a v5p-256.
TPU_VM = ["--name=c7b", "--zone=z", "--project=p"]
XPK = ["--cluster=c", "--workload=c7b"]


@pytest.mark.parametrize("module,args,names", [
    (tpu_vm, [POD_7B, "gs://b/7b", *TPU_VM, "--accelerator_type=v5p-128"],
     "--accelerator_type=v5p-128 gives 64"),
    (xpk, [POD_7B, "gs://b/7b", *XPK, "--device_type=v5p-128"],
     "--device_type=v5p-128 x --num_slices=1 gives 64"),
    (xpk, [POD_7B, "gs://b/7b", *XPK, "--device_type=v5p-128", "--num_slices=2"],
     "x 2 slices (train_mesh.dcn_*)) needs 256 devices"),
    (slurm, [POD_7B, "/shared/7b", "--nodes=2", "--gpus_per_node=8"],
     "--nodes=2 x --gpus_per_node=8 GPUs) gives 16"),
])
def test_a_fixed_mesh_the_slice_cannot_hold_is_refused_before_anything_runs(
        module, args, names, capsys):
    assert common.run_main(module.launch, [*args, "--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no command printed: nothing would be provisioned or submitted
    assert err.startswith("error: the mesh of gin_configs/pods/cm3leon_7b_v5p256.gin (data 1 "
                          "x fsdp 128 x tensor 1") and names in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("module,args", [
    (tpu_vm, [POD_7B, "gs://b/7b", *TPU_VM, "--accelerator_type=v5p-256"]),
    (tpu_vm, [POD_7B, "gs://b/7b", *TPU_VM, "--accelerator_type=v5p-128",
              "--gin.make_mesh.fsdp=-1"]),  # the user's override: all chips
    (tpu_vm, [GIN, "gs://b/7b", *TPU_VM, "--accelerator_type=v5p-8"]),  # fsdp -1
    (xpk, [POD_7B, "gs://b/7b", *XPK, "--device_type=v5p-256", "--num_slices=2"]),
    (xpk, [POD_7B, "gs://b/7b", *XPK, "--device_type=h100-80gb-8", "--num_nodes=16"]),
    (slurm, [POD_7B, "/shared/7b", "--nodes=16", "--gpus_per_node=8"]),
    (slurm, [GIN, "/shared/7b", "--nodes=1", "--gpus_per_node=4"]),
])
def test_a_mesh_that_fits_or_takes_all_devices_is_launched(module, args):
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.launch([*args, DATA, "--dry_run"]) == 0


def test_tpu_slice_names_count_chips():
    assert [common.tpu_devices(t) for t in ("v5p-256", "v4-8", "v5litepod-64", "v6e-256",
                                            "v3-8", "tpu7x-64", "v7-64", "h100-80gb-8")] == [
        128, 4, 64, 256, 8, 64, None, None]


def test_the_launchers_read_the_mesh_gin_binds(tmp_path, monkeypatch):
    """The launchers read the mesh from the gin text (no jax on a login node): includes
    in place, the last binding and then the overrides win; a non-literal is unknown."""
    monkeypatch.setattr(common, "REPO", str(tmp_path))
    (tmp_path / "gin_configs" / "meshes").mkdir(parents=True)
    (tmp_path / "gin_configs" / "meshes" / "m.gin").write_text(
        "make_mesh.data = 2  # a comment\nmake_mesh.tensor = 4\n")
    (tmp_path / "run.gin").write_text(
        "make_mesh.data = 8\ninclude 'meshes/m.gin'\nmake_mesh.fsdp = 16\n"
        "train_mesh.dcn_data = %SLICES\n")
    got = common.bound_mesh(["run.gin"], ["--gin.make_mesh.fsdp=3"], {"x.y": "1"})
    assert got == {"make_mesh.data": 2, "make_mesh.fsdp": 3, "make_mesh.tensor": 4,
                   "train_mesh.dcn_data": None, "train_mesh.dcn_fsdp": 1,
                   "train_mesh.dcn_tensor": 1}


def test_slurm_help_names_a_gpu_gin_file(capsys):
    with pytest.raises(SystemExit):
        slurm.launch(["--help"])
    out = capsys.readouterr().out
    assert "gin_configs/train/cm3leon_350m.gin" in out and "gin_configs/pods/" not in out


def test_a_preempted_run_exits_with_the_status_its_launcher_asks_for(monkeypatch):
    """The trainer saves on SIGTERM and returns `preempted`; xpk restarts only on some
    statuses, so its launcher sets CM3LEON_PREEMPTED_EXIT_CODE (42); 0 without it."""
    import gin

    from cm3leon_jax import main as main_lib
    monkeypatch.setattr(main_lib, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(main_lib, "run", lambda: {"step": 3, "preempted": True})
    try:
        assert main_lib.main(["--gin_file=x.gin"]) == 0
        monkeypatch.setenv(main_lib.PREEMPTED_EXIT_CODE_ENV, "42")
        assert main_lib.main(["--gin_file=x.gin"]) == 42
        monkeypatch.setattr(main_lib, "run", lambda: {"step": 9, "preempted": False})
        assert main_lib.main(["--gin_file=x.gin"]) == 0
    finally:
        gin.clear_config()


def test_tpu_vm_takes_the_image_given_for_a_generation_without_a_default():
    """v2 and v3 slices have no default image: --runtime_version names it (the tpu7x check
    once refused it by asking for the default first)."""
    lines = dry_run(tpu_vm, GIN, "gs://b/x", "--name=n", "--accelerator_type=v3-8", "--zone=z",
                    "--project=p", "--runtime_version=tpu-vm-base",
                    "--gin.make_mesh.shape=(8, 1, 1)")
    create = next(shlex.split(line) for line in lines if " queued-resources create " in line)
    assert "--runtime-version=tpu-vm-base" in create and "--accelerator-type=v3-8" in create
