r"""Compile a model's training step for a TPU topology on a CPU host; report memory and cost.

    .venv/bin/pip install 'jax[tpu]==0.10.2'       # libtpu: the TPU compiler, no TPU needed
    .venv/bin/python benchmarks/aot_tpu.py --model=cm3leon_7b --topology=v5p:2x2x2 \
        --fsdp=4 --tensor=2 --global_batch=8 --seq=4096 [--optimizer]

Lowers and compiles forward+backward (loss and gradients; with `--optimizer`, also an
AdamW update with its two moments) of a `gin_configs/models/*.gin` model, with the
gin-bound logical-axis rules (`partitioning.py`) on a `(data, fsdp, tensor)` mesh over
the topology's devices, and prints XLA's per-device `memory_analysis()` and
`cost_analysis()`. Nothing runs: this checks that a big config fits and shards as
intended before any hardware is reserved (the MaxText habit). Recorded results are in
benchmarks/RESULTS_model.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# libtpu takes a process-wide lock file; allow the compile-only use to share the host
# with other JAX processes (tests) that also load the plugin.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import reporting  # noqa: E402

from cm3leon_jax.model import partitioning  # noqa: E402
from cm3leon_jax.model.config import DecoderConfig  # noqa: E402
from cm3leon_jax.model.decoder import Decoder, abstract_variables, count_params  # noqa: E402
from cm3leon_jax.model.loss import decoder_loss  # noqa: E402

GIB = 1024 ** 3
# Per chip: HBM and dense bf16 peak (Google Cloud TPU documentation).
CHIPS = {"TPU v5": ("v5p", 95 * GIB, 459e12), "TPU v5 lite": ("v5e", 16 * GIB, 197e12),
         "TPU v4": ("v4", 32 * GIB, 275e12), "TPU v6 lite": ("v6e", 32 * GIB, 918e12)}
# Per chip: HBM bandwidth in bytes/s (same source): what bounds a decode step.
HBM_BANDWIDTH = {"v5p": 2765e9, "v5e": 819e9, "v4": 1200e9, "v6e": 1640e9}
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def load_config(model: str, bindings: list[str]) -> DecoderConfig:
    gin.clear_config()
    gin.parse_config_files_and_bindings(
            [os.path.join(REPO, "gin_configs", "models", f"{model}.gin")], bindings)
    return DecoderConfig()


def sharded_abstract_params(config: DecoderConfig, mesh) -> tuple[dict, dict]:
    """(params as `ShapeDtypeStruct`s carrying their shardings, the shardings): the
    decoder's parameters placed by the logical-axis rules on `mesh`, nothing allocated."""
    abstract = abstract_variables(config)["params"]
    shapes = nn.unbox(abstract)
    param_sh = partitioning.logical_to_sharding(partitioning.logical_axes(abstract), mesh,
                                                shapes=shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, param_sh)
    return params, param_sh


def memory_sizes(compiled) -> dict[str, int]:
    """Per-device `memory_analysis()` fields, and `total`: what must fit in HBM
    (arguments + outputs - aliased (donated) + temporaries + code)."""
    mem = compiled.memory_analysis()
    sizes = {f: int(getattr(mem, f, 0) or 0) for f in MEMORY_FIELDS}
    sizes["total"] = (sizes["argument_size_in_bytes"] + sizes["output_size_in_bytes"]
                      - sizes["alias_size_in_bytes"] + sizes["temp_size_in_bytes"]
                      + sizes["generated_code_size_in_bytes"])
    return sizes


def cost(compiled) -> dict[str, float]:
    """Per-device `cost_analysis()`: XLA's estimate of `flops` and `bytes accessed`."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)),
            "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def build_step(config: DecoderConfig, with_optimizer: bool):
    model = Decoder(config)

    def loss_fn(params, batch):  # The train step's loss: `DecoderConfig.loss_chunk` applies.
        return decoder_loss(model, params, batch, accuracy=False)[0]

    if not with_optimizer:
        return jax.value_and_grad(loss_fn), None
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state
    return step, tx


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cm3leon_7b", help="a gin_configs/models/ name")
    parser.add_argument("--topology", default="v5p:2x2x2", help="e.g. v5p:2x2x2, v5p:4x4x4")
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=-1, help="-1: the remaining devices")
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--global_batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW update")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    args = parser.parse_args(argv)

    config = load_config(args.model, args.gin)
    topo = reporting.tpu_topology(args.topology)
    devices = topo.devices
    chip, hbm, peak = CHIPS.get(devices[0].device_kind, (devices[0].device_kind, None, None))
    mesh = partitioning.make_mesh(args.data, args.fsdp, args.tensor, devices=devices)
    n_params = count_params(config)
    print(f"model {args.model}: {n_params:,} params; {config}")
    print(f"topology {args.topology}: {len(devices)} x {chip}; mesh {dict(mesh.shape)}; "
          f"batch {args.global_batch} x {args.seq}")

    params, param_sh = sharded_abstract_params(config, mesh)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
    batch_sh = NamedSharding(mesh, partitioning.logical_to_mesh_axes(("batch", "length")))
    tok = jax.ShapeDtypeStruct((args.global_batch, args.seq), jnp.int32, sharding=batch_sh)
    wts = jax.ShapeDtypeStruct((args.global_batch, args.seq), jnp.float32, sharding=batch_sh)
    batch = {"decoder_input_tokens": tok, "decoder_target_tokens": tok,
             "decoder_loss_weights": wts, "decoder_segment_ids": tok, "decoder_positions": tok}
    replicated = NamedSharding(mesh, P())

    step, tx = build_step(config, args.optimizer)
    if tx is not None:
        opt_abstract = jax.eval_shape(tx.init, shapes)
        # Adam's moments mirror the params, so they take the params' shardings.
        opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, param_sh,
                                       transform_non_params=lambda _: replicated)
        opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 opt_abstract, opt_sh)
    t0 = time.time()
    with jax.set_mesh(mesh):
        if tx is None:
            jitted = jax.jit(step, out_shardings=(replicated, param_sh))
            lowered = jitted.lower(params, batch)
        else:
            jitted = jax.jit(
                step, out_shardings=(replicated, param_sh, opt_sh), donate_argnums=(0, 1)
            )
            lowered = jitted.lower(params, opt_state, batch)
        t1 = time.time()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # XLA refuses programs that cannot fit.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"DOES NOT FIT ({time.time() - t1:.1f} s): {str(e).splitlines()[0]}")
            return {"fits": False, "error": str(e).splitlines()[0]}
    t2 = time.time()

    sizes = memory_sizes(compiled)
    total = sizes.pop("total")
    peak_mem = int(getattr(compiled.memory_analysis(), "peak_memory_in_bytes", 0) or 0)
    costs = cost(compiled)
    flops = costs["flops"]
    tokens = args.global_batch * args.seq
    model_flops = 6 * n_params * tokens / len(devices)
    print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print("per-device memory_analysis():")
    for f in MEMORY_FIELDS:
        print(f"  {f:32s} {sizes[f] / GIB:9.2f} GiB")
    if peak_mem:
        print(f"  {'peak_memory_in_bytes':32s} {peak_mem / GIB:9.2f} GiB")
    print(f"  {'total (args+out-alias+temp+code)':32s} {total / GIB:9.2f} GiB"
          + (f"  of {hbm / GIB:.0f} GiB HBM: {'FITS' if total <= hbm else 'DOES NOT FIT'}"
             if hbm else ""))
    print("per-device cost_analysis() (XLA's estimate):")
    print(f"  flops {flops:.4g}  bytes accessed {costs['bytes_accessed']:.4g}")
    print("  note: XLA's cost analysis counts the body of the scanned layer stack (a while")
    print("  loop) once, not num_layers times, so this is the embedding, the logits and ONE")
    print(f"  layer. The model's own count, 6 * params * tokens / devices = {model_flops:.4g}.")
    if peak:
        print(
            f"  at 100% of {chip} bf16 peak, 6ND alone takes "
            f"{model_flops / peak * 1e3:.0f} ms/step "
            f"({tokens / len(devices) / (model_flops / peak):.0f} tokens/s/chip upper bound)"
        )
    return {
        "fits": hbm is None or total <= hbm,
        "total_bytes": total,
        "hbm": hbm,
        "flops": flops,
        **sizes,
    }


if __name__ == "__main__":
    reporting.cli(main)
