r"""The CPU FlashAttention kernel alone: versions of `cpu_kernels.cc` against each other.

    git show HEAD~1:cm3leon_jax/model/cpu_kernels.cc > /tmp/before.cc
    .venv/bin/python benchmarks/flash_kernel.py --rounds=4 \
        before=/tmp/before.cc now=cm3leon_jax/model/cpu_kernels.cc

One attention call of a layer (default: `small`'s, 8 x 512 tokens, 4 heads of 64, causal,
one segment), jitted as the train step calls it: the forward alone and the forward with its
backward (`jax.vjp`). Each round runs every version in its own process (each builds its own
copy of the kernels), in order, so that a drift of the shared host falls on all of them
alike; a process reports the best of `--trials` calls, and a version's figure is the median
over the rounds [min, max]. Every version's outputs and gradients are compared with the
first's: "same bits" or the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import reporting  # noqa: E402

# The child: one version's timings, and its results saved for the bit comparison.
CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from cm3leon_jax.model import cpu_kernels
cpu_kernels._SOURCE = sys.argv[1]  # the version under test, built into its own cached library
B, T, H, D = map(int, sys.argv[2].split(","))
trials, out = int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(4))
seg = jnp.zeros((B, T), jnp.int32)
attend = lambda q, k, v: cpu_kernels.flash_attention(q, k, v, seg, seg, 0)
forward = jax.jit(attend)
both = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](do))
def best(fn):
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3
timing = {"forward_ms": best(forward), "forward_backward_ms": best(both)}
grads = dict(zip(("dq", "dk", "dv"), map(np.asarray, both(q, k, v))))
np.savez(out + ".npz", out=np.asarray(forward(q, k, v)), **grads)
with open(out, "w") as f:
    json.dump(timing, f)
"""


def parse_version(text: str) -> tuple[str, str]:
    """`name=path` -> (name, absolute path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"flash_kernel.py: version {text!r}: write name=path/to/cpu_kernels.cc")
    if not os.path.isfile(path):
        raise SystemExit(f"flash_kernel.py: version {name!r}: no file {path!r}")
    return name, os.path.abspath(path)


def run_once(source: str, shape: str, trials: int, out: str) -> dict:
    subprocess.run([sys.executable, "-c", CHILD, source, shape, str(trials), out], check=True,
                   cwd=os.path.dirname(HERE))
    with open(out) as f:
        return json.load(f)


def compare_bits(reference: str, other: str) -> str:
    a, b = np.load(reference), np.load(other)
    worst = max(float(np.abs(a[key] - b[key]).max()) for key in a.files)
    return "same bits" if worst == 0 else f"max difference {worst:.3g}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="name=path/to/cpu_kernels.cc")
    parser.add_argument("--shape", default="8,512,4,64", help="B,T,H,D (query and key heads)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--trials", type=int, default=7, help="calls per process (best kept)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    versions = [parse_version(v) for v in args.versions]
    times = {name: {"forward_ms": [], "forward_backward_ms": []} for name, _ in versions}
    bits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, source in versions:
                out = os.path.join(tmp, f"{name}.json")
                timing = run_once(source, args.shape, args.trials, out)
                for key, value in timing.items():
                    times[name][key].append(value)
                print(f"round {r}: {name} forward {timing['forward_ms']:.2f} ms, forward + "
                      f"backward {timing['forward_backward_ms']:.2f} ms", flush=True)
        first = os.path.join(tmp, f"{versions[0][0]}.json.npz")
        for name, _ in versions:
            bits[name] = compare_bits(first, os.path.join(tmp, f"{name}.json.npz"))
    result = {name: {key: reporting.spread(values) for key, values in t.items()}
              for name, t in times.items()}
    for name, r in result.items():
        f, fb = r["forward_ms"], r["forward_backward_ms"]
        print(f"{name}: forward {f['median']:.2f} ms [{f['min']:.2f}, {f['max']:.2f}], forward + "
              f"backward {fb['median']:.2f} ms [{fb['min']:.2f}, {fb['max']:.2f}]; {bits[name]}")
    reporting.write_json(args.json, {"shape": args.shape, "rounds": args.rounds, "times": times,
                                     "spread": result, "bits": bits})
    return result


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
