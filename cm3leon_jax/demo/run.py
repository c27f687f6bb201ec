"""The `demo` run mode: the whole flow, end to end, on the built-in corpus.

Each stage is an ordinary run mode of its own, called here with a sub-folder of
MODEL_DIR; gin binds their settings (gin_configs/runs/demo.gin). A finished stage is
reused on a rerun (demo/stages.py): an interrupted demo resumes where it stopped, and
`--gin.demo.start_over=True` builds everything again.

    MODEL_DIR/tfds/              the synthetic corpus (TFDS)
    MODEL_DIR/image_tokenizer/   the VQGAN, trained on the corpus' train images
    MODEL_DIR/retriever/         the CLIP retrieval encoder, trained on the same scenes
    MODEL_DIR/data/              vocab/ + tokenized shards with every document's
                                 neighbors + retrieval/ (bank, ScaNN index) +
                                 manifest.json (Beam, two passes)
    MODEL_DIR/pretrain/          the decoder: checkpoints, metrics.jsonl, TensorBoard
    MODEL_DIR/sft_data/          every SFT family's tokenized examples (Beam)
    MODEL_DIR/sft/               the decoder after a short SFT on the mixture
    MODEL_DIR/export/            the fine-tuned decoder as a self-contained params-only
                                 folder (bfloat16, vocabulary, image tokenizer, manifest):
                                 what `restore_decoder`, the generate run and serving load
    MODEL_DIR/eval/              the eval run's reports (pretrain/ and sft/: report.md,
                                 report.json, grids): VQA, edits, captions, graded exactly
    MODEL_DIR/pictures/          contact_sheet.png (look here first), generated.png,
                                 captioned.png, captions.json, corpus.png,
                                 reconstructions.png, generated.npz, evaluated.npz
    MODEL_DIR/stages/            each finished stage's result (what a rerun reuses)
    MODEL_DIR/metrics.json       what each stage measured, with its wall and CPU seconds

Stages of the flow that are not built yet are listed in metrics.json under
`not_yet` and printed at the end, so the demo never claims more than it did.

This module holds the run mode, its stages in order and the stages of a few lines each
(corpus, image tokenizer, retriever, pretrain, export, pictures); the package's other
modules hold the rest (`cm3leon_jax/demo/__init__.py` lists them).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax import xla_flags as xla_flags_lib
from cm3leon_jax.data import parse, preprocess, retrieval_pass, shards, synthetic_tfds
from cm3leon_jax.decode import pictures, restore
from cm3leon_jax.decode.generate import Generator
from cm3leon_jax.demo import apart
from cm3leon_jax.demo import evaluate as demo_evaluate
from cm3leon_jax.demo import finetune as demo_finetune
from cm3leon_jax.demo import generate as demo_generate
from cm3leon_jax.demo import sheet as demo_sheet
from cm3leon_jax.demo import stages as demo_stages
from cm3leon_jax.errors import ModelDirMismatchError, UserInputError
from cm3leon_jax.export import params_export
from cm3leon_jax.model import cpu_kernels
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.retrieval import clip_train
from cm3leon_jax.train import run_config, trainer
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab import image_tokenizer as image_tokenizer_lib
from cm3leon_jax.vocab import vqgan_train
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

NOT_YET = (
    "FID, CLIP score and CIDEr in the demo's eval stage (exact metrics only, to stay "
    "within the time budget): run gin_configs/runs/eval.gin on MODEL_DIR for them",
)
TIME_BUDGETS_S = (600, 1200)  # aimed for where measured; the bound
STAGES = ("corpus", "image_tokenizer", "retriever", "preprocess", "pretrain", "sft_data",
          "sft", "export", "generate", "evaluate", "pictures")
# What each stage writes that the later ones (or the person) read: a stored stage whose
# outputs are gone is built again (`StageRunner`).
OUTPUTS = {"corpus": ("tfds",), "image_tokenizer": ("image_tokenizer",),
           "retriever": ("retriever/encoder",), "preprocess": ("data/vocab", "data/retrieval"),
           "pretrain": ("pretrain/checkpoints",), "sft_data": ("sft_data",),
           "sft": ("sft/checkpoints",), "export": ("export/manifest.json",),
           "generate": ("pictures/generated.npz",),
           "evaluate": ("eval", "pictures/evaluated.npz"),
           "pictures": ("pictures/contact_sheet.png",)}

# The configurables each stage is the first to read: a changed binding of one of them
# leaves the stages before it as they were built (`demo_stages.stage_fingerprints`). A
# configurable not listed counts for every stage (tests/cli/test_demo_stages.py checks
# that no module an earlier stage runs names these).
FIRST_READ_BY = {"generate": ("generate_stage", "Generator", "SamplingConfig",
                              "images/SamplingConfig", "captions/SamplingConfig"),
                 "evaluate": ("evaluate_stage", "edits/SamplingConfig", "corpus_suite")}
# Stages that write their outputs whole each run, with nothing to resume from: stored
# under other settings, they are built again. Any other stage so stored is refused.
REBUILT_WHOLE = ("generate", "evaluate", "pictures")


@gin.configurable(denylist=["model_dir"])
def demo(model_dir: str,
         image_size: int = 32,
         split_sizes: dict | None = None,
         num_pictures: int = 16,
         parse_examples: int = 200,
         train_together: bool = True,
         start_over: bool = False,
         xla_flags: Sequence[str] = ()) -> dict:
    """Runs every stage that exists, in order; returns (and writes) the metrics.

    Args:
      model_dir: where everything goes (see the module docstring).
      image_size: side of the corpus images (the image tokenizer's size).
      split_sizes: corpus split sizes, e.g. {"train": 2000, ...}.
      num_pictures: images shown in each picture grid.
      parse_examples: test images scored by the exact parser.
      train_together: train the image tokenizer and the retriever at the same time (each
        needs only the corpus); False runs every stage after the one before.
      start_over: delete what an earlier run built in model_dir and build it again.
      xla_flags: XLA flags for every stage ("--xla_...=..."), added to $XLA_FLAGS before
        XLA starts (`xla_flags.py`); the stages' own processes inherit them.
    """
    added = xla_flags_lib.add(xla_flags, "demo.xla_flags")
    if added:
        print(f"[demo] XLA flags: {' '.join(added)}")
    if start_over:
        demo_stages.clear(model_dir)
    fs.makedirs(os.path.join(model_dir, "stages"))  # What marks the folder as a demo's.
    _build_cpu_kernels()
    earlier = demo_stages.earlier_work(model_dir)  # What the time targets must not count.
    # The stages' progress lines (VQGAN and retriever steps, Beam shards) are INFO logs.
    logging.getLogger("cm3leon_jax").setLevel(logging.INFO)
    config = gin.config_str()
    runner = demo_stages.StageRunner(
        model_dir, list(STAGES), demo_stages.stage_fingerprints(config, list(STAGES),
                                                                FIRST_READ_BY),
        also_accepted=(demo_stages.fingerprint(config), demo_stages.earlier_fingerprint(config)),
        outputs=OUTPUTS)
    _check_stages_of_another_config(runner, model_dir)
    try:
        _run_stages(runner, model_dir, image_size, split_sizes, num_pictures,
                    parse_examples, train_together)
    except demo_stages.PreemptedError as stopped:
        # A trainer saved its state on SIGTERM; the stages before it are stored.
        again = ("the same command" if not start_over
                 else "it without --gin.demo.start_over=True")  # Which would clear it again.
        print(f"[demo] stopped in the {stopped} stage by SIGTERM; rerun {again} to resume it")
        return {"preempted": str(stopped), **runner.timings()}
    return _report(model_dir, runner, earlier)


def _check_stages_of_another_config(runner: demo_stages.StageRunner, model_dir: str) -> None:
    """Stages stored under other settings: those that write their outputs whole
    (`REBUILT_WHOLE`) are said and built again; any other would resume from what the old
    settings built (checkpoints, shards, a vocabulary) while the new ones are reported, so
    it is refused, with the settings that changed, before any stage runs."""
    stale = runner.built_by_another_config()
    if not stale:
        return
    changed = _changed_settings(model_dir)
    if all(name in REBUILT_WHOLE for name in stale):
        print(f"[demo] {', '.join(stale)}: stored under other settings{changed}: building "
              f"{'it' if len(stale) == 1 else 'them'} again")
        return
    raise ModelDirMismatchError(
        f"demo MODEL_DIR {model_dir!r} holds stages built under another configuration "
        f"({', '.join(stale)}{changed}); they would be reused as they are. Rerun with "
        "--gin.demo.start_over=True to build everything again, rerun with the earlier "
        "settings, or give another MODEL_DIR.")


def _changed_settings(model_dir: str) -> str:
    """"; now bound: ...; no longer bound: ..." against the latest earlier config file, or ""."""
    earlier = sorted(fs.glob(os.path.join(model_dir, "config.*.gin")),
                     key=lambda p: int(p.rsplit(".", 2)[-2]))
    if not earlier:
        return ""
    then = demo_stages.config_lines(fs.read_text(earlier[-1]))
    now = demo_stages.config_lines(gin.config_str())

    def listed(lines: list[str]) -> str:
        return "; ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
    added = [x for x in now if x.strip() and x not in set(then) and not x.startswith("#")]
    gone = [x for x in then if x.strip() and x not in set(now) and not x.startswith("#")]
    return "".join([f"; now bound: {listed(added)}" if added else "",
                    f"; no longer bound: {listed(gone)}" if gone else ""])


def _preflight(model_dir: str) -> None:
    """`main.run` calls this before it writes config.gin: a folder holding what a demo does
    not write is refused (the demo's stages would write beside it, and start_over, though it
    deletes only the demo's own entries, is for a folder of the demo's own), and so are
    the late stages' settings that could not work (generate, evaluate)."""
    foreign = demo_stages.foreign_entries(model_dir)
    if foreign:
        raise UserInputError(
            f"demo MODEL_DIR {model_dir!r} holds what a demo does not write ("
            f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): give the demo a "
            "folder of its own, e.g. runs/demo.")
    demo_generate.check_settings()
    demo_evaluate.check_settings()


demo.preflight = _preflight


def _build_cpu_kernels() -> None:
    """The decoder trains and samples with the C++ CPU kernels (gin_configs/train/demo.gin,
    runs/demo.gin): build them before the first stage, so that a host without a compiler
    stops now with what to do, not after the image tokenizer's minutes."""
    sampler = gin.get_bindings(Generator).get("cpu_kernels", False)
    if DecoderConfig().attention_impl == "cpu" or sampler:
        cpu_kernels.build()


def _run_stages(runner: demo_stages.StageRunner, model_dir: str, image_size: int,
                split_sizes: dict | None, num_pictures: int, parse_examples: int,
                train_together: bool) -> None:
    """Every stage in order (see the module docstring), through `runner`."""
    # The corpus' builder arguments (JSON values: a stage in its own process takes them too).
    corpus = dict(image_size=image_size, data_dir=os.path.join(model_dir, "tfds"),
                  split_sizes=split_sizes)
    builder_fn = functools.partial(preprocess.synthetic_builder, **corpus)
    vq_dir = os.path.join(model_dir, "image_tokenizer")
    tokenizer_fn = functools.partial(image_tokenizer_lib.load_image_tokenizer, checkpoint=vq_dir)
    retriever_dir = os.path.join(model_dir, "retriever")
    data_dir = os.path.join(model_dir, "data")
    pretrain_dir = os.path.join(model_dir, "pretrain")
    pictures_dir = os.path.join(model_dir, "pictures")

    runner.run("corpus", lambda: corpus_stage(builder_fn, parse_examples), _say_corpus)
    _train_tokenizer_and_retriever(runner, vq_dir, retriever_dir, train_together, corpus)
    retrieval = retrieval_pass.RetrievalConfig(
        encoder_dir=os.path.join(retriever_dir, "encoder"))
    runner.run("preprocess", lambda: preprocess.preprocess(
        data_dir, source=preprocess.TfdsSource(builder_fn),
        image_tokenizer_fn=tokenizer_fn, retrieval=retrieval), _say_preprocess)
    runner.run("pretrain", lambda: pretrain_stage(pretrain_dir, data_dir), _say_pretrain)
    # After pretraining, not beside it: the decoder's step keeps both cores busy, and
    # run beside it (2 Dec) the shards took 77 s while pretraining ran at half its rate.
    runner.run("sft_data", lambda: demo_finetune.sft_data_stage(
        model_dir, data_dir, tokenizer_fn, image_size), _say_sft_data)
    runner.run("sft", lambda: demo_finetune.sft_stage(
        model_dir, pretrain_dir, data_dir, tokenizer_fn, image_size), demo_finetune.summary)
    runner.run("export", lambda: export_stage(
        os.path.join(model_dir, "export"), os.path.join(model_dir, "sft"),
        os.path.join(data_dir, "vocab"), vq_dir), _say_export)
    runner.run("generate", lambda: demo_generate.generate_stage(
        pictures_dir, pretrain_dir, data_dir, builder_fn(), tokenizer_fn()),
        demo_generate.summary)
    runner.run("evaluate", lambda: demo_evaluate.evaluate_stage(
        os.path.join(model_dir, "eval"), pictures_dir,
        {"pretrain": pretrain_dir, "sft": os.path.join(model_dir, "sft")},
        os.path.join(data_dir, "vocab"), tokenizer_fn(), os.path.join(data_dir, "retrieval")),
        demo_evaluate.summary)
    runner.run("pictures", lambda: pictures_stage(
        builder_fn(), tokenizer_fn(), data_dir, pictures_dir, num_pictures),
        lambda r: f"look at {r['contact_sheet']}")


def _train_tokenizer_and_retriever(runner: demo_stages.StageRunner, vq_dir: str,
                                   retriever_dir: str, together: bool, corpus: dict) -> None:
    """The image tokenizer and the retriever: both read only the corpus (`corpus`: its
    `synthetic_builder` arguments). Together they keep the two cores busier
    than either alone (the README's stage table says what each took), each in a process of
    its own with freed host memory kept there (demo/apart.py says why); else one after
    the other in this process."""
    if together:
        runner.run_together([
            ("image_tokenizer", lambda: apart.run(
                "cm3leon_jax.demo.run:image_tokenizer_from_corpus", {"out_dir": vq_dir, **corpus},
                "image_tokenizer"), _say_image_tokenizer),
            ("retriever", lambda: apart.run(
                "cm3leon_jax.demo.run:retriever_stage", {"out_dir": retriever_dir}, "retriever"),
             _say_retriever)])
        return
    runner.run("image_tokenizer", lambda: image_tokenizer_from_corpus(vq_dir, **corpus),
               _say_image_tokenizer)
    runner.run("retriever", lambda: retriever_stage(retriever_dir), _say_retriever)


def _report(model_dir: str, runner: demo_stages.StageRunner, earlier: list[str]) -> dict:
    """metrics.json (every stage's result, times, targets reached or not) and the closing
    lines of the log; returns the metrics. `earlier`: what MODEL_DIR held before the run."""
    metrics = dict(runner.results)
    metrics.update(runner.timings())
    metrics["earlier_work"] = earlier
    metrics["not_yet"] = list(NOT_YET)
    metrics["targets"] = (demo_generate.targets_report(metrics.get("generate", {})) +
                          demo_evaluate.targets_report(metrics.get("evaluate", {})) +
                          _time_target(metrics))
    with fs.open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(demo_stages.jsonable(metrics), f, indent=2, sort_keys=True)
    print(f"[demo] wrote {model_dir}/metrics.json; contact sheet: "
          f"{metrics['pictures']['contact_sheet']}; eval reports: {model_dir}/eval/*/report.md")
    print(f"[demo] {metrics['total_seconds']} s in all ({metrics['total_cpu_seconds']} s CPU, "
          f"load average {os.getloadavg()[0]:.1f})")
    for line in metrics["targets"]:
        print(f"[demo] {line}")
    if runner.reused:
        print(f"[demo] reused from an earlier run: {', '.join(runner.reused)} "
              "(--gin.demo.start_over=True builds everything again)")
    print("[demo] not built yet:\n  - " + "\n  - ".join(NOT_YET))
    return metrics


def _time_target(metrics: dict) -> list[str]:
    """The issue's time budget: every stage together within 20 minutes on a fresh machine of
    this kind, so at most 10 where it is measured (machines of the kind differ about 2x).
    Reused work makes the total meaningless, so only a run that started from an empty
    MODEL_DIR is judged: a rerun reuses finished stages and resumes an interrupted one from
    its checkpoints and shards (a changed configuration is refused before any stage runs)."""
    if metrics["reused_stages"] or metrics["earlier_work"]:
        found = ", ".join(metrics["earlier_work"][:4]) or "stage results"
        return [f"time targets not judged: MODEL_DIR held an earlier run's work ({found}); "
                "--gin.demo.start_over=True times a run from scratch"]
    total = metrics["total_seconds"]  # Wall time: stages run together overlap.
    return [f"target every stage within {budget // 60} minutes: {total / 60:.1f} min "
            f"({'reached' if total <= budget else 'NOT reached'}; load average "
            f"{os.getloadavg()[0]:.1f} at the end)" for budget in TIME_BUDGETS_S]


def export_stage(out_dir: str, sft_dir: str, vocab_dir: str, image_tokenizer_dir: str) -> dict:
    """The fine-tuned decoder's newest checkpoint as a params-only export in bfloat16, with
    its vocabulary and image tokenizer (`export/params_export.py`, as the export run file
    makes one), then read back and compared with the checkpoint cast to bfloat16."""
    manifest = params_export.export(out_dir, checkpoint=sft_dir, output_dir=out_dir,
                                    layout="params", dtype="bfloat16",
                                    vocab_dir=vocab_dir, image_tokenizer_dir=image_tokenizer_dir,
                                    overwrite=True, shard=False)
    _, trained, step = restore.restore_decoder(sft_dir)
    _, exported, exported_step = restore.restore_decoder(out_dir)
    differ = _differing(trained, exported)
    if differ or exported_step != step:
        raise RuntimeError(f"the export {out_dir} does not read back as step {step} of "
                           f"{sft_dir} in bfloat16 (differs: {differ[:3]}, step "
                           f"{exported_step}); delete it and rerun the demo.")
    return {"dir": out_dir, "step": step, "dtype": manifest["dtype"],
            "parameters": sum(int(x.size) for x in jax.tree.leaves(exported)),
            "bytes": sum(f["bytes"] for f in manifest["files"].values()),
            "files": len(manifest["files"])}


def _differing(trained, exported) -> list[str]:
    """Leaves that are in one tree only, or not `trained` cast to bfloat16 bit for bit."""
    want = dict(jax.tree_util.tree_leaves_with_path(trained))
    got = dict(jax.tree_util.tree_leaves_with_path(exported))
    return [jax.tree_util.keystr(path) for path in {**want, **got}
            if path not in want or path not in got or not np.array_equal(
                np.asarray(want[path].astype(jnp.bfloat16)).view(np.uint16),
                np.asarray(got[path]).view(np.uint16))]


def _say_export(result: dict) -> str:
    return (f"step {result['step']}, {result['parameters']:,} parameters in {result['dtype']}, "
            f"{result['bytes'] / 2 ** 20:.1f} MiB in {result['files']} files, read back exactly: "
            f"{result['dir']}")


def corpus_stage(builder_fn, parse_examples: int) -> dict:
    """Builds the corpus; scores the exact parser on test images."""
    builder = builder_fn()
    ds = builder.as_dataset(split=f"test[:{parse_examples}]")
    correct = 0
    n = 0
    for ex in ds.as_numpy_iterator():
        scene = synthetic_tfds.shapes.Scene.from_json(ex["scene"].decode())
        correct += parse.match(parse.parse_image(ex["image"]), scene, exact=True)["all_correct"]
        n += 1
    return {"splits": {k: v.num_examples for k, v in builder.info.splits.items()},
            "parser_exact_accuracy": correct / max(n, 1), "parser_examples": n}


def image_tokenizer_stage(out_dir: str, builder) -> dict:
    """Trains the VQGAN (settings from gin) on the corpus' own train images.

    The images are read once from the corpus (rendering fresh scenes for every batch
    costs more CPU than the small VQGAN's step); index i is train image i mod n.
    """
    images = np.stack([ex["image"] for ex in builder.as_dataset(split="train")
                       .as_numpy_iterator()])
    return vqgan_train.train_image_tokenizer(
        model_dir=out_dir, image_source=lambda i: images[i % len(images)])


def image_tokenizer_from_corpus(out_dir: str, **corpus) -> dict:
    """`image_tokenizer_stage` on the demo's corpus, named by `synthetic_builder`'s
    arguments as JSON values (what `apart.run` passes to a stage's own process)."""
    return image_tokenizer_stage(out_dir, preprocess.synthetic_builder(**corpus))


def retriever_stage(out_dir: str) -> dict:
    """Trains the CLIP encoder (train_retriever's settings and pairs come from gin) unless it
    exists."""
    metrics_path = os.path.join(out_dir, "retriever_metrics.json")
    if fs.exists(metrics_path):
        with fs.open(metrics_path) as f:
            return json.load(f)
    return clip_train.train_retriever(out_dir)


def pretrain_stage(out_dir: str, data_dir: str) -> dict:
    """Pretrains the decoder (settings: gin) on the demo's data.

    Resumes from the newest checkpoint, so a finished run only reloads and evaluates.
    """
    with gin.unlock_config():  # The tasks read the demo's own data folder.
        gin.bind_parameter("data_dirs.synthetic", data_dir)
    # The run's own config.gin, as `main.run` writes one: generate, eval, export and sft
    # runs on this folder read the decoder's sizes from it (train/run_config.py).
    run_config.write(out_dir)
    result = trainer.train(out_dir)
    # A resumed run logs again the steps after its checkpoint: the latest entry counts.
    train_log, eval_log = {}, {}
    with fs.open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "loss" in entry:
                train_log[entry["step"]] = entry["loss"]
            if "eval/loss" in entry:
                eval_log[entry["step"]] = entry["eval/loss"]
    losses, evals = sorted(train_log.items()), sorted(eval_log.items())
    return {"steps": result["step"], "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "eval_loss": evals, "final_eval": result["eval"],
            **({"preempted": True} if result.get("preempted") else {})}


def pictures_stage(builder, image_tokenizer, data_dir: str, out_dir: str,
                   num_pictures: int) -> dict:
    """The contact sheet, corpus samples with captions, originals over VQ reconstructions."""
    fs.makedirs(out_dir)
    test = list(builder.as_dataset(split=f"test[:{num_pictures}]").as_numpy_iterator())
    images = np.stack([ex["image"] for ex in test])
    captions = [ex["captions"][0].decode() for ex in test]
    pictures.grid(images, captions, os.path.join(out_dir, "corpus.png"))
    recon = image_tokenizer.reconstruct(images)
    pictures.grid(np.concatenate([images, recon]), None,
                  os.path.join(out_dir, "reconstructions.png"), columns=num_pictures)
    psnr = float(vqgan_train.psnr(image_tokenizer_lib.images_to_model(images),
                                  image_tokenizer_lib.images_to_model(recon)))
    # A document from the tokenized shards, decoded back, proves the id layout.
    vocab = MultimodalVocabulary(os.path.join(data_dir, "vocab"))
    record = next(shards.read_split(data_dir, "test").as_numpy_iterator())
    doc = document_lib.decode(record["ids"], vocab)
    lengths = [r["ids"].size for r in shards.read_split(data_dir, "train")
               .take(500).as_numpy_iterator()]
    sheet = demo_sheet.write(demo_generate.sheet_sections(out_dir) +
                             demo_evaluate.sheet_sections(out_dir),
                             os.path.join(out_dir, "contact_sheet.png"),
                             title="cm3leon-jax demo: held-out scenes (green: right, red: wrong)")
    return {"reconstruction_psnr_db": psnr,
            "vocab_size": vocab.vocab_size,
            "tokens_per_document_mean": float(np.mean(lengths)),
            "example_document": vocab.render(record["ids"]),
            "example_document_texts": doc.texts,
            "contact_sheet": sheet}


def _say_corpus(r: dict) -> str:
    return f"splits {r['splits']}, parser exact on {r['parser_exact_accuracy']:.0%} of test images"


def _say_image_tokenizer(r: dict) -> str:
    return (f"PSNR {r.get('eval/psnr', float('nan')):.1f} dB, "
            f"{r.get('eval/code_usage', float('nan')):.0%} of codes used")


def _say_retriever(r: dict) -> str:
    return (f"text->image recall@1 {r.get('text_to_image_recall@1', float('nan')):.2f}, "
            f"recall@5 {r.get('text_to_image_recall@5', float('nan')):.2f}")


def _say_preprocess(r: dict) -> str:
    train = r["splits"]["train"]
    neighbors = r.get("retrieval", {}).get("splits", {}).get("train", {})
    return (f"{train['written']} train documents, "
            f"{neighbors.get('mean_neighbors', 0):.1f} neighbors each")


def _say_sft_data(r: dict) -> str:
    return f"{sum(r.values())} training examples in {len(r)} instruction families"


def _say_pretrain(r: dict) -> str:
    loss = r["final_eval"].get("loss")
    return f"{r['steps']} steps, held-out loss {loss:.3f}" if loss is not None else \
        f"{r['steps']} steps"
