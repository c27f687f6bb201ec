"""The launchers' check of the mesh and batch before anything is submitted, for the gin
files that size their mesh with -1 (every gin_configs/train/*.gin: FSDP over all devices).

The -1 is resolved from the devices the launch gives (chips of the slice type, nodes x
GPUs) as `make_mesh` would on the hosts; the DCN product must be the launch's slices or
nodes; the micro-batch rows must split over the data and fsdp axes (`check_batch`).
"""

import contextlib
import io

import pytest

from launch import common, slurm, tpu_vm, xpk

TRAIN_350M = "gin_configs/train/cm3leon_350m.gin"  # fsdp -1; 2048 / 16 = 128 rows
TRAIN_7B = "gin_configs/train/cm3leon_7b.gin"  # fsdp -1; 2048 / 4 = 512 rows
TPU_VM = ["--name=n", "--zone=z", "--project=p"]
XPK = ["--cluster=c", "--workload=w"]


def refused(module, args, capsys) -> str:
    assert common.run_main(module.launch, [*args, "--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed: nothing would be submitted
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_a_batch_that_does_not_split_over_the_resolved_mesh_is_refused(capsys):
    """3 nodes x 8 GPUs with the data axis over the nodes: 128 rows per micro-batch over
    24 devices; it failed only once the job ran."""
    err = refused(slurm, [TRAIN_350M, "/shared/r", "--nodes=3", "--gin.train_mesh.dcn_data=3"],
                  capsys)
    assert ("train.global_batch_size=2048 / num_microbatches=16 = 128 rows per micro-batch do "
            "not split over the 24 devices of the data and fsdp axes (data 1 x fsdp 8 x tensor "
            "1 x 3 slices (train_mesh.dcn_*) on the job (--nodes=3 x --gpus_per_node=8 GPUs))"
            ) in err
    assert "fsdp 24" in refused(slurm, [TRAIN_350M, "/shared/r", "--nodes=3"], capsys)
    assert "512 rows per micro-batch do not split over the 768 devices" in refused(
        tpu_vm, [TRAIN_7B, "gs://b/r", *TPU_VM, "--accelerator_type=v5p-1536"], capsys)


@pytest.mark.parametrize("module,args,message", [
    (slurm, [TRAIN_350M, "/shared/r", "--nodes=2", "--gin.train_mesh.dcn_data=3"],
     "= 3 groups over DCN, but the launch has 2 nodes (--nodes=2), which the DCN axes span: "
     "make the product 2 (or 1: no DCN axes)"),
    (slurm, [TRAIN_350M, "/shared/r", "--nodes=1", "--gin.train_mesh.dcn_fsdp=2"],
     "but the launch has 1 node (--nodes=1)"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-256", "--num_slices=2",
           "--gin.train_mesh.dcn_data=4"], "but the launch has 2 slices (--num_slices=2)"),
    (slurm, [TRAIN_350M, "/shared/r", "--nodes=1", "--gpus_per_node=3",
             "--gin.make_mesh.tensor=2"],
     "(data 1 x fsdp -1 x tensor 2) needs a multiple of 2 devices (chips or GPUs), but the "
     "job (--nodes=1 x --gpus_per_node=3 GPUs) gives 3"),
    (slurm, [TRAIN_350M, "/shared/r", "--gin.train.num_microbatches=3"],
     "train.global_batch_size=2048 does not split into train.num_microbatches=3"),
])
def test_dcn_and_device_counts_that_cannot_work_are_refused(module, args, message, capsys):
    assert message in refused(module, args, capsys)


@pytest.mark.parametrize("module,args", [
    (slurm, [TRAIN_350M, "/shared/r", "--nodes=2", "--gin.train_mesh.dcn_data=2"]),
    (slurm, [TRAIN_350M, "/shared/r", "--nodes=4", "--gpus_per_node=4"]),
    (tpu_vm, [TRAIN_7B, "gs://b/r", *TPU_VM, "--accelerator_type=v5p-256", "--skip_install"]),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-256", "--num_slices=2"]),
])
def test_runs_that_fit_are_launched(module, args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert module.launch([*args, "--gin.data_dirs.user='gs://b/data'", "--dry_run"]) == 0
    assert out.getvalue()


DATA = "--gin.data_dirs.user='gs://b/data'"


@pytest.mark.parametrize("module,args,message", [
    # One slice: DCN axes have no slices to span (they failed on every host, after the
    # slice was provisioned).
    (tpu_vm, [TRAIN_7B, "gs://b/r", *TPU_VM, "--accelerator_type=v5p-256", DATA,
              "--gin_file=gin_configs/meshes/multislice.gin"],
     "but the launch has 1 slice (launch.tpu_vm starts one; several: launch.xpk), which the "
     "DCN axes span: make it 1 (no DCN axes)"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-256", DATA,
           "--gin.train_mesh.dcn_data=2"], "the launch has 1 slice (--num_slices=1)"),
    # The data the task reads: bound, and where the hosts can read it.
    (tpu_vm, [TRAIN_7B, "gs://b/r", *TPU_VM, "--accelerator_type=v5p-256"],
     "train.task='cm3leon_user' reads data_dirs.user, which the run does not bind"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-256",
           "--gin.data_dirs.user='/home/me/data'"],
     "data_dirs.user='/home/me/data' is not a gs:// folder"),
    (slurm, [TRAIN_7B, "/shared/r"], "reads data_dirs.user, which the run does not bind"),
    (slurm, [TRAIN_7B, "/shared/r", "--gin.data_dirs.user=None"],
     "reads data_dirs.user, which the run does not bind"),
    # Slice and node types: named as the clouds name them, with a count this file knows.
    (tpu_vm, [TRAIN_7B, "gs://b/r", *TPU_VM, "--accelerator_type=v5e-64", DATA],
     "v5e slices are named v5litepod-N"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v7-256", DATA],
     "'v7-256' is not a TPU slice type this launcher knows"),
    # tpu7x (Ironwood) counts TensorCores, each its own device: 256 of them, not 128 chips.
    (xpk, ["gin_configs/pods/cm3leon_7b_v5p256.gin", "gs://b/r", *XPK,
           "--device_type=tpu7x-256", DATA], "--device_type=tpu7x-256 x --num_slices=1 gives 256"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=h100-80g-8", DATA],
     "'h100-80g-8' is not a GPU node type xpk knows"),
    (xpk, [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-256", "--num_slices=0", DATA],
     "--num_slices=0: must be >= 1"),
    # GPUs: the mesh is checked against nodes x GPUs per node, as slurm's is.
    ("gpu", ["gin_configs/pods/cm3leon_7b_v5p256.gin", "gs://b/r", *XPK,
             "--device_type=h100-80gb-8", "--num_nodes=3", DATA],
     "needs 128 devices (chips or GPUs), but --device_type=h100-80gb-8 x --num_nodes=3 "
     "gives 24"),
])
def test_launches_that_would_fail_on_the_hosts_are_refused_here(module, args, message, capsys):
    assert message in refused(xpk if module == "gpu" else module, args, capsys)


def test_xpk_adds_the_slices_over_dcn_only_when_the_run_binds_no_dcn_axis():
    args = [TRAIN_7B, "gs://b/r", *XPK, "--device_type=v5p-128", "--num_slices=2", DATA]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert xpk.launch([*args, "--gin.train_mesh.dcn_fsdp=2", "--dry_run"]) == 0
    assert "dcn_data" not in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert xpk.launch([*args, "--dry_run"]) == 0
    assert "--gin.train_mesh.dcn_data=2" in out.getvalue()
