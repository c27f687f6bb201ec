"""`make demo`'s run file, end to end at toy size: every stage runs, a rerun resumes."""

import ast
import json
import math
import os
import re
import subprocess
import sys

import gin
import pytest

from cm3leon_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 30  # pretraining steps: enough for the tiny decoder to beat uniform prediction
LOSS_MARGIN = 2.0  # nats below ln(vocab_size) the held-out loss must reach (issue 16)
# demo.gin with every stage shrunk to seconds; the stages and their wiring are unchanged.
TOY = [
    "demo.split_sizes={'train': 80, 'validation': 20, 'test': 20}",
    "demo.num_pictures=4", "demo.parse_examples=10",
    "train_image_tokenizer.num_steps=10", "train_image_tokenizer.eval_every=10",
    "train_image_tokenizer.checkpoint_every=10", "train_image_tokenizer.eval_examples=16",
    # A quarter of tiny.gin's channels and no attention: every stage encodes or decodes
    # images with it (its levels, so the 4 x 4 code grid, are the demo's; its codebook is
    # tiny.gin's 512, half the demo's, for a smaller toy vocabulary).
    "VQGANConfig.base_channels=8", "VQGANConfig.mid_attention=False",
    "VQGANConfig.latent_channels=8", "VQGANConfig.embed_dim=8", "VQGANConfig.num_groups=4",
    "VQGANConfig.codebook_size=512",
    "train_retriever.steps=5", "train_retriever.warmup_steps=1",
    "train/synthetic_pairs.num=80", "test/synthetic_pairs.num=20",
    "train_retriever.batch_size=16",
    "preprocess.docs_per_shard=40", "preprocess.text_vocab_size=300",
    f"train.num_steps={STEPS}", "train.eval_every=0", "train.eval_steps=1",
    "train.global_batch_size=2", "learning_rate_schedule.warmup_steps=3",
    # The toy decoder (gin_configs/models/tiny.gin's sizes), whatever size the demo trains.
    "DecoderConfig.num_layers=2", "DecoderConfig.d_model=64", "DecoderConfig.num_heads=4",
    "DecoderConfig.mlp_dim=256",
    # Its image codes' ids under the toy's 300 text pieces (5 specials, 32 sentinels).
    "DecoderConfig.image_code_ids=(337, 849)", "DecoderConfig.vocab_size=896",
    "generate_stage.num_examples=3", "generate_stage.batch_size=4",
    "generate_stage.rerank_samples=2",
    "sft_scenes.split_sizes={'train': 8, 'validation': 2, 'test': 2}", "sft_stage.num_steps=2",
    "sft_stage.warmup_steps=1",
    "evaluate_stage.num_examples=3", "evaluate_stage.batch_size=4",
    "evaluate_stage.baseline_examples=8",
]


def _args(model_dir):
    return ["--gin_file=gin_configs/runs/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
            *[f"--gin.{b}" for b in TOY]]


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def _demo(model_dir):
    """`make demo`'s command as a user's CPU machine runs it: one device, not the suite's
    eight fake ones (tests/conftest.py), which cost twice the CPU time here."""
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    r = subprocess.run([sys.executable, "-m", "cm3leon_jax.main", *_args(model_dir)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return _metrics(model_dir)


def _demo_xla_flags() -> list[str]:
    """What demo.gin binds `demo.xla_flags` to (a one-line list)."""
    with open(os.path.join(ROOT, "gin_configs", "runs", "demo.gin")) as f:
        bound = re.search(r"^demo\.xla_flags = (\[.*\])$", f.read(), re.M)
    return ast.literal_eval(bound.group(1)) if bound else []


def _main_here(args, status=0):
    """`main` in this process, as its command-line wrapper (tests/cli/test_main.py) runs it:
    no second import of jax and TF. XLA has started here already, so the demo's XLA flags
    go in $XLA_FLAGS first, as they would be for a process that started with them."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([flags, *_demo_xla_flags()]).strip()
    gin.clear_config()
    try:
        assert main_lib.main(args) == status
    finally:
        gin.clear_config()
        os.environ["XLA_FLAGS"] = flags


def test_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    model_dir = str(tmp_path / "demo")
    metrics = _demo(model_dir)
    assert metrics["corpus"]["splits"] == {"train": 80, "validation": 20, "test": 20}
    assert metrics["preprocess"]["splits"]["train"]["written"] == 80
    retrieval = metrics["preprocess"]["retrieval"]
    assert retrieval["bank_documents"] == 80
    for split in ("train", "validation", "test"):
        assert retrieval["splits"][split]["mean_neighbors"] > 0
    assert metrics["pretrain"]["steps"] == STEPS
    # Learning, not just running: the held-out loss is well below uniform prediction's.
    uniform = math.log(metrics["pictures"]["vocab_size"])
    assert 0 < metrics["pretrain"]["final_eval"]["loss"] < uniform - LOSS_MARGIN
    sft = metrics["sft"]
    assert sft["steps"] == 2 and sft["base_step"] == STEPS
    assert set(sft["train_examples"]) >= {"edit", "vqa", "caption", "boxes_to_image",
                                          "edge_to_image"}
    # 8 scenes; VQA asks each of them all its questions (5-11).
    assert all(n == 8 for f, n in sft["train_examples"].items() if f != "vqa")
    assert 8 * 5 <= sft["train_examples"]["vqa"] <= 8 * 11
    # The SFT shards were written by their own stage; the sft stage found them.
    assert metrics["sft_data"] == sft["train_examples"]
    assert metrics["stages_together"] == [["image_tokenizer", "retriever"]]
    evaluated = metrics["evaluate"]
    for run in ("pretrain", "sft"):
        assert evaluated[run]["step"] == (STEPS if run == "pretrain" else 2)
        assert 0 <= evaluated[run]["vqa"]["vqa_exact_match"] <= 1
        assert 0 <= evaluated[run]["edit"]["edit_right"] <= 1
        assert "objects_right" in evaluated[run]["captioning"]
        assert os.path.getsize(evaluated[run]["report"]) > 0
    assert 0 <= evaluated["vqa_majority_baseline"] <= 1
    assert 0 <= evaluated["vqa_question_prior_baseline"] <= 1
    # The fine-tuned decoder, exported (params only, bfloat16) and read back exactly.
    exported = metrics["export"]
    assert exported["step"] == 2 and exported["dtype"] == "bfloat16" and exported["parameters"] > 0
    with open(os.path.join(model_dir, "export", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["step"] == 2 and manifest["vocab"] and manifest["image_tokenizer"]
    # Each trainer recorded the vocabulary (the SFT data's is a copy of pretraining's), and
    # the export carries the record on.
    records = [json.load(open(os.path.join(model_dir, run, "vocabulary.json")))
               for run in ("pretrain", "sft")]
    assert records[0]["fingerprint"] == records[1]["fingerprint"]
    assert manifest["vocabulary"]["fingerprint"] == records[0]["fingerprint"]
    # Pretraining by Muon (train/demo.gin), the SFT by AdamW (runs/demo.gin), each run's
    # config.gin saying which.
    for run, kind in (("pretrain", "muon"), ("sft", "adamw")):
        with open(os.path.join(model_dir, run, "config.gin")) as f:
            assert f"make_optimizer.kind = '{kind}'" in f.read().splitlines(), run
    assert any(line.startswith("target VQA exact match") for line in metrics["targets"])
    assert any(line.startswith("target edits right") for line in metrics["targets"])
    for picture in ("corpus.png", "reconstructions.png", "generated.png", "captioned.png",
                    "contact_sheet.png"):
        assert os.path.getsize(os.path.join(model_dir, "pictures", picture)) > 0
    assert metrics["pictures"]["contact_sheet"] == os.path.join(
        model_dir, "pictures", "contact_sheet.png")
    generated = metrics["generate"]
    assert generated["examples"] == 3 and generated["checkpoint_step"] == STEPS
    assert generated["split"] == "test"
    ablations = generated["text_to_image_ablations"]
    for scores in (generated["text_to_image"], generated["image_to_text"], ablations["k0"],
                   ablations["no_cfg"], ablations["one_sample"],
                   generated["image_to_text_ablations"]["k0"]):
        assert set(scores) >= {"objects_right", "any_object_right", "colors_right",
                               "classes_right"}
        assert all(0 <= v <= 1 for v in scores.values())
    assert "count_right" in generated["chance_reference"]["text_to_image"]
    for key in ("text_to_image_by_class", "vq_reconstruction_by_class"):
        asked = sum(row["asked"] for row in generated[key].values())
        assert asked >= 3 and all(0 <= row.get("drawn_right", 0) <= 1
                                  for row in generated[key].values())
    placed = generated["text_to_image_positions"]
    assert placed["scenes"] == 3 and 0 <= placed["position_right"] <= 1
    assert 0 <= placed["chance_reference"] <= 1 and 0 <= placed["vq_reconstruction_reference"] <= 1
    assert "object_recall" in generated["chance_reference"]["image_to_text"]
    every = generated["text_to_image_every_sample"]
    assert set(every) == {"headline", "k0", "no_cfg"} and all(0 <= v <= 1 for v in every.values())
    with open(os.path.join(model_dir, "pictures", "captions.json")) as f:
        captions = json.load(f)
    assert len(captions) == 3 and all(len(c["captions"]) == 1 for c in captions)
    # Generation and re-ranking ran above, so the demo must not list them as missing.
    assert not any(line.startswith(("generation", "text-to-image", "supervised")) or
                   "re-ranking" in line for line in metrics["not_yet"])
    for key in ("seconds", "cpu_seconds", "load_average"):
        assert set(metrics[key]) >= {"corpus", "image_tokenizer", "retriever", "pretrain",
                                     "sft_data", "sft", "export", "generate", "evaluate",
                                     "pictures"}
    assert metrics["reused_stages"] == [] and metrics["earlier_work"] == []
    assert [line.split(":")[0] for line in metrics["targets"] if "minutes" in line] == [
        "target every stage within 10 minutes", "target every stage within 20 minutes"]

    # A rerun after an interruption (here: the pictures stage lost) finds every other stage's
    # output and does not redo it, and redoes only what is missing.
    os.remove(os.path.join(model_dir, "stages", "pictures.json"))
    os.remove(os.path.join(model_dir, "pictures", "contact_sheet.png"))
    monkeypatch.chdir(ROOT)
    _main_here(_args(model_dir))
    again = _metrics(model_dir)
    assert set(again["reused_stages"]) == set(again["seconds"]) - {"pictures"}
    assert "stages" in again["earlier_work"]
    # Its seconds are a resumed run's: the time targets are not judged on them.
    timed = [line for line in again["targets"] if "stage within" in line or "time" in line]
    assert len(timed) == 1 and timed[0].startswith("time targets not judged: MODEL_DIR held")
    assert again["retriever"] == metrics["retriever"]
    assert again["preprocess"] == metrics["preprocess"]
    assert again["pretrain"]["steps"] == STEPS and again["evaluate"] == metrics["evaluate"]
    assert again["seconds"]["image_tokenizer"] < metrics["seconds"]["image_tokenizer"]
    assert again["generate"]["text_to_image"] == metrics["generate"]["text_to_image"]
    assert os.path.getsize(os.path.join(model_dir, "pictures", "contact_sheet.png")) > 0

    # The generate run mode on the demo's model (generate.gin names runs/demo: re-pointed).
    out_dir = str(tmp_path / "generated")
    args = ["--gin_file=gin_configs/runs/generate.gin",
            f"--gin.MODEL_DIR='{out_dir}'", f"--gin.generate.checkpoint='{model_dir}/pretrain'",
            f"--gin.generate.vocab_dir='{model_dir}/data/vocab'",
            f"--gin.load_image_tokenizer.checkpoint='{model_dir}/image_tokenizer'",
            f"--gin.generate.retrieval_dir='{model_dir}/data/retrieval'",
            "--gin.generate.captions=['a red circle']", "--gin.generate.num_samples=2",
            f"--gin.generate.image_files=['{model_dir}/pictures/corpus.png']"]
    _main_here(args)
    with open(os.path.join(out_dir, "generated.json")) as f:
        assert json.load(f) == [{"caption": "a red circle",
                                 "images": ["images/000_0.png", "images/000_1.png"]}]
    for name in ("generated.png", "images/000_1.png", "captions.json"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0

    # A setting that only generation and what follows read rebuilds those stages and
    # reuses every one before them.
    capsys.readouterr()
    fewer = ["--gin.generate_stage.rerank_samples=3"]
    _main_here(_args(model_dir) + fewer)
    rebuilt = _metrics(model_dir)
    assert set(rebuilt["seconds"]) - set(rebuilt["reused_stages"]) == {
        "generate", "evaluate", "pictures"}
    assert rebuilt["pretrain"] == metrics["pretrain"]
    assert ("[demo] generate, evaluate, pictures: stored under other settings; now bound: "
            "generate_stage.rerank_samples = 3; no longer bound: "
            "generate_stage.rerank_samples = 2: building them again") in capsys.readouterr().out

    # Any other changed setting is refused before any stage runs (the stages would resume
    # from what the old one built), and config.gin stays the one they were built with; so
    # is a folder that holds what a demo does not write.
    config_gin = open(os.path.join(model_dir, "config.gin")).read()
    with open(os.path.join(tmp_path, "mine.txt"), "w") as f:
        f.write("not the demo's")
    for args in (_args(model_dir) + fewer + ["--gin.preprocess.image_first_prob=0.25"],
                 _args(str(tmp_path))):
        _main_here(args, status=2)
    printed = capsys.readouterr().err
    assert "holds stages built under another configuration (corpus" in printed
    assert "now bound: preprocess.image_first_prob = 0.25" in printed
    assert "holds what a demo does not write (demo, generated, mine.txt)" in printed
    assert open(os.path.join(model_dir, "config.gin")).read() == config_gin
    assert not os.path.exists(os.path.join(tmp_path, "config.gin"))


def test_a_host_without_a_compiler_stops_before_the_first_stage(monkeypatch, tmp_path):
    from cm3leon_jax.demo import run as demo
    from cm3leon_jax.model import cpu_kernels

    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("CM3LEON_JAX_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        gin.clear_config()
        demo._build_cpu_kernels()  # Neither the decoder nor the sampler uses the kernels.
        gin.parse_config("DecoderConfig.attention_impl = 'cpu'")
        with pytest.raises(cpu_kernels.KernelUnavailableError,
                           match=r"apt install g\+\+.*attention_impl = \"chunked\""):
            demo._build_cpu_kernels()
    finally:
        gin.clear_config()
        cpu_kernels._library.cache_clear()
