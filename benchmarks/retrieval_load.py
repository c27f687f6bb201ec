r"""Load test of the retrieval service on loopback.

    python benchmarks/retrieval_load.py --retrieval_dir runs/demo/data/retrieval \
        --concurrency 64 --seconds 30 --out benchmarks/results_retrieval_load.json

Starts the service with `gin_configs/runs/serve_retrieval.gin` in a child process,
then runs `--concurrency` clients for `--seconds` per workload (search by vector,
by text, by PNG image, and a mix), and reports p50/p99 latency, throughput, errors
and lost requests (sent but never answered). Only 127.0.0.1 is targeted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm3leon_jax.data.synthetic import synthetic_documents  # noqa: E402
from cm3leon_jax.retrieval import load_generator  # noqa: E402
from cm3leon_jax.retrieval.memory_bank import MemoryBank  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrieval_dir", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the JSON report here (the "
                    "recorded one: benchmarks/results_retrieval_load.json); default: print only")
    args = ap.parse_args()

    bank = MemoryBank(os.path.join(args.retrieval_dir, "memory_bank"))
    vectors = bank.vectors(np.arange(min(len(bank), 2048)))
    docs = list(synthetic_documents(split="test", num=64))
    texts = [d.text for d in docs if d.text]
    images = [d.image for d in docs if d.image is not None][:16]
    workloads = {
        "vector": load_generator.vector_requests(vectors, args.k),
        "text": load_generator.text_requests(texts, args.k),
        "image_png": load_generator.image_requests(images, args.k),
    }
    workloads["mixed"] = load_generator.mixed_requests(*workloads.values())
    report = {"retrieval_dir": args.retrieval_dir, "num_docs": len(bank), "k": args.k,
              "cpu_count": os.cpu_count(), "workloads": {}}
    with load_generator.ServerProcess(args.retrieval_dir) as server:
        for name, make in workloads.items():
            r = load_generator.run_load(server.url, make, args.concurrency, args.seconds)
            report["workloads"][name] = r
            print(name, json.dumps({k: v for k, v in r.items() if "examples" not in k}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    bad = {n: (r["errors"], r["lost"], r["unaccounted"]) for n, r in report["workloads"].items()
           if r["errors"] or r["lost"] or r["unaccounted"]}
    print("zero errors and zero lost requests" if not bad else f"FAILURES: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
