r"""Compile a model's decode step for a TPU topology on a CPU host; memory, cost, time per image.

    .venv/bin/pip install 'jax[tpu]==0.10.2'       # libtpu: the TPU compiler, no TPU needed
    .venv/bin/python benchmarks/aot_decode.py --model=cm3leon_7b --topology=v5p:2x2x1 \
        --tensor=4 [--images=1] [--prompt=2098] [--json=out.json]

What `decode/sampler.py` runs per image, compiled (never run) by libtpu for the topology:
`model/decode_step.py`'s `DecoderStep` with bfloat16 weights, `prepare`d (per-layer,
`[out, in]`) and placed by the training's logical-axis rules (`partitioning.py`) on a
`(data, fsdp, tensor)` mesh of the topology's chips, and a KV cache for `images` x 2
rows (CFG: a conditional and an unconditional stream), batch over data, `prompt` +
1024 slots, donated so each step writes it in place. Two programs: the prefill of the
prompt (default 2,098 tokens: 2 retrieved documents and a caption, as in the paper's
setting), and one token's step. Printed per chip: XLA's `memory_analysis()` (what
must fit in HBM) and `cost_analysis()` (FLOPs, bytes accessed), the model's own count
of the bytes a step must read, and the time per 1024-code image those imply at the
chip's HBM bandwidth and bf16 peak: a lower bound (no collectives, no host, no
sampling). Recorded results: benchmarks/RESULTS_pod_configs.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import reporting  # noqa: E402
from aot_tpu import (  # noqa: E402
    CHIPS,
    GIB,
    HBM_BANDWIDTH,
    cost,
    load_config,
    memory_sizes,
    sharded_abstract_params,  # noqa: E402
)
from jax.sharding import NamedSharding  # noqa: E402

from cm3leon_jax.model import partitioning  # noqa: E402
from cm3leon_jax.model.decode_step import DecoderStep  # noqa: E402
from cm3leon_jax.model.decoder import count_params  # noqa: E402

IMAGE_CODES = 1024  # 32 x 32 codes: one 256x256 image.


def _with_shardings(compiled, lowered) -> object:
    """The compiled program's outputs as `ShapeDtypeStruct`s carrying their shardings."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        lowered.out_info, compiled.output_shardings)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def decode_inputs(model: DecoderStep, mesh, rows: int, length: int):
    """(prepared weights, empty cache), abstract and sharded as the sampler's program makes
    them: `prepare` and `init_cache` constrain their outputs by the logical rules."""
    params, _ = sharded_abstract_params(model.config, mesh)
    with jax.set_mesh(mesh):
        lowered = jax.jit(model.prepare).lower(params)
        weights = _with_shardings(lowered.compile(), lowered)
        lowered = jax.jit(lambda: model.init_cache(rows, length)).lower()
        cache = _with_shardings(lowered.compile(), lowered)
    return weights, cache


def compile_call(model: DecoderStep, mesh, weights, cache, tokens: int) -> dict:
    """Compiles `model(weights, cache, tokens[rows, n], ...)` with the cache donated;
    its per-chip memory, XLA's cost estimate and the compile time."""
    rows = cache["segment_ids"].shape[0]
    batch_sh = NamedSharding(mesh, partitioning.logical_to_mesh_axes(
            ("batch", "length"), shape=(rows, tokens), mesh=mesh))
    ids = jax.ShapeDtypeStruct((rows, tokens), jnp.int32, sharding=batch_sh)
    logits_sh = NamedSharding(mesh, partitioning.logical_to_mesh_axes(
            ("batch", "vocab"), shape=(rows, model.config.vocab_size), mesh=mesh))
    cache_sh = jax.tree.map(lambda x: x.sharding, cache)
    t0 = time.time()
    with jax.set_mesh(mesh):
        step = jax.jit(model.__call__, donate_argnums=(1,), out_shardings=(logits_sh, cache_sh))
        compiled = step.lower(weights, cache, ids, ids, ids).compile()
    return {"memory": memory_sizes(compiled), **cost(compiled),
            "compile_s": time.time() - t0}


def model_step_bytes(weights, cache, config) -> int:
    """Bytes one chip must read per token: its share of every weight (the learned position
    table aside: a step gathers one row of it) and of the whole cache (the one-query
    attention reads every slot, masked, at fixed shapes)."""
    table = {k: v for k, v in weights.items() if k != "positions"}
    return per_chip_bytes(table) + per_chip_bytes(cache)


def model_step_flops(config, rows: int, length: int) -> float:
    """FLOPs of one token's step, all chips: 2 per weight per row for the projections and
    the logits, and the one-query attention over all `length` slots (scores and values)."""
    d, heads, kv = config.d_model, config.num_heads, config.kv_heads
    mlp = config.mlp_dim * (3 if config.gated_mlp else 2)
    per_layer = d * config.dims_per_head * (2 * heads + 2 * kv) + d * mlp
    attention = 2 * heads * config.dims_per_head * length
    return 2.0 * rows * (config.num_layers * (per_layer + attention)
                         + config.vocab_size * d)


def implied_seconds(step: dict, prefill: dict, step_bytes: int, bandwidth: float,
                    peak: float, images: int, codes: int = IMAGE_CODES) -> dict:
    """Seconds per image, lower bounds: each program takes at least its bytes over the HBM
    bandwidth and its FLOPs over the bf16 peak (the larger of the two)."""
    step_s = max(step_bytes / bandwidth, step["flops"] / peak)
    step_xla_s = max(step["bytes_accessed"] / bandwidth, step["flops"] / peak)
    prefill_s = max(prefill["bytes_accessed"] / bandwidth, prefill["flops"] / peak)
    return {"step_ms": step_s * 1e3, "step_ms_xla_bytes": step_xla_s * 1e3,
            "prefill_s": prefill_s,
            "per_image_s": (prefill_s + codes * step_s) / images,
            "per_image_s_xla_bytes": (prefill_s + codes * step_xla_s) / images}


def report(args, chip, mesh, n_params, step, prefill, step_bytes, model_flops, times,
           hbm) -> None:
    print(f"model {args.model}: {n_params:,} params, bf16; {args.images} image(s) x 2 streams "
          f"(CFG); prompt {args.prompt} + {args.codes} codes; {chip} mesh {dict(mesh.shape)}")
    for name, r in (("prefill", prefill), ("step", step)):
        m = r["memory"]
        print(f"{name}: compiled in {r['compile_s']:.1f} s; per chip: memory "
              f"{m['total'] / GIB:.2f} of {hbm / GIB:.0f} GiB (args "
              f"{m['argument_size_in_bytes'] / GIB:.2f}, temp {m['temp_size_in_bytes'] / GIB:.2f}"
              f", aliased {m['alias_size_in_bytes'] / GIB:.2f}); XLA cost: {r['flops']:.4g} "
              f"FLOPs, {r['bytes_accessed'] / 1e9:.3f} GB accessed")
    print(f"step: the model's count per chip: {step_bytes / 1e9:.3f} GB to read, "
          f"{model_flops:.4g} FLOPs")
    print(f"implied (lower bounds, compiled not run): step {times['step_ms']:.2f} ms "
          f"({times['step_ms_xla_bytes']:.2f} ms by XLA's bytes), prefill "
          f"{times['prefill_s']:.3f} s, per {args.codes}-code image with CFG "
          f"{times['per_image_s']:.2f} s ({times['per_image_s_xla_bytes']:.2f} s by XLA's "
          "bytes); paper: 11.8 s (7B, bf16)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cm3leon_7b", help="a gin_configs/models/ name")
    parser.add_argument("--topology", default="v5p:2x2x1", help="v5p:2x2x1 (v5p-8), v5e:2x4")
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=-1, help="-1: the remaining devices")
    parser.add_argument("--images", type=int, default=1, help="images per batch (x2 rows)")
    parser.add_argument("--prompt", type=int, default=2098, help="prompt tokens")
    parser.add_argument("--codes", type=int, default=IMAGE_CODES, help="tokens per image")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    config = load_config(args.model, ["DecoderConfig.param_dtype = 'bfloat16'",
                                      "DecoderConfig.dtype = 'bfloat16'", *args.gin])
    devices = reporting.tpu_topology(args.topology).devices
    chip, hbm, peak = CHIPS[devices[0].device_kind]
    mesh = partitioning.make_mesh(args.data, args.fsdp, args.tensor, devices=devices)
    model = DecoderStep(config)
    weights, cache = decode_inputs(model, mesh, 2 * args.images, args.prompt + args.codes)
    prefill = compile_call(model, mesh, weights, cache, args.prompt)
    step = compile_call(model, mesh, weights, cache, 1)
    step_bytes = model_step_bytes(weights, cache, config)
    times = implied_seconds(step, prefill, step_bytes, HBM_BANDWIDTH[chip], peak,
                            args.images, args.codes)
    n_params = count_params(config)
    model_flops = model_step_flops(config, 2 * args.images, args.prompt + args.codes) / len(
            devices)
    report(args, chip, mesh, n_params, step, prefill, step_bytes, model_flops, times, hbm)
    result = {"args": vars(args), "chip": chip, "chips": len(devices), "mesh": dict(mesh.shape),
              "params": n_params, "hbm": hbm, "hbm_bandwidth": HBM_BANDWIDTH[chip],
              "bf16_peak": peak, "prefill": prefill, "step": step,
              "step_bytes_model": step_bytes, "step_flops_model": model_flops,
              "implied": times,
              "fits": max(prefill["memory"]["total"], step["memory"]["total"]) <= hbm}
    reporting.write_json(args.json, result)
    return result


if __name__ == "__main__":
    reporting.cli(main)
