"""Pretrained demo decoders side by side: text -> image and captions on validation scenes.

    python benchmarks/demo_decoders.py --run=runs/demo \
        --decoder places=runs/demo/pretrain --decoder plain=runs/plain/pretrain \
        --seeds 0 1 2 [--examples=200] [--json=out.json]

Every decoder is read with the rest of one demo run (`--run`: its corpus, vocabulary,
image tokenizer and retrieval index), so the decoders must have been trained on that
run's data. Text -> image uses the demo's generate settings (2 retrieved documents, CFG
3, top-p 0.9, the best of 4 samples by CLIP score) and again with k = 0; captions are
greedy from an image-first prompt. Scores are the shape parser's exact ones
(`evaluation/shapes_scores.py`). Each cell is the mean over the seeds with the range
beside it. The scenes are the run's **validation** split by default: choose settings
there, and keep the test split for the demo's held-out figures.
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


def measure(run: str, decoder_dir: str, tokenizer, examples, scenes, seeds: list[int]) -> dict:
    """{"text_to_image": {"k2"|"k0": {metric: [per seed]}}, "captions": {metric: value}}."""
    import numpy as np

    from cm3leon_jax.decode import rerank, restore
    from cm3leon_jax.decode.generate import Generator, SamplingConfig
    from cm3leon_jax.evaluation import shapes_scores
    from cm3leon_jax.retrieval.retriever import Retriever
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

    config, params, step = restore.restore_decoder(decoder_dir)
    retriever = Retriever.open(os.path.join(run, "data", "retrieval"))
    gen = Generator(config, params, MultimodalVocabulary(os.path.join(run, "data", "vocab")),
                    tokenizer, retriever, batch_size=32)
    ranker = rerank.ClipRanker(retriever.encoder)
    captions = [e["captions"][0].decode() for e in examples]
    sampling = SamplingConfig(top_p=0.9, guidance="cfg", guidance_scale=3.0)
    out = {"step": step, "text_to_image": {}}
    for k in (2, 0):
        per_seed = {m: [] for m in T2I}
        for seed in seeds:
            drawn = gen.text_to_image(captions, num_retrieved=k, sampling=sampling, seed=seed,
                                      num_samples=4, ranker=ranker)
            scores = shapes_scores.text_to_image_metrics(drawn.images, scenes)
            for m in T2I:
                per_seed[m].append(float(scores[m]))
        out["text_to_image"][f"k{k}"] = per_seed
    written = gen.image_to_text(np.stack([e["image"] for e in examples]), num_retrieved=2,
                                sampling=SamplingConfig(greedy=True, guidance="none"),
                                max_tokens=24, style="image_first", seed=0)
    scores = shapes_scores.caption_metrics(written, scenes)
    out["captions"] = {m: float(scores[m]) for m in CAPTIONS}
    return out


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1 or max(values) == min(values):
        return f"{mean:.1%}"
    return f"{mean:.1%} ({min(values):.1%}-{max(values):.1%})"


def table(results: dict) -> str:
    cols = [f"t2i k={k} {m}" for k in (2, 0) for m in T2I] + [f"captions {m}"
                                                              for m in CAPTIONS]
    lines = ["| decoder | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():
        cells = [_cell(r["text_to_image"][f"k{k}"][m]) for k in (2, 0) for m in T2I]
        cells += [_cell([r["captions"][m]]) for m in CAPTIONS]
        lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished demo run (MODEL_DIR)")
    p.add_argument("--decoder", action="append", required=True,
                   help="name=folder of a pretrained decoder (repeat)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", default="validation")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from cm3leon_jax.vocab import image_tokenizer

    decoders = dict(d.split("=", 1) for d in args.decoder)
    tokenizer = image_tokenizer.load_image_tokenizer(
        checkpoint=os.path.join(args.run, "image_tokenizer"))
    examples, scenes = _scenes(args.run, args.split, args.examples, tokenizer.image_size)
    results = {name: measure(args.run, folder, tokenizer, examples, scenes, args.seeds)
               for name, folder in decoders.items()}
    text = (f"{args.examples} {args.split} scenes of {args.run}, seeds {args.seeds}\n\n"
            + table(results))
    print(text)
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    return text


if __name__ == "__main__":
    main()
