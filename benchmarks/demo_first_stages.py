r"""The demo's image tokenizer and retriever trained at once: as threads of one process, or each
in a process of its own with freed host memory kept (`demo/apart.py`, what the demo does).

    .venv/bin/python benchmarks/demo_first_stages.py --corpus=runs/demo_s44/tfds \
        --tokenizer_steps=750 --retriever_steps=450 --rounds=1

`gin_configs/runs/demo.gin`'s settings with fewer steps (checkpoints only at the end), on an
existing demo corpus (`MODEL_DIR/tfds` of a demo run, the demo's split sizes). Each round
runs the two ways one after the other, each in a fresh process and fresh folders, and
reports each stage's wall seconds and the phase's (the later of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import reporting  # noqa: E402

WAYS = ("threads", "processes")
SPLITS = {"train": 2000, "validation": 200, "test": 200}  # demo.gin's split_sizes

# One way, in its own process: argv = way, corpus folder, output folder, steps, steps, json.
CHILD = r"""
import json, os, sys, time
from cm3leon_jax import main as main_lib
from cm3leon_jax.demo import run as demo
from cm3leon_jax.demo import stages
way, corpus_dir, out, tok, ret, result = sys.argv[1:]
main_lib.configure(["gin_configs/runs/demo.gin"], [
    f"MODEL_DIR='{out}'", f"train_image_tokenizer.num_steps={tok}",
    f"train_retriever.steps={ret}", f"train_image_tokenizer.checkpoint_every={tok}",
    f"train_retriever.checkpoint_every={ret}"])
corpus = dict(image_size=32, data_dir=corpus_dir, split_sizes=json.loads(os.environ["SPLITS"]))
runner = stages.StageRunner(out, list(demo.STAGES), "benchmark")
vq, rt = os.path.join(out, "image_tokenizer"), os.path.join(out, "retriever")
if way == "processes":
    demo._train_tokenizer_and_retriever(runner, vq, rt, True, corpus)
else:  # the two stage functions as threads of this process, as the demo ran them before
    runner.run_together([
        ("image_tokenizer", lambda: demo.image_tokenizer_from_corpus(vq, **corpus), None),
        ("retriever", lambda: demo.retriever_stage(rt), None)])
with open(result, "w") as f:
    json.dump(runner.seconds, f)
"""


def run_way(way: str, corpus: str, tokenizer_steps: int, retriever_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "seconds.json")
        subprocess.run([sys.executable, "-c", CHILD, way, corpus, os.path.join(tmp, "run"),
                        str(tokenizer_steps), str(retriever_steps), result], check=True,
                       cwd=ROOT, env={**os.environ, "SPLITS": json.dumps(SPLITS)})
        with open(result) as f:
            seconds = json.load(f)
    return {**seconds, "phase": max(seconds.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a demo run's tfds/ folder")
    parser.add_argument("--tokenizer_steps", type=int, default=750)
    parser.add_argument("--retriever_steps", type=int, default=450)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.corpus):
        raise SystemExit(f"demo_first_stages.py: --corpus {args.corpus!r} is not a folder; "
                         "give a demo run's tfds/ folder (make demo writes runs/demo/tfds)")
    corpus = os.path.abspath(args.corpus)
    runs = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in WAYS:
            runs[way].append(run_way(way, corpus, args.tokenizer_steps, args.retriever_steps))
            print(f"round {r}: {way} {runs[way][-1]}", flush=True)
    spread = {way: reporting.spread([s["phase"] for s in r]) for way, r in runs.items()}
    for way, s in spread.items():
        print(f"{way}: phase {s['median']:.1f} s [{s['min']:.1f}, {s['max']:.1f}]")
    reporting.write_json(args.json, {"steps": [args.tokenizer_steps, args.retriever_steps],
                                     "runs": runs, "phase_spread": spread})
    return spread


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
