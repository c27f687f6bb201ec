"""The demo's stage runner: results reused only for the same configuration; start over."""

import os

import pytest

from cm3leon_jax.demo import generate as demo_generate
from cm3leon_jax.demo import stages as demo_stages


def test_a_finished_stage_is_reused_only_under_the_same_configuration(tmp_path):
    calls, lines = [], []

    def stage():
        calls.append(1)
        return {"value": len(calls)}

    first = demo_stages.StageRunner(str(tmp_path), ["a", "b"], "config-1", lines.append)
    assert first.run("a", stage, lambda r: f"value {r['value']}") == {"value": 1}
    assert lines[-1].startswith("[demo 1/2 #-] a: done: value 1 (")
    same = demo_stages.StageRunner(str(tmp_path), ["a", "b"], "config-1", lines.append)
    assert same.run("a", stage) == {"value": 1} and len(calls) == 1
    assert same.reused == ["a"] and "reused" in lines[-1]
    other = demo_stages.StageRunner(str(tmp_path), ["a", "b"], "config-2", lines.append)
    assert other.run("a", stage) == {"value": 2} and other.reused == []
    timings = other.timings()
    assert set(timings["seconds"]) == set(timings["cpu_seconds"]) == {"a"}
    assert set(timings["load_average"]) == {"a"} and timings["total_seconds"] >= 0


def test_stages_run_together_at_the_same_time_and_a_failure_is_raised(tmp_path):
    import threading

    import pytest

    lines = []
    started_b = threading.Event()

    def a():  # finishes only once b has started: run one after the other, it would fail
        assert started_b.wait(timeout=30), "b did not start while a was running"
        return {"a": threading.current_thread() is threading.main_thread()}

    def b():
        started_b.set()
        return {"b": threading.current_thread() is threading.main_thread()}

    runner = demo_stages.StageRunner(str(tmp_path), ["a", "b", "c"], "config", lines.append)
    assert runner.run_together([("a", a, None), ("b", b, None)]) == [{"a": True}, {"b": False}]
    timings = runner.timings()
    assert timings["stages_together"] == [["a", "b"]] and set(timings["seconds"]) == {"a", "b"}
    assert sum(line.endswith(" ...") for line in lines) == 2
    # Reused together as well; a failing stage is raised after the other one finished.
    again = demo_stages.StageRunner(str(tmp_path), ["a", "b", "a2", "c"], "config", lines.append)
    assert again.run_together([("a", a, None), ("b", b, None)]) == [{"a": True}, {"b": False}]
    assert sorted(again.reused) == ["a", "b"]

    def c():
        raise RuntimeError("c broke")

    done = []
    with pytest.raises(RuntimeError, match="c broke"):
        again.run_together([("a2", lambda: done.append(1) or {}, None), ("c", c, None)])
    assert done == [1]


def test_a_preempted_stage_is_not_stored_and_reruns(tmp_path, monkeypatch):
    import gin
    import pytest

    import tasks  # noqa: F401  (registers data_dirs, which pretrain_stage binds)
    from cm3leon_jax.demo import run as demo
    from cm3leon_jax.train import run_config, trainer

    lines, results = [], [{"step": 3, "preempted": True}, {"step": 9}]
    runner = demo_stages.StageRunner(str(tmp_path), ["a"], "config", lines.append)
    with pytest.raises(demo_stages.PreemptedError, match="a"):
        runner.run("a", lambda: results.pop(0))
    assert "rerun the same command to resume" in lines[-1]
    assert runner.cached("a") is None
    assert runner.run("a", lambda: results.pop(0)) == {"step": 9}
    # The pretrain stage passes its trainer's flag on (so the runner sees it).
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 3, "loss": 5.0}\n')
    monkeypatch.setattr(run_config, "write", lambda d: None)
    monkeypatch.setattr(trainer, "train", lambda d: {"step": 3, "preempted": True, "eval": {}})
    try:
        assert demo_stages.was_preempted(demo.pretrain_stage(str(out), str(tmp_path / "data")))
    finally:
        gin.clear_config()  # pretrain_stage binds the data folder


def test_a_sigterm_stops_every_stage_running_together(tmp_path):
    """Both trainers of a `run_together` group save and stop on one SIGTERM, the one in
    a thread too (its own watcher cannot install a handler), and none is stored."""
    import signal
    import threading

    import pytest

    from cm3leon_jax.train import checkpoints

    both_watching = threading.Barrier(3, timeout=30)

    def fake_trainer():  # what every trainer does: watch, step until told to stop, save
        with checkpoints.PreemptionSignal() as preemption:
            both_watching.wait()
            for step in range(3000):
                if preemption.reached(step):
                    return {"step": step, "preempted": True}
                threading.Event().wait(0.01)
        return {"step": 3000}

    def sender():
        both_watching.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    lines = []
    runner = demo_stages.StageRunner(str(tmp_path), ["a", "b"], "config", lines.append)
    threading.Thread(target=sender, daemon=True).start()
    with pytest.raises(demo_stages.PreemptedError):
        runner.run_together([("a", fake_trainer, None), ("b", fake_trainer, None)])
    assert sum("stopped by SIGTERM" in line for line in lines) == 2
    assert runner.cached("a") is None and runner.cached("b") is None
    assert signal.getsignal(signal.SIGTERM) is before
    # The flag went with the handler: a later watcher, in any thread, starts clear.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(
        checkpoints.PreemptionSignal().__enter__().reached(0)))
    thread.start()
    thread.join()
    assert seen == [False]


def test_earlier_work_is_what_the_folder_holds_besides_the_current_config(tmp_path):
    assert demo_stages.earlier_work(str(tmp_path / "missing")) == []
    (tmp_path / "config.gin").write_text("x = 1")
    assert demo_stages.earlier_work(str(tmp_path)) == []
    (tmp_path / "stages").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    assert demo_stages.earlier_work(str(tmp_path)) == ["metrics.json"]  # stages/ is empty.


def test_clear_deletes_the_demos_own_entries_and_nothing_else(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "pretrain" / "checkpoints").mkdir(parents=True)
    (tmp_path / "config.gin").write_text("x = 1")
    (tmp_path / "config.1.gin").write_text("x = 0")
    assert demo_stages.foreign_entries(str(tmp_path)) == []
    (tmp_path / "notes.txt").write_text("mine")  # Not the demo's: kept, and named.
    (tmp_path / "other_run").mkdir()
    assert demo_stages.foreign_entries(str(tmp_path)) == ["notes.txt", "other_run"]
    demo_stages.clear(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.1.gin", "config.gin", "notes.txt",
                                            "other_run"]
    demo_stages.clear(str(tmp_path / "missing"))  # nothing built yet: nothing to do


def test_the_fingerprint_leaves_out_where_and_whether_to_start_over():
    config = "MODEL_DIR = 'runs/a'\ndemo.start_over = True\ntrain.num_steps = 7\n"
    moved = "MODEL_DIR = 'runs/b'\ntrain.num_steps = 7\n"
    assert demo_stages.fingerprint(config) == demo_stages.fingerprint(moved)
    assert demo_stages.fingerprint(config) != demo_stages.fingerprint(
        moved.replace("7", "8"))


_CONFIG = """import cm3leon_jax.demo
IMAGE_SIZE = 32
train.num_steps = 7
demo.split_sizes = {'test': 200,
 'train': 2000}
generate_stage.rerank_samples = 8
images/SamplingConfig.top_p = 0.9
"""
_LATE = {"b": ("generate_stage", "images/SamplingConfig")}


def test_a_setting_only_a_later_stage_reads_leaves_the_earlier_ones_as_built():
    before = demo_stages.stage_fingerprints(_CONFIG, ["a", "b", "c"], _LATE)
    for old, new in (("rerank_samples = 8", "rerank_samples = 4"),
                     ("top_p = 0.9", "top_p = 0.5")):
        after = demo_stages.stage_fingerprints(_CONFIG.replace(old, new), ["a", "b", "c"],
                                               _LATE)
        assert after["a"] == before["a"] and after["b"] != before["b"]
        assert after["c"] != before["c"]
    # Anything else (here: a line that continues a value, an unlisted scope, a macro)
    # counts for every stage.
    for old, new in (("'train': 2000", "'train': 20"), ("images/SamplingConfig.top_p",
                                                        "SamplingConfig.top_p"),
                     ("IMAGE_SIZE = 32", "IMAGE_SIZE = 64")):
        after = demo_stages.stage_fingerprints(_CONFIG.replace(old, new), ["a", "b", "c"],
                                               _LATE)
        assert all(after[n] != before[n] for n in "abc"), old
    with pytest.raises(ValueError, match="stages the run does not have"):
        demo_stages.stage_fingerprints(_CONFIG, ["a"], _LATE)


def test_the_runner_rebuilds_from_the_first_stage_whose_settings_changed(tmp_path):
    calls = []

    def stage(name):
        return lambda: calls.append(name) or {"built": len(calls)}
    names = ["a", "b", "c"]
    prints = [].append
    for config in (_CONFIG, _CONFIG.replace("rerank_samples = 8", "rerank_samples = 4")):
        runner = demo_stages.StageRunner(
            str(tmp_path), names, demo_stages.stage_fingerprints(config, names, _LATE), prints)
        if calls:
            assert runner.built_by_another_config() == ["b", "c"]
        for name in names:
            runner.run(name, stage(name))
    assert calls == ["a", "b", "c", "b", "c"] and runner.reused == ["a"]


def test_no_module_an_earlier_stage_runs_names_what_a_later_stage_reads_first():
    """`demo.FIRST_READ_BY` is only safe if the corpus ... export stages cannot read those
    configurables: no module they can import (everything of the package but the
    generation, evaluation and the demo's own later stages, with what those modules
    import) names one of them in code."""
    import ast
    import pathlib

    from cm3leon_jax.demo import run as demo

    root = pathlib.Path(demo.__file__).resolve().parent.parent
    late = {c.split("/")[-1] for cs in demo.FIRST_READ_BY.values() for c in cs}
    trees = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(
        ".__init__"): ast.parse(p.read_text()) for p in root.rglob("*.py")}
    later = ("cm3leon_jax.decode", "cm3leon_jax.evaluation", "cm3leon_jax.demo",
             "cm3leon_jax.testing", "cm3leon_jax.main")
    earlier_stage_modules = ("cm3leon_jax.demo.finetune", "cm3leon_jax.demo.apart")
    todo = [m for m in trees if not m.startswith(later) or m in earlier_stage_modules]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in trees:
            continue
        seen.add(module)
        for node in ast.walk(trees[module]):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cm3leon_jax"):
                todo += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in trees
                         else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            named = (node.id if isinstance(node, ast.Name) else node.attr
                     if isinstance(node, ast.Attribute) and not (
                         isinstance(node.value, ast.Attribute) and node.value.attr == "random")
                     else None)
            assert named not in late, f"{module} names {named}, which FIRST_READ_BY puts later"
    assert "cm3leon_jax.decode.restore" in seen and "cm3leon_jax.train.trainer" in seen


def test_fingerprint_and_jsonable():
    import numpy as np
    assert demo_stages.fingerprint("a") != demo_stages.fingerprint("b")
    assert demo_stages.jsonable({1: (np.float32(0.5), np.arange(2))}) == {"1": [0.5, [0, 1]]}


def test_a_zero_figure_never_reaches_a_chance_target():
    metrics = {"text_to_image": {"colors_right": 0.7, "classes_right": 0.05,
                                 "position_right": 0.0},
               "chance_reference": {"text_to_image": {"colors_right": 0.2,
                                                      "classes_right": 0.02,
                                                      "position_right": 0.0}}}
    lines = demo_generate.targets_report(metrics)
    verdicts = {line.split()[1]: "NOT reached" not in line for line in lines}
    assert verdicts == {"text_to_image.colors_right": True,
                        "text_to_image.classes_right": False,
                        "text_to_image.position_right": False}


def test_the_chance_targets_name_the_tokenizers_ceiling_and_the_scenes_graded():
    metrics = {"position_scenes": 7,
               "text_to_image": {"classes_right": 0.2, "position_right": 0.0},
               "vq_reconstruction_reference": {"classes_right": 0.77, "position_right": 0.0},
               "chance_reference": {"text_to_image": {"classes_right": 0.08,
                                                      "position_right": 0.0}}}
    lines = demo_generate.targets_report(metrics)
    assert lines == [
        "target text_to_image.classes_right >= 3x chance (24%): 20% (NOT reached; the true "
        "images through the tokenizer 77%)",
        "target text_to_image.position_right >= 3x chance (0%): 0% (NOT reached; the true "
        "images through the tokenizer 0%; 7 scenes of two or more shapes graded)"]


def test_the_drawing_targets_name_the_tokenizers_ceiling_and_the_caption_ones_do_not():
    metrics = {"text_to_image": {"objects_right": 0.25, "any_object_right": 0.25},
               "image_to_text": {"objects_right": 0.66},
               "vq_reconstruction_reference": {"objects_right": 0.797,
                                               "any_object_right": 0.8125}}
    assert demo_generate.targets_report(metrics) == [
        "target text_to_image.objects_right >= 35%: 25% (NOT reached; the true images "
        "through the tokenizer 80%)",
        "target text_to_image.any_object_right >= 80%: 25% (NOT reached; the true images "
        "through the tokenizer 81%)",
        "target image_to_text.objects_right >= 30%: 66% (reached)"]


def test_positions_are_judged_on_the_captions_that_name_them_when_measured():
    metrics = {"text_to_image": {"position_right": 0.0},
               "chance_reference": {"text_to_image": {"position_right": 0.0}},
               "text_to_image_positions": {"position_right": 0.6, "scenes": 64.0,
                                           "vq_reconstruction_reference": 0.9,
                                           "chance_reference": 0.5}}
    assert demo_generate.targets_report(metrics) == [
        "target text_to_image position >= 3x chance (150%): 60% (NOT reached; 64 captions "
        "that name positions; the true images through the tokenizer 90%)"]
    metrics["text_to_image_positions"].update(position_right=0.4, chance_reference=0.1)
    assert "30%): 40% (reached;" in demo_generate.targets_report(metrics)[0]


def test_the_caption_ablation_is_reported_against_the_captions_with_retrieval():
    metrics = {"num_retrieved": 2, "image_to_text": {"objects_right": 0.5},
               "image_to_text_ablations": {"k0": {"objects_right": 0.25}}}

    def said():
        return [line for line in demo_generate.targets_report(metrics)
                if line.startswith("captions:")]

    assert said() == ["captions: k=2 retrieved beats k=0: 50% vs 25% exactly right (yes)"]
    metrics["image_to_text"]["objects_right"] = 0.25
    assert said() == ["captions: k=2 retrieved beats k=0: 25% vs 25% exactly right (NO)"]


def test_the_blind_question_prior_answers_each_question_as_validation_scenes_do():
    from cm3leon_jax.demo import evaluate as demo_evaluate

    questions = ["How many shapes are there?", "Is there a circle?", "Never asked?"]
    # "one" is the answer to the first nearly always; an unseen question gets the overall
    # most common answer; each right answer counts once.
    score = demo_evaluate.question_prior_baseline(questions, [["one"], ["zebra"], ["zebra"]],
                                                  num_validation=50, image_size=32)
    assert score == 1 / 3
    lines = demo_evaluate.targets_report({"sft": {"vqa": {"vqa_exact_match": 0.2}},
                                          "vqa_majority_baseline": 0.14,
                                          "vqa_question_prior_baseline": 0.44})
    assert lines == ["target VQA exact match >= 3x majority baseline (42%) after SFT: 20% "
                     "(NOT reached; a blind question-only prior 44%)"]
    by_type = {"vqa_exact_match": 0.5, "vqa_exact_match/count": 0.75, "vqa_questions/count": 4,
               "vqa_exact_match/shape": 0.0, "vqa_questions/shape": 2}
    lines = demo_evaluate.targets_report({"sft": {"vqa": by_type},
                                          "vqa_majority_baseline": 0.14})
    assert lines[0].endswith("50% (reached); right by question type: count 3/4, shape 0/2")
    zero = demo_evaluate.targets_report({"sft": {"vqa": {"vqa_exact_match": 0.0}},
                                         "vqa_majority_baseline": 0.0})
    assert "(NOT reached" in zero[0]  # 0% is not 3x a 0% baseline.


def test_the_edits_line_says_how_much_the_decoder_takes_from_the_source_when_measured():
    from cm3leon_jax.demo import evaluate as demo_evaluate

    def row(right, copy, first):
        return {"edit": {"edit_right": right, "edit_copy_prob": copy,
                         "edit_first_copy_prob": first}}

    lines = demo_evaluate.targets_report({"pretrain": row(0.03, 0.368, 0.059),
                                          "sft": row(0.02, 0.45, 0.457)})
    assert lines == ["target edits right >= 30% after SFT: 2% (NOT reached; before SFT 3%); "
                     "the source's code where the edit keeps it, teacher-forced: p 0.37 before "
                     "SFT, 0.45 after (the first code 0.06, 0.46)"]
    # A report from before the figure existed keeps its line as it was.
    old = {r: {"edit": {"edit_right": 0.03}} for r in ("pretrain", "sft")}
    assert demo_evaluate.targets_report(old) == [
        "target edits right >= 30% after SFT: 3% (NOT reached; before SFT 3%)"]


def test_the_chance_baseline_averages_over_pairings_of_other_scenes():
    """Four one-shape scenes, circle / square / circle / square: paired by a shift of 1 or
    3 every class is wrong, by 2 every one is right, so over all three pairings chance is
    1/3, where a single pairing gives 0 or 1."""
    import numpy as np

    from cm3leon_jax.data import shapes

    background = shapes.Background("plain", "gray")
    scenes = [shapes.Scene(32, background, (shapes.make_shape(kind, "red", "large", 8, 8, 14),))
              for kind in ("circle", "square", "circle", "square")]
    images = np.stack([shapes.render(s) for s in scenes])
    chance = demo_generate._chance(images, ["x"] * 4, scenes, seed=0)
    assert chance["pairings"] == 3
    assert chance["text_to_image"]["classes_right"] == 1 / 3
    assert chance["text_to_image"]["colors_right"] == 1.0
    orders = demo_generate._derangements(200, seed=1)
    assert len(orders) == demo_generate.CHANCE_SHIFTS == len({tuple(o) for o in orders})
    assert all(o[i] != i for o in orders for i in range(200))


def test_every_sample_comparisons_are_said_beside_the_re_ranked_ones():
    metrics = {"num_retrieved": 2, "text_to_image": {"objects_right": 0.24},
               "text_to_image_ablations": {"no_cfg": {"objects_right": 0.25}},
               "text_to_image_every_sample": {"headline": 0.168, "k0": 0.17, "no_cfg": 0.139}}
    lines = [line for line in demo_generate.targets_report(metrics) if "CFG" in line or
             "k=0" in line]
    assert lines == [
        "CFG beats no CFG: 24% vs 25% exactly right (NO)",
        "k=2 retrieved beats k=0, a sample on average (every sample, none re-ranked): 16.8% "
        "vs 17.0% exactly right (no)",
        "CFG beats no CFG, a sample on average (every sample, none re-ranked): 16.8% vs 13.9% "
        "exactly right (yes)"]


def test_draws_keep_the_best_sample_and_average_every_one():
    """A stub generator whose 2 samples per caption are a right and a wrong image, and a
    ranker that prefers the wrong one: the kept images are the wrong ones, and the mean
    over every sample is 1/2."""
    import numpy as np

    from cm3leon_jax.data import shapes
    from cm3leon_jax.decode.generate import Images

    background = shapes.Background("plain", "gray")
    scene = lambda kind: shapes.Scene(32, background, (shapes.make_shape(
        kind, "red", "large", 8, 8, 14),))
    scenes = [scene("circle"), scene("square")]
    right = [shapes.render(s) for s in scenes]
    wrong = [shapes.render(scene("square")), shapes.render(scene("circle"))]

    class Stub:
        def text_to_image(self, captions, num_retrieved, sampling, seed, num_samples):
            images = np.stack([im for pair in zip(right, wrong) for im in pair][
                :len(captions) * num_samples])
            return Images(np.zeros((len(images), 4), np.int32), images,
                          [c for c in captions for _ in range(num_samples)])

    ranker = lambda images, captions: np.tile([0.0, 1.0], len(images) // 2)
    draw = demo_generate._Draws(Stub(), ranker, ["a", "b"], scenes, 2, seed=0)
    kept = draw(2, None, label="headline")
    np.testing.assert_array_equal(kept.images, np.stack(wrong))
    assert draw.sample_means == {"headline": 0.5}
    assert len(draw(2, None, samples=1).images) == 2 and draw.sample_means == {"headline": 0.5}


def test_a_stage_whose_outputs_are_gone_is_built_again_and_so_is_every_later_one(tmp_path):
    calls, lines = [], []

    def stage(name):
        def fn():
            calls.append(name)
            os.makedirs(tmp_path / name, exist_ok=True)
            return {"built": name}
        return fn

    names, outputs = ["a", "b", "c"], {"a": ("a",), "b": ("b",), "c": ("c",)}

    def run_all():
        runner = demo_stages.StageRunner(str(tmp_path), names, "config", lines.append,
                                         outputs=outputs)
        for name in names:
            runner.run(name, stage(name))
        return runner

    run_all()
    assert run_all().reused == ["a", "b", "c"] and calls == ["a", "b", "c"]
    os.rmdir(tmp_path / "b")  # A stage's folder removed by hand.
    again = run_all()
    assert calls[3:] == ["b", "c"] and again.reused == ["a"]  # c read b's old output.
    assert any("b: stored, but b is gone: building it again" in line for line in lines)


def test_earlier_work_is_what_a_run_built_not_its_config_files(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "config.gin").write_text("x = 1")
    (tmp_path / "config.1.gin").write_text("x = 0")
    assert demo_stages.earlier_work(str(tmp_path)) == []  # Fresh after start_over.
    (tmp_path / "stages" / "corpus.json").write_text("{}")
    assert demo_stages.earlier_work(str(tmp_path)) == ["stages"]
