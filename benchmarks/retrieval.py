r"""Retrieval benchmark: ScaNN against exact search and faiss's best approximate indexes.

    python benchmarks/retrieval.py --n 1000000 --dim 512 --out benchmarks/results_retrieval_1m
    python benchmarks/retrieval.py --bank runs/demo/data/retrieval/memory_bank --queries 500 \
        --out benchmarks/results_retrieval_demo   # the demo bank's real vectors

For one set of vectors (clustered synthetic unit vectors, or a memory bank's
document vectors with held-out documents' query-dropout vectors as queries), in
one process and on the same cores:

  exact   faiss IndexFlatIP (also the ground truth for recall@k)
  scann   tree + asymmetric hashing + exact reorder (cm3leon_jax.retrieval.index)
  hnsw    faiss IndexHNSWFlat, inner product
  ivfpq   faiss IVF-PQ with exact re-ranking (IndexRefineFlat); also without, for scale
  sharded the ScaNN index split into --shards shards, merged (cm3leon_jax's ShardedIndex)

Each approximate index is swept over its search-time knobs; every point records
recall@k and batched queries/s, and the chosen points also single-query
queries/s. Build time and index memory (serialized size, which is what each holds
in RAM) are recorded. Writes `<out>.json` and the recall-vs-QPS curve `<out>.png`.
Targets checked: recall@10 >= 0.95 at >= 20x exact QPS; at equal recall >= 1.5x the
best faiss index's QPS (interpolated on the faiss curve).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import reporting  # noqa: E402
from cm3leon_jax.retrieval import index as index_lib  # noqa: E402
from cm3leon_jax.retrieval.synthetic_vectors import clustered_vectors, recall_at_k  # noqa: E402


def qps(
    search, queries: np.ndarray, single: bool = False, min_seconds: float = 1.0
) -> tuple[float, np.ndarray]:
    """Queries/s of `search` (batched: all at once; single: one by one), and its ids."""
    search(queries[:8] if not single else queries[:1])  # warm up
    reps, start = 0, time.perf_counter()
    while True:
        if single:
            ids = np.concatenate([search(q[None]) for q in queries])
        else:
            ids = search(queries)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return reps * len(queries) / elapsed, ids


def faiss_bytes(index) -> int:
    import faiss
    return int(faiss.serialize_index(index).nbytes)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, base: np.ndarray, queries: np.ndarray, k: int, out: str):
        self.base, self.queries, self.k, self.out = base, queries, k, out
        self.target = 0.95  # recall@k the chosen operating points must reach
        self.results: dict = {"n": int(base.shape[0]), "dim": int(base.shape[1]),
                              "queries": int(queries.shape[0]), "k": k, "methods": {}}

    def save(self) -> None:
        with open(self.out + ".json", "w") as f:
            json.dump(self.results, f, indent=2)

    def point(self, method: str, params: dict, search, single: bool = False) -> dict:
        rate, ids = qps(search, self.queries)
        p = {**params, "recall": round(recall_at_k(ids, self.truth), 4), "qps": round(rate, 1)}
        if single:
            p["qps_single"] = round(qps(search, self.queries[:200], single=True)[0], 1)
        self.results["methods"].setdefault(method, {"points": []})["points"].append(p)
        log(f"{method} {p}")
        self.save()
        return p

    def exact(self) -> None:
        import faiss
        start = time.perf_counter()
        index = faiss.IndexFlatIP(self.base.shape[1])
        index.add(self.base)
        build = time.perf_counter() - start
        self.truth = index.search(self.queries, self.k)[1]
        self.results["methods"]["exact"] = {
            "build_s": round(build, 2),
            "bytes": int(self.base.nbytes),
            "points": [],
        }
        self.point("exact", {}, lambda q: index.search(q, self.k)[1], single=True)

    def scann(self, leaves_grid, reorder_grid, num_leaves=None) -> None:
        cfg = index_lib.IndexConfig(algorithm="tree_ah", num_leaves=num_leaves)
        index = index_lib.Index.build(self.base, cfg)
        d = tempfile.mkdtemp()
        index.save(d)
        self.results["methods"]["scann"] = {"build_s": index.settings["build_seconds"],
                                            "bytes": dir_bytes(d), "settings": index.settings,
                                            "points": []}
        shutil.rmtree(d)
        self._sweep("scann", index, leaves_grid, reorder_grid)
        self.scann_index = index

    def _sweep(self, method, index, leaves_grid, reorder_grid) -> None:
        for leaves in leaves_grid:
            for reorder in reorder_grid:
                self.point(method, {"leaves_to_search": leaves, "reorder": reorder},
                           lambda q, l=leaves, r=reorder: index.search(q, self.k, l, r)[0])
        self._single_at_target(method, lambda p: (lambda q: index.search(
            q, self.k, p["leaves_to_search"], p["reorder"])[0]))

    def _single_at_target(self, method: str, make) -> None:
        """Adds single-query QPS to the fastest point reaching recall 0.95 (else the best)."""
        points = self.results["methods"][method]["points"]
        ok = [p for p in points if p["recall"] >= self.target] or [
            max(points, key=lambda p: p["recall"])
        ]
        best = max(ok, key=lambda p: p["qps"])
        best["qps_single"] = round(qps(make(best), self.queries[:200], single=True)[0], 1)
        self.results["methods"][method]["chosen"] = best
        log(f"{method} chosen {best}")
        self.save()

    def hnsw(self, m: int, ef_construction: int, ef_grid) -> None:
        import faiss
        start = time.perf_counter()
        index = faiss.IndexHNSWFlat(self.base.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(self.base)
        self.results["methods"]["hnsw"] = {"build_s": round(time.perf_counter() - start, 2),
                                           "bytes": faiss_bytes(index), "M": m,
                                           "efConstruction": ef_construction, "points": []}
        for ef in ef_grid:
            index.hnsw.efSearch = ef
            self.point("hnsw", {"efSearch": ef}, lambda q: index.search(q, self.k)[1])

        def make(p):
            index.hnsw.efSearch = p["efSearch"]
            return lambda q: index.search(q, self.k)[1]
        self._single_at_target("hnsw", make)

    def ivfpq(self, nlist: int, pq_m: int, nprobe_grid, factor_grid) -> None:
        import faiss
        d = self.base.shape[1]
        start = time.perf_counter()
        ivf = faiss.index_factory(d, f"IVF{nlist},PQ{pq_m}x8", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = self.base[
            rng.choice(len(self.base), min(len(self.base), 50 * nlist), replace=False)
        ]
        ivf.train(sample)
        index = faiss.IndexRefineFlat(ivf)
        index.add(self.base)
        self.results["methods"]["ivfpq"] = {"build_s": round(time.perf_counter() - start, 2),
                                            "bytes": faiss_bytes(index), "nlist": nlist,
                                            "pq": f"PQ{pq_m}x8", "points": []}
        for nprobe in nprobe_grid:
            faiss.extract_index_ivf(index).nprobe = nprobe
            # Without re-ranking, for scale: what PQ codes alone give.
            self.point("ivfpq_no_rerank", {"nprobe": nprobe}, lambda q: ivf.search(q, self.k)[1])
            for factor in factor_grid:
                index.k_factor = factor
                self.point("ivfpq", {"nprobe": nprobe, "k_factor": factor},
                           lambda q: index.search(q, self.k)[1])

        def make(p):
            faiss.extract_index_ivf(index).nprobe = p["nprobe"]
            index.k_factor = p["k_factor"]
            return lambda q: index.search(q, self.k)[1]
        self._single_at_target("ivfpq", make)

    def sharded(self, shards: int, num_leaves: int, leaves: int, reorder: int) -> None:
        """One ScaNN index per shard (each with the whole bank's num_leaves, so a search
        scans as many vectors as the single index does), at most one loaded at a time."""
        d = tempfile.mkdtemp()
        n = len(self.base)
        bounds = np.linspace(0, n, shards + 1).astype(int)
        start = time.perf_counter()
        index_lib.ShardedIndex.build(
            (self.base[a:b] for a, b in zip(bounds[:-1], bounds[1:])),
            d,
            index_lib.IndexConfig(algorithm="tree_ah", num_leaves=num_leaves),
        )
        build = time.perf_counter() - start
        index = index_lib.ShardedIndex(d, max_loaded=1)
        self.results["methods"]["sharded"] = {"build_s": round(build, 2), "bytes": dir_bytes(d),
                                              "shards": shards, "max_loaded": 1,
                                              "num_leaves_per_shard": num_leaves, "points": []}
        for l in (leaves, int(leaves * 1.5)):
            self.point(
                "sharded",
                {"leaves_to_search": l, "reorder": reorder, "max_loaded": 1},
                lambda q, l=l: index.search(q, self.k, leaves_to_search=l, reorder=reorder)[0],
            )
        # With every shard resident (a bank that fits), for the cost of sharding alone.
        resident = index_lib.ShardedIndex(d)
        self.point(
            "sharded",
            {"leaves_to_search": leaves, "reorder": reorder, "max_loaded": shards},
            lambda q: resident.search(q, self.k, leaves_to_search=leaves, reorder=reorder)[0],
        )
        shutil.rmtree(d)

    def targets(self) -> dict:
        m = self.results["methods"]
        exact_qps = m["exact"]["points"][0]["qps"]
        s = m["scann"]["chosen"]
        out = {"exact_qps": exact_qps, "scann_recall": s["recall"], "scann_qps": s["qps"],
               "scann_speedup_vs_exact": round(s["qps"] / exact_qps, 1)}
        for peer in ("hnsw", "ivfpq"):
            if peer in m:
                out[f"{peer}_qps_at_scann_recall"] = qps_at_recall(m[peer]["points"], s["recall"])
        peers = [v for k, v in out.items() if k.endswith("_qps_at_scann_recall") and v]
        out["best_faiss_qps_at_scann_recall"] = max(peers) if peers else None
        out["scann_over_best_faiss"] = round(s["qps"] / max(peers), 2) if peers else None
        out["meets_recall_and_20x"] = s["recall"] >= 0.95 and s["qps"] >= 20 * exact_qps
        out["meets_1.5x_faiss"] = bool(peers) and s["qps"] >= 1.5 * max(peers)
        self.results["targets"] = out
        self.save()
        return out


def qps_at_recall(points: list[dict], recall: float) -> float | None:
    """The peer's QPS at `recall`, interpolated (log-QPS) on its Pareto frontier.

    None if never reached.
    """
    pts = sorted((p["recall"], p["qps"]) for p in points)
    frontier = []
    for r, q in sorted(pts, key=lambda x: -x[1]):
        if not frontier or r > frontier[-1][0]:
            frontier.append((r, q))
    frontier.sort()
    if not frontier or frontier[-1][0] < recall:
        return None
    for (r0, q0), (r1, q1) in zip(frontier, frontier[1:]):
        if r0 <= recall <= r1:
            t = (recall - r0) / (r1 - r0) if r1 > r0 else 0.0
            return round(float(np.exp(np.log(q0) + t * (np.log(q1) - np.log(q0)))), 1)
    return frontier[0][1]


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (
        ("scann", "o-"),
        ("hnsw", "s-"),
        ("ivfpq", "^-"),
        ("ivfpq_no_rerank", "v:"),
    ):
        if name not in results["methods"]:
            continue
        pts = sorted((p["recall"], p["qps"]) for p in results["methods"][name]["points"])
        frontier = [max((p for p in pts if p[0] >= r), key=lambda p: p[1]) for r, _ in pts]
        frontier = sorted(set(frontier))
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], style, label=name, ms=4)
    exact = results["methods"]["exact"]["points"][0]["qps"]
    ax.axhline(exact, color="k", ls="--", lw=1, label=f"exact (faiss flat) {exact:.0f} q/s")
    ax.axvline(0.95, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{results['k']}")
    ax.set_ylabel("queries/s (batched)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_bank(bank_dir: str, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """A memory bank's vectors; queries are the last documents' query-dropout vectors,
    held out of the base so no query finds itself."""
    from cm3leon_jax.retrieval.memory_bank import MemoryBank
    bank = MemoryBank(bank_dir)
    ids = np.arange(len(bank))
    base = bank.vectors(ids[:-num_queries])
    key = bank.query_vectors if bank.has_query_vectors else bank.vectors
    return np.ascontiguousarray(base), np.ascontiguousarray(key(ids[-num_queries:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument(
        "--bank", default=None, help="a memory bank folder instead of synthetic vectors"
    )
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results_retrieval")
    ap.add_argument("--methods", default="scann,hnsw,ivfpq,sharded",
                    help="comma-separated; exact always runs (it is the ground truth)")
    ap.add_argument("--hnsw_m", type=int, default=32)
    ap.add_argument("--hnsw_ef_construction", type=int, default=40)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    reporting.require("faiss", "matplotlib")
    methods = args.methods.split(",")

    if args.bank:
        base, queries = load_bank(args.bank, args.queries)
        source = f"memory bank {args.bank}"
    else:
        log(f"generating {args.n} x {args.dim} clustered vectors")
        base = clustered_vectors(args.n, args.dim, seed=0)
        queries = clustered_vectors(args.queries, args.dim, seed=1, num_topics=int(np.sqrt(args.n)))
        source = "clustered synthetic"
    n = len(base)
    bench = Bench(base, queries, args.k, args.out)
    import faiss
    bench.results.update({"source": source, "cpu_count": os.cpu_count(),
                          "faiss_threads": faiss.omp_get_max_threads()})
    log(f"{source}: {n} x {base.shape[1]}, {len(queries)} queries")
    bench.exact()
    if "scann" in methods:
        leaves = (
            index_lib.IndexConfig().resolve(max(n, 100_000))["num_leaves"]
            if n >= 100_000
            else max(2, n // 50)
        )
        grid = sorted({max(1, int(round(f * leaves)))
                       for f in (0.005, 0.01, 0.02, 0.04, 0.08)})
        bench.scann(grid, [50, 100, 250], num_leaves=leaves)
    if "ivfpq" in methods:
        nlist = max(16, int(2 * np.sqrt(n)) // 16 * 16)
        pq_m = base.shape[1] // 8 if base.shape[1] % 8 == 0 else base.shape[1] // 4
        bench.ivfpq(nlist, pq_m, [8, 32, 128], [4, 16])
    if "hnsw" in methods:
        bench.hnsw(args.hnsw_m, args.hnsw_ef_construction, [16, 32, 64, 128, 256])
    if "scann" in methods:
        log(f"targets: {bench.targets()}")
    if "sharded" in methods and "scann" in methods:
        chosen = bench.results["methods"]["scann"]["chosen"]
        bench.sharded(args.shards, bench.results["methods"]["scann"]["settings"]["num_leaves"],
                      chosen["leaves_to_search"], chosen["reorder"])

    plot(bench.results, args.out + ".png",
         args.title or f"recall@{args.k} vs QPS, {n:,} x {base.shape[1]} ({source})")
    log(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
