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
        assert module.launch([*args, "--dry_run"]) == 0
    assert out.getvalue()
