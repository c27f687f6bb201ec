"""Faults injected into a real training run: a NaN at step k stops or is skipped, as
configured. (SIGKILL in the middle of a save: test_trainer.py; a write that fails
part-way: test_checkpoints.py.)"""

import math

import numpy as np
import pytest
import train_testlib as lib

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
