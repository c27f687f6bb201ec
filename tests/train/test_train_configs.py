"""The shipped training gin files parse and carry the paper's numbers."""

import os

import gin
import pytest
from train_testlib import REPO

from cm3leon_jax import main as main_lib
from cm3leon_jax.model.config import DecoderConfig

TRAIN = os.path.join(REPO, "gin_configs", "train")
MESHES = os.path.join(REPO, "gin_configs", "meshes")
# Paper (arXiv 2309.02591): peak learning rates; every size: 1500 warm-up steps, 8M-token batches.
PAPER_LR = {"cm3leon_350m": 6e-4, "cm3leon_760m": 5e-4, "cm3leon_7b": 1.2e-4}
# Values a user must give on the command line for some files (their `%gin.REQUIRED` macros).
REQUIRED = {"tiny_user": ["DATA_DIR='/tmp/unused_data'"]}


def q(name, default=None):
    """The bound value of `name`, or `default` where the file leaves it unbound."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def _parse(files, bindings=()):
    gin.clear_config()
    main_lib.configure(files, ["MODEL_DIR='/tmp/unused'", *bindings])
    values = {k: q(f"train.{k}", 1) for k in ("global_batch_size", "seq_len", "num_microbatches")}
    values.update(lr=q("learning_rate_schedule.peak_lr"),
                  warmup=q("learning_rate_schedule.warmup_steps"),
                  mode=q("run.mode").selector, config=DecoderConfig())
    return values


@pytest.mark.parametrize("name", sorted(f[:-4] for f in os.listdir(TRAIN) if f.endswith(".gin")))
def test_train_file_parses_and_is_consistent(name):
    try:
        v = _parse([os.path.join(TRAIN, f"{name}.gin")], REQUIRED.get(name, ()))
    finally:
        gin.clear_config()
    assert v["mode"] == "train"
    assert v["global_batch_size"] % v["num_microbatches"] == 0
    assert v["seq_len"] <= v["config"].max_length
    if name in PAPER_LR:
        assert v["lr"] == PAPER_LR[name] and v["warmup"] == 1500
        assert v["global_batch_size"] * v["seq_len"] == 8 * 2**20


@pytest.mark.parametrize("mesh", sorted(f for f in os.listdir(MESHES) if f.endswith(".gin")))
def test_mesh_files_parse(mesh):
    try:
        _parse([os.path.join(TRAIN, "tiny.gin"), os.path.join(MESHES, mesh)])
        assert q("make_mesh.tensor") >= 1
    finally:
        gin.clear_config()


def test_optimizer_defaults_are_the_successors():
    try:
        _parse([os.path.join(TRAIN, "tiny.gin")])
        assert (q("make_optimizer.b1"), q("make_optimizer.b2"), q("make_optimizer.eps"),
                q("make_optimizer.weight_decay"), q("make_optimizer.clip_norm")) == \
            (0.9, 0.95, 1e-5, 0.1, 1.0)
    finally:
        gin.clear_config()
