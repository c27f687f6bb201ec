"""The `train` run mode end to end: resume after SIGKILL and SIGTERM, NaN stops, metrics.

Runs go through the real entry point (`cm3leon_jax.main` with gin_configs/train/tiny.gin)
on the tiny corpus, shrunk by gin bindings to a few seconds each.
"""

import json
import os
import signal
import time

import pytest
import train_testlib as lib

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.train.trainer import NonFiniteLossError


def _committed_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _wait_for(condition, proc, what, timeout=240):
    start = time.time()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the training process exited ({proc.returncode}) before {what}")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged_losses(model_dir):
    """Every (step, loss) line of metrics.jsonl, in order, across all runs that wrote it."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "eval/loss" not in r]


def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(corpus, tmp_path):
    """Reference run; a run killed with SIGKILL in the middle of an asynchronous save,
    resumed, stopped with SIGTERM (it saves first), resumed again: every logged loss
    equals the reference's at the same step."""
    path, vocab = corpus
    reference_steps = 32
    ref_dir = str(tmp_path / "reference")
    lib.run_in_process(lib.bindings(ref_dir, path, vocab, **{"train.num_steps": reference_steps}))
    reference = dict(_logged_losses(ref_dir))
    assert sorted(reference) == list(range(1, reference_steps + 1))
    metrics = lib.read_metrics(ref_dir)
    for key in ("loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_sec",
                "tflops_per_device", "mfu", "eval/loss"):
        assert key in metrics[reference_steps], key
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ref_dir))

    run_dir = str(tmp_path / "interrupted")
    args = lib.bindings(run_dir, path, vocab, **{"train.num_steps": 1000})
    # The subprocesses reuse the reference run's compiled programs (the same programs, so
    # the same bits) from the session's compilation cache (tests/conftest.py).
    cache = {}
    # Killed while step 8's files are written but not yet committed (tests/train/fault_runner.py).
    killed = lib.start_subprocess(args, env={**cache, "FAULT_KILL_DURING_SAVE_OF_STEP": "8"},
                                  log_path=str(tmp_path / "killed.log"),
                                  program=(os.path.join(os.path.dirname(__file__),
                                                        "fault_runner.py"),))
    assert killed.wait(timeout=300) == -signal.SIGKILL, open(tmp_path / "killed.log").read()[-3000:]
    assert _committed_steps(run_dir) == [4]
    assert [n for n in os.listdir(os.path.join(run_dir, "checkpoints"))
            if n.startswith("8.orbax-checkpoint-tmp")], "the kill did not land inside the save"
    resume_from = 4

    lines_before = len(_logged_losses(run_dir))
    stopped = lib.start_subprocess(args, env=cache, log_path=str(tmp_path / "stopped.log"))
    _wait_for(lambda: len(_logged_losses(run_dir)) >= lines_before + 2,
              stopped, "steps after the resumed checkpoint")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=120) == 0, open(tmp_path / "stopped.log").read()[-3000:]
    preempted_at = _committed_steps(run_dir)[-1]
    assert preempted_at > resume_from
    # Saved where it stopped (the killed run trained on past step 8 while it was saving).
    assert preempted_at == max(s for s, _ in _logged_losses(run_dir)[lines_before:])
    assert max(s for s, _ in _logged_losses(run_dir)) <= reference_steps and \
        preempted_at + 3 <= reference_steps, "the runs went too far to compare"

    result = lib.run_in_process(lib.bindings(run_dir, path, vocab,
                                             **{"train.num_steps": preempted_at + 3}))
    assert result["step"] == preempted_at + 3 and not result["preempted"]
    logged = _logged_losses(run_dir)
    assert {s for s, _ in logged} >= set(range(1, preempted_at + 4))
    for step, loss in logged:
        assert loss == reference[step], f"step {step}: {loss} != reference {reference[step]}"


def test_nan_stops_the_run_naming_the_step_and_last_good_checkpoint(corpus, tmp_path):
    path, vocab = corpus
    model_dir = str(tmp_path / "nan")
    # Step 1 has learning rate 0 (warm-up); step 2's 1e30 blows the weights up.
    args = lib.bindings(model_dir, path, vocab, **{
        "train.num_steps": 6, "learning_rate_schedule.peak_lr": 1e30,
        "learning_rate_schedule.warmup_steps": 1, "Checkpointer.save_every": 2})
    with pytest.raises(NonFiniteLossError) as error:
        lib.run_in_process(args)
    message = str(error.value)
    assert "at step 3" in message, message
    assert "Last good checkpoint: step 2 in" in message and "on_nonfinite='skip'" in message
    assert _committed_steps(model_dir) == [2]  # The non-finite state was never saved.


def test_image_places_must_match_the_task_vocabulary(monkeypatch):
    """DecoderConfig.image_grid's ids are checked against the task's id layout."""
    import types

    import pytest
    import seqio

    from cm3leon_jax.train import trainer as trainer_lib
    from cm3leon_jax.vocab.layout import IdLayout
    from tests.model.model_testlib import tiny_config

    layout = IdLayout(text_size=320, image_codes=512, num_sentinels=32, image_length=64)
    vocab = types.SimpleNamespace(vocab_size=layout.vocab_size, layout=layout)
    task = types.SimpleNamespace(output_features={"targets": types.SimpleNamespace(
        vocabulary=vocab)})
    monkeypatch.setattr(seqio, "get_mixture_or_task", lambda name: task)
    right = tiny_config(vocab_size=896, image_grid=8, image_code_ids=(357, 869),
                        sentinel_ids=(5, 37))
    trainer_lib._check_vocabulary("demo", right)
    for wrong in (right.replace(image_code_ids=(356, 868)), right.replace(image_grid=4)):
        with pytest.raises(ValueError, match=r"do not match the vocabulary's .*\(task 'demo'\)"):
            trainer_lib._check_vocabulary("demo", wrong)


def test_muon_trains_on_the_sharded_mesh_resumes_exactly_and_another_optimizer_is_refused(
        corpus, tmp_path):
    """`make_optimizer.kind='muon'` on the tests' data x FSDP mesh: 4 steps straight equal
    2 steps, a stop, and 2 more (its two-part state saved and restored whole); resuming
    that folder with AdamW is refused, naming the optimizer state, and leaves it as it was."""
    from cm3leon_jax.train import checkpoints

    path, vocab = corpus
    muon = {"make_optimizer.kind": "'muon'", "Checkpointer.save_every": 2}
    straight = str(tmp_path / "straight")
    lib.run_in_process(lib.bindings(straight, path, vocab, **muon, **{"train.num_steps": 4}))
    reference = dict(_logged_losses(straight))
    assert sorted(reference) == [1, 2, 3, 4] and reference[4] < reference[1]

    resumed = str(tmp_path / "resumed")
    lib.run_in_process(lib.bindings(resumed, path, vocab, **muon, **{"train.num_steps": 2}))
    result = lib.run_in_process(lib.bindings(resumed, path, vocab, **muon,
                                             **{"train.num_steps": 4}))
    assert result["step"] == 4
    assert dict(_logged_losses(resumed)) == reference

    before = lib.tree_digests(os.path.join(resumed, "checkpoints"))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="opt_state"):
        lib.run_in_process(lib.bindings(resumed, path, vocab, **{"train.num_steps": 6,
                                                                 "Checkpointer.save_every": 2}))
    assert lib.tree_digests(os.path.join(resumed, "checkpoints")) == before


def test_a_resume_on_another_vocabulary_of_the_same_size_is_refused(corpus, tmp_path):
    """A fresh run records its task's vocabulary (`vocabulary.json`); resuming it on a
    vocabulary of the same size whose text model was trained on other text is refused,
    naming both, with the checkpoints left as they were."""
    import shutil

    from cm3leon_jax.train import vocab_record
    from cm3leon_jax.vocab import multimodal
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

    path, vocab_size = corpus
    model_dir = str(tmp_path / "run")
    lib.run_in_process(lib.bindings(model_dir, path, vocab_size, **{"train.num_steps": 2,
                                                                    "Checkpointer.save_every": 2}))
    vocab = multimodal.MultimodalVocabulary(os.path.join(path, "vocab"))
    assert vocab_record.read(model_dir)["fingerprint"] == vocab.fingerprint

    other = str(tmp_path / "other")  # The same shards, another text model of 280 pieces.
    shutil.copytree(path, other)
    shutil.rmtree(os.path.join(other, "vocab"))
    captions = [c.replace("next to", "above").replace("red", "teal") for c in lib.CAPTIONS]
    layout = vocab.layout
    retrained = multimodal.MultimodalVocabulary.create(
        os.path.join(other, "vocab"), TextTokenizer.train(captions, layout.text_size),
        image_codes=layout.image_codes, num_sentinels=layout.num_sentinels,
        image_length=layout.image_length, pad_to_multiple=layout.pad_to_multiple)
    assert retrained.layout == layout and retrained.fingerprint != vocab.fingerprint

    before = lib.tree_digests(os.path.join(model_dir, "checkpoints"))
    with pytest.raises(UserInputError) as error:
        lib.run_in_process(lib.bindings(model_dir, other, vocab_size,
                                        **{"train.num_steps": 4, "Checkpointer.save_every": 2}))
    message = str(error.value)
    assert "holds checkpoints" in message and vocab.fingerprint in message, message
    assert retrained.fingerprint in message and "new MODEL_DIR" in message, message
    assert lib.tree_digests(os.path.join(model_dir, "checkpoints")) == before
