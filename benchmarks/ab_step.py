r"""Variants of the JAX train step against each other, each in its own process, interleaved.

    .venv/bin/python benchmarks/ab_step.py --rounds=3 \
        base: \
        xla_loss:DecoderConfig.loss_impl='xla' \
        retain:ENV:CM3LEON_JAX_HOST_MEMORY=retain

Each variant is `name:item;item;...`, an item a gin binding for `train_step.py --binding`
or `ENV:NAME=value` for its environment (`XLA_FLAGS`, `CM3LEON_JAX_HOST_MEMORY`, ...).
Every round runs `train_step.py --no_peer --trials=3` once per variant, in order, so that a
drift of the shared host falls on all of them alike; a variant's figure is the median step
of each of its processes, reported as median [min, max] over the rounds. A separate
process per run: allocator settings and XLA flags take effect only at process start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import reporting  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """`name:item;item` -> (name, bindings, environment)."""
    name, sep, items = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"ab_step.py: variant {text!r}: write name:binding;ENV:NAME=value")
    bindings, env = [], {}
    for item in filter(None, items.split(";")):
        if item.startswith("ENV:"):
            key, eq, value = item[4:].partition("=")
            if not eq:
                raise SystemExit(f"ab_step.py: {item!r}: write ENV:NAME=value")
            env[key] = value
        else:
            bindings.append(item)
    return name, bindings, env


def run_once(bindings: list[str], env: dict[str, str], trials: int) -> float:
    """The median JAX step (s) of one `train_step.py --no_peer` process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--no_peer",
               f"--trials={trials}", f"--json={out}"]
        for binding in bindings:
            cmd += ["--binding", binding]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode:  # Its own error, not only "returned non-zero exit status 1".
            sys.exit(f"ab_step.py: train_step.py with {list(bindings)} failed:\n"
                     f"{done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)["jax_step_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name:binding;ENV:NAME=value;...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3, help="train steps per process")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    steps = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        for name, bindings, env in variants:
            steps[name].append(run_once(bindings, env, args.trials))
            print(f"round {r}: {name} {steps[name][-1]:.3f} s", flush=True)
    result = {name: reporting.spread(values) for name, values in steps.items()}
    for name, s in result.items():
        print(f"{name}: {s['median']:.3f} s [{s['min']:.3f}, {s['max']:.3f}]")
    reporting.write_json(args.json, {"rounds": args.rounds, "steps": steps, "spread": result})
    return result


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
