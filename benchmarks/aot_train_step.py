r"""Compile the trainer's full train step for a TPU topology on a CPU host; report memory.

    .venv/bin/pip install 'jax[tpu]==0.10.2'       # libtpu: the TPU compiler, no TPU needed
    .venv/bin/python benchmarks/aot_train_step.py \
        --train_gin=gin_configs/train/cm3leon_7b.gin --topology=v5p:4x4x8 [--gin=K=V ...]

Unlike `aot_tpu.py` (the decoder's forward+backward, its helpers reused here), this
compiles exactly what `train` runs: the state created by `train/state.py` (params and
both Adam moments sharded by the logical rules), `train/step.py`'s step with the size
file's micro-batching, global-norm clipping, AdamW, the schedule and the metrics, the
state donated, on the mesh the size file's gin chooses (`train_mesh` over the topology's
devices), at the size file's global batch and sequence length. Nothing runs; the
per-device `memory_analysis()` says whether it fits the chip's HBM.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import reporting  # noqa: E402
from aot_tpu import CHIPS, GIB  # noqa: E402  (the decoder benchmark's chip table)

from cm3leon_jax import main as main_lib  # noqa: E402
from cm3leon_jax.model.config import DecoderConfig  # noqa: E402
from cm3leon_jax.model.decoder import Decoder, count_params  # noqa: E402
from cm3leon_jax.train import distributed, optimizer  # noqa: E402
from cm3leon_jax.train import state as state_lib  # noqa: E402
from cm3leon_jax.train import step as step_lib  # noqa: E402

FEATURES = {"decoder_input_tokens": jnp.int32, "decoder_target_tokens": jnp.int32,
            "decoder_loss_weights": jnp.float32, "decoder_segment_ids": jnp.int32,
            "decoder_positions": jnp.int32}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_gin", required=True, help="a gin_configs/train/ size file")
    parser.add_argument("--topology", default="v5p:4x4x8")
    parser.add_argument("--gin", action="append", default=[], help="extra bindings K=V")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    gin.clear_config()
    main_lib.configure([args.train_gin], ["MODEL_DIR='/tmp/unused'", *args.gin])
    from cm3leon_jax.train import trainer
    bound = gin.get_bindings(trainer.train)  # What the file leaves unbound: train()'s default.
    defaults = inspect.signature(trainer.train).parameters
    train = {k: bound.get(k, defaults[k].default) for k in
             ("global_batch_size", "seq_len", "num_microbatches", "num_steps", "on_nonfinite")}
    devices = reporting.tpu_topology(args.topology).devices
    chip, hbm, _ = CHIPS.get(devices[0].device_kind, (devices[0].device_kind, None, None))
    config = DecoderConfig()
    mesh = distributed.train_mesh(devices=devices)
    model = Decoder(config)
    schedule = optimizer.learning_rate_schedule(total_steps=train["num_steps"])
    tx = optimizer.make_optimizer(schedule, param_axes=state_lib.param_axes(config))
    b, length = train["global_batch_size"], train["seq_len"]
    print(f"{args.train_gin}: {count_params(config):,} params, dtype {config.dtype}, "
          f"params {config.param_dtype}, remat {config.remat_policy!r}")
    print(f"{args.topology}: {len(devices)} x {chip}; mesh {dict(mesh.shape)}; batch {b} x "
          f"{length} in {train['num_microbatches']} micro-batches "
          f"({b // train['num_microbatches'] / len(devices):g} sequences per chip each)")

    # Outside the mesh context: optax builds placeholder states eagerly, and the
    # topology's devices cannot run anything.
    abstract_state = state_lib.abstract_train_state(model, tx, mesh)
    shardings = state_lib.state_shardings(model, tx, mesh)
    with jax.set_mesh(mesh):
        batch_sharding = step_lib.batch_sharding(mesh, (b, length))
        batch = {k: jax.ShapeDtypeStruct((b, length), dt, sharding=batch_sharding)
                 for k, dt in FEATURES.items()}
        fn = step_lib.jit_train_step(
            step_lib.make_train_step(model, tx, schedule, train["num_microbatches"],
                                     train["on_nonfinite"]),
            shardings, batch_sharding, mesh)
        t0 = time.time()
        lowered = fn.lower(abstract_state, batch)
        t1 = time.time()
        try:
            compiled = lowered.compile()
            error = None
        except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, error = None, str(e).splitlines()[0]
    t2 = time.time()
    state_bytes = state_lib.bytes_per_device(abstract_state)
    result = {"train_gin": args.train_gin, "topology": args.topology, "chips": len(devices),
              "mesh": dict(mesh.shape), "global_batch": b, "seq_len": length,
              "num_microbatches": train["num_microbatches"], "remat": config.remat_policy,
              "state_gib_per_chip": state_bytes / GIB, "hbm_gib": hbm / GIB if hbm else None,
              "lower_s": t1 - t0, "compile_s": t2 - t1}
    print(f"lower {t1 - t0:.0f} s, compile {t2 - t1:.0f} s")
    print(f"train state (params + Adam moments) per chip: {state_bytes / GIB:.2f} GiB")
    if compiled is None:
        print(f"DOES NOT FIT: {error}")
        result.update(fits=False, error=error)
    else:
        mem = compiled.memory_analysis()
        sizes = {f: int(getattr(mem, f, 0) or 0) / GIB for f in
                 ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes")}
        total = (sizes["argument_size_in_bytes"] + sizes["output_size_in_bytes"]
                 - sizes["alias_size_in_bytes"] + sizes["temp_size_in_bytes"]
                 + sizes["generated_code_size_in_bytes"])
        for name, gib in sizes.items():
            print(f"  {name:32s} {gib:8.2f} GiB")
        fits = hbm is None or total * GIB <= hbm
        print(f"  {'total (args+out-alias+temp+code)':32s} {total:8.2f} GiB of "
              f"{hbm / GIB if hbm else float('nan'):.0f} GiB HBM: "
              f"{'FITS' if fits else 'DOES NOT FIT'}")
        result.update(sizes, total_gib=total, fits=fits)
    reporting.write_json(args.json, result)
    return result


if __name__ == "__main__":
    reporting.cli(main)
