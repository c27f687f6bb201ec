"""Pretrained demo decoders side by side: text -> image and captions on validation scenes.

    python benchmarks/demo_decoders.py --run=runs/demo \
        --decoder places=runs/demo/pretrain --decoder plain=runs/plain/pretrain \
        --seeds 0 1 2 [--examples=200] [--json=out.json] [--reads-only]

Every decoder is read with the rest of one demo run (`--run`: its corpus, vocabulary,
image tokenizer and retrieval index), so the decoders must have been trained on that
run's data, or on a run whose text vocabulary is byte for byte the same (a decoder served
with another run's retriever, as RESULTS_retrieval.md does). Both use the run's own
generate-stage settings, read from its `config.gin` (the demo's: 2 retrieved documents,
CFG 1.5 with the documents in its unconditional stream too, top-p 0.6, the best of 8
samples by CLIP score; greedy captions from an image-first prompt; `--num-retrieved`,
`--rerank-samples`, `--image-sampling` and `--guidance-keeps-documents` /
`--guidance-drops-documents` change them); text ->
image runs again with k = 0, and with `--circle-negatives` once more with negative captions
(`Generator.text_to_image(negative_captions=)`, `SamplingConfig.negative_scale`): each
caption with every shape named a circle and a circle a square, what this decoder draws
when it has not read a shape.
Scores are the shape parser's exact ones
(`evaluation/shapes_scores.py`). Each cell is the mean over the seeds with the range
beside it. The last row is the run's retrieval alone, no decoder: each caption's top
retrieved document's image and each image's top retrieved document's caption, what a
decoder that only copied its best document would score. Below the tables: how often the
kept sample is right beside the first, the average and the best sample (re-ranking), and,
per shape class, how often an asked shape is drawn right and what share of all drawn
objects parse as that class; and what each decoder reads from a caption by its own
likelihood (`read_out`: does the true caption make the true image likelier than the
caption with a class or a color swapped?), which `--reads-only` measures alone, in
seconds, to screen decoders before sampling from them. The scenes are the run's
**validation** split by default: choose settings there, and keep the test split for the
demo's held-out figures.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reporting import write_json  # noqa: E402

T2I = ("objects_right", "any_object_right", "colors_right", "classes_right")
CAPTIONS = ("objects_right", "any_object_right")


def _scenes(run: str, split: str, n: int, image_size: int):
    """The run's corpus (the split sizes its corpus stage recorded in metrics.json)."""
    import json

    from cm3leon_jax.data import preprocess, synthetic_tfds

    with open(os.path.join(run, "metrics.json")) as f:
        sizes = json.load(f)["corpus"]["splits"]
    builder = preprocess.synthetic_builder(image_size=image_size,
                                           data_dir=os.path.join(run, "tfds"), split_sizes=sizes)
    examples = list(builder.as_dataset(split=f"{split}[:{n}]").as_numpy_iterator())
    if len(examples) < n:
        raise SystemExit(f"--examples={n}: the {split} split of {run} has {len(examples)}.")
    scenes = [synthetic_tfds.shapes.Scene.from_json(e["scene"].decode()) for e in examples]
    return examples, scenes


# generate_stage's arguments that decide what it draws and writes; then its retrieval rules
# and whether its guidance kept the documents (`Generator.guidance_keeps_documents`).
STAGE_SETTINGS = ("num_retrieved", "image_sampling", "caption_sampling", "caption_style",
                  "max_caption_tokens", "rerank_samples")
SETTINGS = STAGE_SETTINGS + ("selection", "keeps_documents")


def generate_settings(run: str) -> dict:
    """The run's generate-stage settings (`SETTINGS`), as its `config.gin` binds them, the
    stage's defaults where it binds nothing; `selection` is the retrieval rules its
    generate stage searched with (`Retriever.open`'s, with the run's `SelectionConfig`
    bindings); `keeps_documents` its `Generator.guidance_keeps_documents`."""
    import inspect

    import gin

    from cm3leon_jax.decode.generate import Generator
    from cm3leon_jax.demo import generate as demo_generate
    from cm3leon_jax.retrieval.retriever import Retriever
    from cm3leon_jax.retrieval.select import SelectionConfig

    gin.parse_config_file(os.path.join(run, "config.gin"), skip_unknown=True)
    try:
        params = inspect.signature(demo_generate.generate_stage).parameters
        bound = gin.get_bindings(demo_generate.generate_stage)
        keeps = gin.get_bindings(Generator).get("guidance_keeps_documents", False)
        return {**{name: bound.get(name, params[name].default) for name in STAGE_SETTINGS},
                "selection": SelectionConfig(k=Retriever.DEFAULT_K), "keeps_documents": keeps}
    finally:  # The run's DecoderConfig bindings would otherwise be checked against each
        gin.clear_config()  # --decoder's own config.gin, and one of another size refused.


def override_settings(settings: dict, *, rerank_samples: int | None = None,
                      num_retrieved: int | None = None,
                      keeps_documents: bool | None = None) -> dict:
    """`settings` with the counts and the guidance's documents given on the command line
    (None: the run's), checked."""
    out = dict(settings)
    if keeps_documents is not None:
        out["keeps_documents"] = keeps_documents
    if rerank_samples is not None:
        if rerank_samples < 1:
            raise SystemExit(f"--rerank-samples={rerank_samples}: give 1 or more.")
        out["rerank_samples"] = rerank_samples
    if num_retrieved is not None:
        if num_retrieved < 1:
            raise SystemExit(f"--num-retrieved={num_retrieved}: give 1 or more (the k = 0 "
                             "columns are measured in every run).")
        out["num_retrieved"] = num_retrieved
    return out


CIRCLE_NEGATIVES = {**{kind: "circle" for kind in ("square", "triangle", "star", "hexagon",
                                                   "diamond")}, "circle": "square"}


def measure(run: str, decoder_dir: str, tokenizer, examples, scenes, seeds: list[int],
            settings: dict, variants: dict | None = None, query_order: bool = False) -> dict:
    """{label: {"text_to_image": {"k<n>"|"k0": {metric: [per seed]}}, "rerank": {...},
    "captions": {metric: value}}} with `generate_settings`' settings, text -> image once
    per image sampling in `variants` (label -> SamplingConfig, or (SamplingConfig, True)
    for it with `CIRCLE_NEGATIVES`' negative captions; default {"": the run's}),
    the decoder loaded and the captions written once; `query_order`: retrieved documents
    in the prompt's order (`Generator.neighbors_in_query_order`)."""
    import numpy as np

    from cm3leon_jax.decode import rerank, restore
    from cm3leon_jax.decode.generate import Generator
    from cm3leon_jax.evaluation import shapes_scores
    from cm3leon_jax.retrieval.retriever import Retriever
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

    config, params, step = restore.restore_decoder(decoder_dir)
    retriever = Retriever.open(os.path.join(run, "data", "retrieval"), settings["selection"])
    gen = Generator(config, params, MultimodalVocabulary(os.path.join(run, "data", "vocab")),
                    tokenizer, retriever, batch_size=32, neighbors_in_query_order=query_order,
                    guidance_keeps_documents=settings["keeps_documents"])
    ranker = rerank.ClipRanker(retriever.encoder) if settings["rerank_samples"] > 1 else None
    written = gen.image_to_text(np.stack([e["image"] for e in examples]),
                                num_retrieved=settings["num_retrieved"],
                                sampling=settings["caption_sampling"],
                                max_tokens=settings["max_caption_tokens"],
                                style=settings["caption_style"], seed=0)
    scores = shapes_scores.caption_metrics(written, scenes)
    captions = {m: float(scores[m]) for m in CAPTIONS}
    variants = variants or {"": settings["image_sampling"]}
    return {label: {"step": step, "captions": captions,
                    **_text_to_image(gen, ranker, examples, scenes, seeds, settings, sampling)}
            for label, sampling in variants.items()}


def _text_to_image(gen, ranker, examples, scenes, seeds: list[int], settings: dict,
                   sampling) -> dict:
    """`measure`'s text -> image part for one image sampling (None: SamplingConfig();
    (sampling, True): with circle negatives)."""
    import numpy as np

    from cm3leon_jax.decode import rerank
    from cm3leon_jax.decode.generate import SamplingConfig
    from cm3leon_jax.evaluation import shapes_scores

    samples = settings["rerank_samples"]
    captions = [e["captions"][0].decode() for e in examples]
    sampling, negative = sampling if isinstance(sampling, tuple) else (sampling, False)
    negatives = ([shapes_scores.renamed_classes(c, CIRCLE_NEGATIVES) for c in captions]
                 if negative else None)
    sampling = sampling or SamplingConfig()
    out = {"text_to_image": {}, "rerank": {}, "by_class": {}}
    for k in dict.fromkeys((settings["num_retrieved"], 0)):  # once if the run uses k = 0
        per_seed = {m: [] for m in T2I}
        picks = {m: [] for m in PICKS}
        by_class = {}
        for seed in seeds:
            drawn = gen.text_to_image(captions, num_retrieved=k, sampling=sampling, seed=seed,
                                      num_samples=samples, negative_captions=negatives)
            rows = [shapes_scores.image_metrics(im, scenes[i // samples])
                    for i, im in enumerate(drawn.images)]
            kept = (np.zeros(len(scenes), int) if ranker is None
                    else rerank.keep_best(drawn, samples, ranker).kept)
            scores = [rows[i * samples + j] for i, j in enumerate(kept)]
            for m in T2I:
                per_seed[m].append(float(np.mean([r[m] for r in scores])))
            for m, value in pick_rates(rows, samples, kept).items():
                picks[m].append(value)
            kept_images = drawn.images[np.arange(len(scenes)) * samples + kept]
            for kind, row in shapes_scores.class_metrics(kept_images, scenes).items():
                for m, value in row.items():
                    by_class.setdefault(kind, {}).setdefault(m, []).append(value)
        out["text_to_image"][f"k{k}"] = per_seed
        out["rerank"][f"k{k}"] = picks
        out["by_class"][f"k{k}"] = by_class
    return out


PICKS = ("kept", "first", "mean", "best")


def pick_rates(rows, samples: int, kept) -> dict[str, float]:
    """How often the kept sample holds exactly the caption's objects, beside the first
    sample, the average sample and the best of the `samples` (what a perfect ranker
    would keep). rows: `image_metrics` of every sample, prompt-major."""
    import numpy as np

    right = np.asarray([r["objects_right"] for r in rows], float).reshape(-1, samples)
    return {"kept": float(right[np.arange(len(right)), kept].mean()),
            "first": float(right[:, 0].mean()), "mean": float(right.mean()),
            "best": float(right.max(axis=1).mean())}


READS = ("class", "color")


def read_out(run: str, decoder_dir: str, tokenizer, examples) -> dict:
    """What the decoder reads from a caption, by its own likelihood: for each scene's true
    image (its VQ codes after the bare prompt `caption <break>`), how often the true
    caption makes it likelier than every caption with one object's class (color) put in
    another's place (`likelihood.ranked_first`), beside the chance of that, 1 / the number
    of captions compared. A decoder that draws a class must read it; this takes seconds
    where drawing takes minutes. No retrieved documents: chosen by the true caption, they
    would show the answer whatever the caption says."""
    import numpy as np

    from cm3leon_jax.data import shapes_language
    from cm3leon_jax.decode import prompts, restore
    from cm3leon_jax.evaluation import likelihood
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

    config, params, step = restore.restore_decoder(decoder_dir)
    vocab = MultimodalVocabulary(os.path.join(run, "data", "vocab"))
    codes = tokenizer.encode(tokenizer.preprocess(np.stack([e["image"] for e in examples])))
    targets = [vocab.layout.codes_to_ids(c) for c in codes]
    out = {"step": step}
    for what in READS:
        sets = [[prompts.text_to_image(np.asarray(vocab.encode(text), np.int32))
                 for text in shapes_language.swapped_captions(e["captions"][0].decode(), what)]
                for e in examples]
        # A caption that names no object in the corpus' phrasing has nothing to swap.
        kept = [i for i, s in enumerate(sets) if len(s) > 1]
        if not kept:
            raise SystemExit(f"read_out: no caption of {run} names a {what} to swap.")
        first = likelihood.ranked_first(config, params, [sets[i] for i in kept],
                                        [targets[i] for i in kept])
        out[what] = float(first.mean())
        out[f"{what}_chance"] = float(np.mean([1 / len(sets[i]) for i in kept]))
        out[f"{what}_scenes"] = len(kept)
    return out


def reads_table(results: dict) -> str:
    """`read_out`'s rates per decoder, each beside its chance."""
    lines = ["What each decoder reads (its likelihood of the true image, the true caption "
             "against captions with one object's class / color swapped):", "",
             "| decoder | step | " + " | ".join(f"{w} read (chance)" for w in READS) + " |",
             "|---|---|" + "---|" * len(READS)]
    for name, r in results.items():
        if "reads" in r:
            cells = [f"{r['reads'][w]:.1%} ({r['reads'][w + '_chance']:.1%})" for w in READS]
            lines.append(f"| {name} | {r['reads']['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RETRIEVAL_ROW = "top retrieved document alone"


def retrieval_alone(run: str, tokenizer, examples, scenes, settings: dict) -> dict:
    """The run's retrieval without a decoder, in `measure`'s layout (one value, no k = 0):
    the top document retrieved for each caption (its image) and for each image (its
    caption), as the generate stage's `top_retrieved_reference` scores them."""
    import numpy as np

    from cm3leon_jax.demo import generate as demo_generate
    from cm3leon_jax.retrieval.retriever import Retriever
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

    k = max(settings["num_retrieved"], 1)
    scores, _, _ = demo_generate.retrieval_reference(
        Retriever.open(os.path.join(run, "data", "retrieval"), settings["selection"]),
        MultimodalVocabulary(os.path.join(run, "data", "vocab")), tokenizer,
        [e["captions"][0].decode() for e in examples],
        np.stack([e["image"] for e in examples]), scenes, k)
    return {"step": "-",
            "text_to_image": {f"k{settings['num_retrieved']}": {
                m: [float(scores["text_to_image"][m])] for m in T2I}},
            "captions": {m: float(scores["image_to_text"][m]) for m in CAPTIONS}}


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1 or max(values) == min(values):
        return f"{mean:.1%}"
    return f"{mean:.1%} ({min(values):.1%}-{max(values):.1%})"


def table(results: dict) -> str:
    ks = list(next(iter(results.values()))["text_to_image"])  # e.g. ["k2", "k0"]
    cols = [f"t2i k={k[1:]} {m}" for k in ks for m in T2I] + [f"captions {m}"
                                                             for m in CAPTIONS]
    lines = ["| decoder | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():  # A row without a k (retrieval alone) shows "-" there.
        cells = [_cell(r["text_to_image"][k][m]) if k in r["text_to_image"] else "-"
                 for k in ks for m in T2I]
        cells += [_cell([r["captions"][m]]) for m in CAPTIONS]
        lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_variant(text: str, settings: dict):
    """'name=field:value,...' -> (name, the run's image SamplingConfig with those fields)."""
    import dataclasses

    from cm3leon_jax.decode.generate import SamplingConfig

    name, _, fields = text.partition("=")
    base = settings["image_sampling"] or SamplingConfig()
    types = {f.name: f.type for f in dataclasses.fields(SamplingConfig)}
    bools = {"true": True, "1": True, "false": False, "0": False}
    convert = {"bool": bools.__getitem__, "int": int, "float": float, "str": str}
    changes = {}
    for item in fields.split(","):
        field, _, value = item.partition(":")
        kind = getattr(types.get(field), "__name__", types.get(field))
        try:
            if not name or kind not in convert or not value:
                raise ValueError(item)
            changes[field] = convert[kind](value.lower() if kind == "bool" else value)
        except (KeyError, ValueError):
            raise SystemExit(f"--image-sampling {text!r}: give NAME=FIELD:VALUE,... with FIELD "
                             f"one of {sorted(types)} and a value of its type.") from None
    return name, dataclasses.replace(base, **changes)


def rerank_table(results: dict, samples: int) -> str:
    """Exactly right: the kept sample, the first, the average one and the best of each
    caption's `samples` (a perfect ranker), per decoder and k."""
    lines = [f"Re-ranking {samples} samples (exactly the caption's objects):", "",
             "| decoder | k | " + " | ".join(PICKS) + " |", "|---|---|" + "---|" * len(PICKS)]
    for name, r in results.items():
        for k, picks in r.get("rerank", {}).items():
            lines.append(f"| {name} | {k[1:]} | "
                         + " | ".join(_cell(picks[m]) for m in PICKS) + " |")
    return "\n".join(lines) + "\n"


def class_table(results: dict) -> str:
    """Per shape class (`shapes_scores.class_metrics` of the kept images): how often an
    asked shape is drawn right, and the share of the drawn objects that parse as it."""
    kinds = list(dict.fromkeys(kind for r in results.values()
                               for rows in r.get("by_class", {}).values() for kind in rows))
    lines = ["Per shape class, the kept images: drawn right when asked / share of all drawn "
             "objects:", "", "| decoder | k | " + " | ".join(kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for name, r in results.items():
        for k, rows in r.get("by_class", {}).items():
            cells = [f"{_cell(rows[kind]['drawn_right'])} / {_cell(rows[kind]['drawn_share'])}"
                     if "drawn_right" in rows.get(kind, {}) else "-" for kind in kinds]
            lines.append(f"| {name} | {k[1:]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished demo run (MODEL_DIR)")
    p.add_argument("--decoder", action="append", required=True,
                   help="name=folder of a pretrained decoder (repeat)")
    p.add_argument("--query-order", nargs="*", default=[], metavar="NAME",
                   help="decoders to serve with their retrieved documents in the prompt's "
                        "order (those pretrained with retrieval_augment."
                        "neighbors_in_query_order)")
    p.add_argument("--image-sampling", action="append", default=[], metavar="NAME=F:V,...",
                   help="a variant of the run's text -> image sampling, e.g. "
                        "'t07=temperature:0.7,top_p:0.95' (repeat; each decoder is measured "
                        "with the run's own settings and with every variant)")
    p.add_argument("--circle-negatives", action="store_true",
                   help="measure every image sampling again with negative captions that "
                        "name each shape a circle (a circle a square); its negative_scale "
                        "is the sampling's (set it with --image-sampling)")
    p.add_argument("--rerank-samples", type=int, default=None,
                   help="samples per caption for CLIP re-ranking (default: the run's)")
    keeps = p.add_mutually_exclusive_group()
    keeps.add_argument("--guidance-keeps-documents", action="store_true",
                       help="keep the retrieved documents in CFG's unconditional stream "
                            "(Generator.guidance_keeps_documents; default: the run's)")
    keeps.add_argument("--guidance-drops-documents", action="store_true",
                       help="drop them there (default: the run's)")
    p.add_argument("--num-retrieved", type=int, default=None,
                   help="retrieved documents per prompt, 1 or more (default: the run's; "
                        "k = 0 is always measured beside it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", default="validation")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--reads-only", action="store_true",
                   help="only what each decoder reads (`read_out`, seconds), no sampling")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from cm3leon_jax.vocab import image_tokenizer

    bad = [d for d in args.decoder if "=" not in d]
    if bad:
        p.error(f"--decoder {bad[0]!r}: write NAME=FOLDER, e.g. --decoder "
                f"demo={args.run}/pretrain")
    missing = [f for f in (args.run, *(d.split("=", 1)[1] for d in args.decoder))
               if not os.path.isdir(f)]
    if missing:
        p.error(f"{missing[0]!r} is not a folder: --run takes a finished demo run, --decoder "
                "NAME=its decoder's run folder")
    decoders = dict(d.split("=", 1) for d in args.decoder)
    unknown = sorted(set(args.query_order) - set(decoders))
    if unknown:
        raise SystemExit(f"--query-order names {unknown}, which no --decoder names.")
    keeps = (True if args.guidance_keeps_documents else
             False if args.guidance_drops_documents else None)
    settings = override_settings(generate_settings(args.run),
                                 rerank_samples=args.rerank_samples,
                                 num_retrieved=args.num_retrieved, keeps_documents=keeps)
    tokenizer = image_tokenizer.load_image_tokenizer(
        checkpoint=os.path.join(args.run, "image_tokenizer"))
    examples, scenes = _scenes(args.run, args.split, args.examples, tokenizer.image_size)
    variants = {"": settings["image_sampling"]}  # Row label suffix -> image sampling.
    for text in args.image_sampling:
        name, sampling = parse_variant(text, settings)
        if f" {name}" in variants:
            raise SystemExit(f"--image-sampling names {name!r} twice.")
        variants[f" {name}"] = sampling
    if args.circle_negatives:
        variants.update({f"{label} circle-negatives": (sampling, True)
                         for label, sampling in list(variants.items())})
    results = {}
    for name, folder in decoders.items():
        reads = read_out(args.run, folder, tokenizer, examples)
        if args.reads_only:
            results[name] = {"reads": reads}
            continue
        rows = measure(args.run, folder, tokenizer, examples, scenes, args.seeds, settings,
                       variants, query_order=name in args.query_order)
        results.update({name + label: {**row, "reads": reads} for label, row in rows.items()})
    if args.reads_only:
        text = f"{args.examples} {args.split} scenes of {args.run}\n\n" + reads_table(results)
    else:
        results[RETRIEVAL_ROW] = retrieval_alone(args.run, tokenizer, examples, scenes,
                                                 settings)
        text = (f"{args.examples} {args.split} scenes of {args.run}, seeds {args.seeds}, the "
                f"run's generate settings {settings}\n\n" + table(results) + "\n"
                + rerank_table(results, settings["rerank_samples"]) + "\n"
                + class_table(results) + "\n" + reads_table(results))
    print(text)
    if args.json:
        write_json(args.json, {"args": vars(args), "settings": repr(settings),
                               "results": results})
    return text


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
