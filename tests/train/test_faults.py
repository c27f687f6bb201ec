"""Faults injected into a real training run: a NaN at step k stops or is skipped, as
configured; a MODEL_DIR rerun with another model size is refused through the command line.
(SIGKILL in the middle of a save: test_trainer.py; a write that fails part-way:
test_checkpoints.py.)"""

import json
import math
import os

import gin
import numpy as np
import pytest
import train_testlib as lib

from cm3leon_jax import main as main_lib
from cm3leon_jax.train import data as data_lib
from cm3leon_jax.train.trainer import NonFiniteLossError

NAN_STEP = 3


@pytest.fixture
def nan_at_step_k(monkeypatch):
    """The NAN_STEP-th training batch carries NaN loss weights (a corrupt record)."""
    original = data_lib.ShardedBatches.__next__
    served = {"n": 0}

    def next_batch(self):
        batch = original(self)
        served["n"] += 1
        if served["n"] == NAN_STEP:
            weights = np.asarray(batch["decoder_loss_weights"]).copy()
            weights[0, 0] = np.nan
            batch["decoder_loss_weights"] = self._global_array(  # Same sharding as the rest.
                {s: {"w": weights[s * self.rows:(s + 1) * self.rows]} for s in self.local_shards},
                "w")
        return batch

    monkeypatch.setattr(data_lib.ShardedBatches, "__next__", next_batch)
    return served


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_at_step_k_stops_or_is_skipped(corpus, tmp_path, nan_at_step_k, policy):
    path, vocab = corpus
    model_dir = str(tmp_path / policy)
    args = lib.bindings(model_dir, path, vocab, **{
        "train.num_steps": 5, "train.on_nonfinite": repr(policy), "Checkpointer.save_every": 2})
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=f"at step {NAN_STEP} .*Last good "
                                                     "checkpoint: step 2 in"):
            lib.run_in_process(args)
        assert lib.losses(model_dir).keys() == {1, 2}  # Nothing after the bad step.
        return
    result = lib.run_in_process(args)
    assert result["step"] == 5 and math.isfinite(result["eval"]["loss"])
    metrics = lib.read_metrics(model_dir)
    assert not math.isfinite(metrics[NAN_STEP]["loss"])
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2, 4, 5))
    assert metrics[5]["skipped_steps"] == 1.0 and metrics[2]["skipped_steps"] == 0.0


def test_rerunning_a_model_dir_with_another_size_is_one_line_and_status_2(corpus, tmp_path,
                                                                          capsys):
    """The command line a user reruns with a bigger model: exit status 2, one line naming
    a parameter, both shapes and what to do; every checkpoint byte-identical; twice."""
    path, vocab = corpus
    model_dir = str(tmp_path / "run")
    lib.run_in_process(lib.bindings(model_dir, path, vocab, **{"train.num_steps": 2}))
    before = lib.tree_digests(os.path.join(model_dir, "checkpoints"))
    entries = sorted(os.listdir(model_dir))
    bigger = lib.bindings(model_dir, path, vocab, **{"train.num_steps": 4,
                                                     "DecoderConfig.d_model": 128})
    for _ in range(2):  # A second try must not lose anything either.
        gin.clear_config()
        try:
            code = main_lib.main([f"--gin_file={lib.TRAIN_GIN}", *[f"--gin.{b}" for b in bigger]])
        finally:
            gin.clear_config()
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1, errors
        assert "does not fit this run's config" in errors[0]
        assert ("is (2, 64, 4, 16) float32 in the checkpoint but (2, 128, 4, 32) float32 in this "
                "config") in errors[0]
        assert "another MODEL_DIR" in errors[0] and "config.gin" in errors[0]
        assert lib.tree_digests(os.path.join(model_dir, "checkpoints")) == before
    # config.gin (where later runs read the sizes) is still the one it was trained with, and
    # the refused config left nothing behind.
    assert "d_model = 64" in open(os.path.join(model_dir, "config.gin")).read()
    assert not os.path.exists(os.path.join(model_dir, "config.1.gin"))
    assert sorted(os.listdir(model_dir)) == entries  # Not even a TensorBoard events file.


@pytest.mark.parametrize("overrides, message", [
    ({"train.num_microbatches": 3}, "global_batch_size=8 does not split into "
                                    "train.num_microbatches=3"),
    ({"train.global_batch_size": 6, "make_mesh.data": -1, "make_mesh.fsdp": 1},
     "6 rows per micro-batch do not split over the 8 devices"),
    ({"train.num_microbatches": 2}, "4 rows per micro-batch do not split over the 8 devices"),
    ({"train.eval_steps": 0}, "train.eval_steps=0: give a whole number >= 1"),
    ({"train.log_every": 0}, "train.log_every=0: give a whole number >= 1"),
    ({"train.num_steps": "'4'"}, "train.num_steps='4': give a whole number >= 1"),
    ({"train.global_batch_size": 0}, "train.global_batch_size=0: give a whole number"),
    ({"train.eval_split": "'valid'"}, "train.eval_split='valid': task "),
    ({"train.task": "'cm3leon_synthetic_mx'"},
     "train.task='cm3leon_synthetic_mx' is not a registered SeqIO task or mixture; did you "
     "mean 'cm3leon_synthetic_mix'"),
    ({"make_mesh.data": 3}, "make_mesh: 8 devices do not split"),
])
def test_settings_that_cannot_work_are_one_line_before_training(corpus, tmp_path, capsys,
                                                                 overrides, message):
    """Each was a hang (micro-batches: the error, then tf.data's destructors waited forever
    at exit), a batch silently copied to every device, or a traceback after training."""
    path, vocab = corpus
    model_dir = tmp_path / "run"
    argv = lib.bindings(str(model_dir), path, vocab, **{"train.num_steps": 2, **overrides})
    gin.clear_config()
    try:
        code = main_lib.main([f"--gin_file={lib.TRAIN_GIN}", *[f"--gin.{b}" for b in argv]])
    finally:
        gin.clear_config()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (model_dir / "checkpoints").exists() or not os.listdir(model_dir / "checkpoints")


def test_a_refused_rerun_leaves_the_trained_runs_config_gin(corpus, tmp_path, capsys):
    """A rerun of a trained run with a size its checkpoints do not have, refused before it
    trains, left that size in config.gin (the trained one only in config.1.gin), and export
    then named config.gin as the sizes' source."""
    path, vocab = corpus
    model_dir = tmp_path / "run"
    argv = lib.bindings(str(model_dir), path, vocab, **{"train.num_steps": 2})
    lib.run_in_process(argv)
    before = (model_dir / "config.gin").read_text()
    gin.clear_config()
    try:
        code = main_lib.main([f"--gin_file={lib.TRAIN_GIN}", *[f"--gin.{b}" for b in argv],
                              "--gin.DecoderConfig.max_length=64"])
    finally:
        gin.clear_config()
    assert code == 2 and "DecoderConfig.max_length=64" in capsys.readouterr().err
    assert (model_dir / "config.gin").read_text() == before
    assert not (model_dir / "config.1.gin").exists()


def test_a_changed_seed_is_refused_and_num_steps_reached_says_so(corpus, tmp_path, caplog):
    """The seed decides the data order the saved position continues: a rerun with another
    seed trained on in seed 0's order while config.gin said seed 1."""
    path, vocab = corpus
    model_dir = str(tmp_path / "run")
    lib.run_in_process(lib.bindings(model_dir, path, vocab, **{"train.num_steps": 2}))
    before = lib.tree_digests(os.path.join(model_dir, "checkpoints"))
    with pytest.raises(ValueError, match="seed 0 in the checkpoint, 1 now"):
        lib.run_in_process(lib.bindings(model_dir, path, vocab,
                                        **{"train.num_steps": 4, "train.seed": 1}))
    assert lib.tree_digests(os.path.join(model_dir, "checkpoints")) == before
    with caplog.at_level("WARNING"):
        summary = lib.run_in_process(lib.bindings(model_dir, path, vocab,
                                                  **{"train.num_steps": 1}))
    assert summary["step"] == 2
    assert "at step 2, train.num_steps=1: nothing to train" in caplog.text
    # Its evaluation is returned, and not written again beside the first run's.
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert summary["eval"] and [r["step"] for r in rows if "eval/loss" in r] == [2]
