r"""How relevant are the neighbors preprocessing wrote into the shards? Exact, from the scenes.

    .venv/bin/python benchmarks/neighbor_relevance.py [--data_dir=runs/demo/data] \
        [--tfds_dir=runs/demo/tfds] [--image_size=32] [--per_split=500]

The built-in corpus knows every document's scene, so relevance needs no judge: a
neighbor is *on topic* when it holds an object of the same kind and color as one of
the query's objects ("a red circle" retrieved for "a red circle and a blue square").
Each split's rate is printed next to the rate for random train documents in place of
the neighbors (what retrieval adds over none). Results: RESULTS_retrieval.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def scene_objects(builder, split: str) -> dict[str, set[tuple[str, str]]]:
    """doc id -> {(kind, color)} of its scene, for one split of the corpus."""
    from cm3leon_jax.data import shapes
    out = {}
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
        scene = shapes.Scene.from_json(ex["scene"].decode())
        out[ex["id"].decode()] = {(s.kind, s.color) for s in scene.shapes}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "runs/demo/data"))
    parser.add_argument("--tfds_dir", default=os.path.join(ROOT, "runs/demo/tfds"))
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--split_sizes", default="train=2000,validation=200,test=200",
                        help="the corpus' split sizes (make demo's by default)")
    parser.add_argument("--per_split", type=int, default=500)
    args = parser.parse_args()
    from cm3leon_jax.data import preprocess, shards
    sizes = {k: int(v) for k, v in (p.split("=") for p in args.split_sizes.split(","))}
    # The shards first: a data folder without them is refused before the corpus is built.
    splits = {split: shards.read_split(args.data_dir, split) for split in sizes}
    builder = preprocess.synthetic_builder(args.image_size, args.tfds_dir, sizes)
    train = scene_objects(builder, "train")
    train_ids = sorted(train)
    rng = np.random.default_rng(0)
    print("| split | queries | neighbors | on topic | random train document on topic |")
    print("|---|---:|---:|---:|---:|")
    for split in sizes:
        objects = train if split == "train" else scene_objects(builder, split)
        records = splits[split].take(args.per_split)
        queries = hits = random_hits = n = 0
        for r in records.as_numpy_iterator():
            query = objects[r["doc_id"].decode()]
            queries += 1
            for d in r["neighbor_doc_ids"]:
                hits += bool(query & train[d.decode()])
                random_hits += bool(query & train[train_ids[rng.integers(len(train_ids))]])
                n += 1
        if n == 0:
            sys.exit(f"{args.data_dir} has no neighbors in split {split!r}: preprocess it "
                     "with retrieval (preprocess.retrieval, as make demo does).")
        print(f"| {split} | {queries} | {n} | {hits / n:.3f} | {random_hits / n:.3f} |")


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
