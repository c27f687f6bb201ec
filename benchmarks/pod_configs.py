r"""Ahead-of-time check of every pod config (gin_configs/pods/*.gin): memory per chip, step time.

    .venv/bin/pip install 'jax[tpu]==0.10.2'   # or: pip install --target DIR 'libtpu==0.0.42.*'
    .venv/bin/python benchmarks/pod_configs.py [gin_configs/pods/NAME.gin ...] \
        [--json=benchmarks/results_pod_configs.json]

For each file: compiles its full train step for the `# Topology:` its header names with
`aot_train_step.py` (one subprocess at a time: a 7B compile takes several GiB), and
prints the per-chip memory XLA reports and the step time the model's FLOPs imply
(MaxText's count, `train/metrics.py`, divided by the chips' bf16 peak: the time at 100%
MFU, and at 50%). Nothing runs on a TPU; the step times are arithmetic, not measurements.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

# bf16 peak per chip (Google Cloud TPU documentation), by the topology's generation.
PEAK = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def topology(path: str) -> str:
    """The `# Topology: v5p:4x4x8 ...` of a pod file's header."""
    with open(os.path.join(REPO, path)) as f:  # Repository-relative, from any folder.
        m = re.search(r"^# Topology: (\S+)", f.read(), re.M)
    if not m:
        raise ValueError(f"{path}: no '# Topology: <generation>:<AxBxC>' line in its header")
    return m.group(1)


def chips(topo: str) -> int:
    return math.prod(int(n) for n in topo.split(":")[1].split("x"))


def model_flops(path: str) -> tuple[float, int]:
    """(model FLOPs per step, tokens per step) of the pod file's model and batch."""
    import gin

    from cm3leon_jax import main as main_lib
    from cm3leon_jax.model.config import DecoderConfig
    from cm3leon_jax.train import metrics
    gin.clear_config()
    main_lib.configure([path], ["MODEL_DIR='/tmp/unused'"])
    b, length = (gin.query_parameter(f"train.{k}") for k in ("global_batch_size", "seq_len"))
    return metrics.train_flops_per_step(DecoderConfig(), b, length), b * length


def check(path: str) -> dict:
    topo = topology(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        subprocess.run([sys.executable, os.path.join(HERE, "aot_train_step.py"),
                        f"--train_gin={path}", f"--topology={topo}", f"--json={out}"],
                       check=True, cwd=REPO)
        with open(out) as f:
            result = json.load(f)
    flops, tokens = model_flops(path)
    ideal = flops / (chips(topo) * PEAK[topo.split(":")[0]])
    result.update(model_tflops_per_step=flops / 1e12, tokens_per_step=tokens,
                  step_s_at_peak=ideal, step_s_at_50_mfu=2 * ideal,
                  tokens_per_s_per_chip_at_50_mfu=tokens / (2 * ideal) / chips(topo))
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--json", default=None, help="append results to this JSON list")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(REPO, "gin_configs", "pods", "*.gin")))
    results = []
    for path in files:
        r = check(os.path.relpath(path, REPO))
        results.append(r)
        print(f"| `{r['train_gin']}` | {r['topology']} ({r['chips']} chips) | {r['mesh']} | "
              f"{r['num_microbatches']} | {r.get('total_gib', float('nan')):.2f} of "
              f"{r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else 'NO'} | "
              f"{r['step_s_at_peak']:.2f} s | {r['step_s_at_50_mfu']:.2f} s | "
              f"{r['compile_s']:.0f} s |", flush=True)
        if args.json:  # after each file: a long batch keeps what it finished
            old = json.load(open(args.json)) if os.path.exists(args.json) else []
            with open(args.json, "w") as f:
                json.dump([o for o in old if o["train_gin"] != r["train_gin"]] + [r], f,
                          indent=1)
    return results


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
