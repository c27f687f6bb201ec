"""Eval reports of the same checkpoint under several seeds -> one table with the spread.

    python benchmarks/eval_seeds.py runs/eval_pretrain_s0/eval/report.json \
        runs/eval_pretrain_s1/eval/report.json [--metrics=objects_right,clip_score] \
        [--json=out.json]

Each cell is the mean over the reports with the range (min-max) beside it when the seeds
disagree; rows are matched by (task, strategy, retrieved). Rows or metrics a report lacks
are left out of that cell's mean (the count of reports is printed with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reporting import write_json  # noqa: E402

KEY = ("task", "strategy", "retrieved")


def merge(reports: list[dict]) -> list[dict]:
    """[{task, strategy, retrieved, metric: [values over reports]}] in the first order seen."""
    merged: dict[tuple, dict] = {}
    for report in reports:
        for row in report["rows"]:
            key = tuple(str(row[k]) for k in KEY)
            cell = merged.setdefault(key, dict(zip(KEY, key)))
            for name, value in row.items():
                if name not in KEY and isinstance(value, (int, float)):
                    cell.setdefault(name, []).append(float(value))
    return list(merged.values())


def cell(values: list[float], digits: int) -> str:
    mean = sum(values) / len(values)
    if max(values) - min(values) < 0.5 * 10 ** -digits:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(rows: list[dict], metrics: list[str], digits: int = 3) -> str:
    """Markdown: one line per row that has any of `metrics`."""
    lines = ["| " + " | ".join(list(KEY) + metrics) + " |",
             "|" + "---|" * (len(KEY) + len(metrics))]
    for r in rows:
        if any(m in r for m in metrics):
            cells = [r[k] for k in KEY] + [cell(r[m], digits) if m in r else ""
                                           for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="eval/report.json files")
    p.add_argument("--metrics", default="", help="comma-separated; default: every metric")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    reports = []
    for path in args.reports:
        if not os.path.exists(path):
            raise SystemExit(f"eval report {path!r} does not exist: give eval/report.json "
                             "files written by the eval run.")
        with open(path) as f:
            reports.append(json.load(f))
    rows = merge(reports)
    metrics = ([m for m in args.metrics.split(",") if m] or
               sorted({m for r in rows for m in r if m not in KEY}))
    out = table(rows, metrics, args.digits)
    print(f"{len(reports)} reports ({', '.join(str(r.get('seed')) for r in reports)} seeds)\n")
    print(out)
    write_json(args.json, {"reports": args.reports, "rows": rows})
    return out


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
