"""Bytes on disk: a training checkpoint (params + Adam moments) vs its params-only exports.

    python benchmarks/export_size.py [--model=small]

Writes a one-step training checkpoint of gin_configs/models/<model>.gin with random
weights and non-zero Adam moments (fresh moments are zeros, which compress to nothing),
exports it in float32 and bfloat16, and prints the sizes and export times. Results:
benchmarks/RESULTS_export.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.export import params_export
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import abstract_variables
from cm3leon_jax.train import checkpoints, optimizer
from cm3leon_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _NoData:
    """The trainer checkpoints its data position beside the state; nothing to save here."""

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)

    def restore(self, directory):
        pass


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path)
               for f in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small", help="gin_configs/models/<model>.gin")
    args = parser.parse_args()
    gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", f"{args.model}.gin"))
    config = DecoderConfig()
    rng = np.random.default_rng(0)
    shapes = nn.unbox(abstract_variables(config)["params"])
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, s.dtype),
                          shapes)
    tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 1, decay_steps=4))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    with tempfile.TemporaryDirectory() as root:  # Removed afterwards (~86 MiB for `small`).
        _measure(args, config, params, opt_state, root)


def _measure(args, config, params, opt_state, root: str) -> None:
    ckpt = checkpoints.Checkpointer(f"{root}/train/checkpoints", save_every=1, async_save=False)
    ckpt.save(1, state_lib.TrainState(jnp.int32(1), params, opt_state), _NoData())
    ckpt.close()
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.model}: {n / 1e6:.1f}M parameters")
    print(f"training checkpoint (params + Adam): {_size(f'{root}/train') / 2**20:.1f} MiB")
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        params_export.export("unused", checkpoint=f"{root}/train", output_dir=f"{root}/{dtype}",
                             dtype=dtype, shard=False, config=config)
        print(f"export {dtype}: {_size(f'{root}/{dtype}') / 2**20:.1f} MiB, "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
