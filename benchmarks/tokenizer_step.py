r"""The 64-code image tokenizer's train step: this tree against another commit, interleaved.

    .venv/bin/python benchmarks/tokenizer_step.py --against=HEAD~1 --rounds=3

The step `make demo` trained its tokenizer with until 7 Dec (the tiny VQGAN of
`image_tokenizer/tiny.gin` at 32 px, batch 16 in 2 streams, AdamW, code restarts; the demo's
now has one more down-sampling level and 1024 codes, `gin_configs/runs/demo.gin`)
on random images, timed by `image_tokenizer.py train_step`. Each round times it in a fresh
process importing this tree's `cm3leon_jax`, then in one importing the commit's (a
`git worktree` in a temporary folder), so that a drift of the shared host falls on both
alike. A process's figure is the mean of `--steps` steps after the compile; a side's is
the median over rounds, with the range. Without `--against`, this tree alone.
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
if ROOT not in sys.path:  # (A timing process puts the compared tree's folder first.)
    sys.path.insert(0, ROOT)

from benchmarks import reporting  # noqa: E402


def time_steps(steps: int) -> dict:
    """Seconds a step of the demo tokenizer takes in this process: `image_tokenizer.py
    train_step` (the tiny config at 32 px, batch 16, 2 streams) for one trial."""
    import cm3leon_jax
    from benchmarks import image_tokenizer

    result = image_tokenizer.cmd_train_step(argparse.Namespace(
        config="tiny", batch=16, streams=[2], steps=steps, trials=1))
    return {"step_s": 1.0 / result["steps_per_s"][2]["median"],
            "package": cm3leon_jax.__file__}


def run_child(root: str, steps: int) -> float:
    """Seconds a step takes (the mean of `steps`) in a fresh process that imports `root`'s
    cm3leon_jax."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        # `cm3leon_jax` from `root` (past the editable install's import hook, which would
        # send it to this tree), then this tree's benchmarks: the package's own modules
        # come from its folder whatever sys.path says after it is imported.
        code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
                "if 'editable' not in getattr(f, '__module__', '')]; "
                f"sys.path.insert(0, {root!r}); import cm3leon_jax; "
                f"sys.path.insert(0, {ROOT!r}); import json; "
                "from benchmarks.tokenizer_step import time_steps; "
                f"json.dump(time_steps({steps}), open({out!r}, 'w'))")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
        with open(out) as f:
            result = json.load(f)
        if not result["package"].startswith(root):
            raise SystemExit(f"tokenizer_step.py: the process under {root} imported "
                             f"{result['package']}")
        return result["step_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="", help="a commit to time beside this tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    sides = {"this tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            other = os.path.join(tmp, "against")
            done = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other,
                                   args.against], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"tokenizer_step.py: --against={args.against}: git worktree add "
                         f"failed: {done.stderr.strip()}")
            sides[args.against] = other
        try:
            steps = {name: [] for name in sides}
            for r in range(args.rounds):
                for name, root in sides.items():
                    steps[name].append(run_child(root, args.steps))
                    print(f"round {r}: {name} {1e3 * steps[name][-1]:.1f} ms a step",
                          flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other],
                               check=False, capture_output=True)
    result = {name: reporting.spread(values) for name, values in steps.items()}
    for name, s in result.items():
        print(f"{name}: {1e3 * s['median']:.1f} ms [{1e3 * s['min']:.1f}, "
              f"{1e3 * s['max']:.1f}] a step")
    if args.against:
        mine, theirs = result["this tree"], result[args.against]
        apart = mine["max"] < theirs["min"] or theirs["max"] < mine["min"]
        print(f"this tree takes {mine['median'] / theirs['median']:.3f}x the time of "
              f"{args.against} (ranges {'apart' if apart else 'overlapping'})")
    reporting.write_json(args.json, {"rounds": args.rounds, "steps": steps, "spread": result})
    return result


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
