r"""The sampler on this CPU against `transformers` generate, and against the memory roofline.

    .venv/bin/python benchmarks/decode.py [--trials=3] \
        [--parts=main,kernel,bf16,cfg,sort,scanned,choice,image,prefill,shared,profile] \
        [--json=out.json]

The settings of issue 14: a CM3Leon-architecture decoder (d 512, 8 layers, 8 heads of
64, GELU MLP 2048, vocabulary 9216, tied embeddings), batch 4, a 32-token prompt, 256
new tokens, top-p 0.9, float32, the same random weights in both (copied with
`model/hf_weights.py`). Measured in one process, interleaved trial by trial (the host
is shared; only ratios within a trial mean much), medians and [min, max] reported:

  * main: our `sampler.sample` (prefill + the whole loop in one jit, `DecoderStep`)
    against `transformers` `OPTForCausalLM.generate(do_sample=True, top_p=0.9, top_k=0)`
    with its KV cache, both writing exactly 256 tokens (no stop rule, `min_new_tokens`).
  * sort / scanned: ours with the previous sort-based top-p (`SortedTopP`), and ours
    through the previous scanned `Decoder(decode=True)`: what each change bought.
  * choice: milliseconds per step of the token choice alone (top-p, through XLA or its
    kernel, and the inverse-CDF draw over batch x vocabulary, 256 steps in one jit), each
    top-p and none.
  * roofline: a decode step must read every weight (the position table aside) and the
    KV cache written so far; over the streaming-read rate measured in the same trial
    (the best of numpy, torch and XLA summing a 512 MiB array) that bounds tokens/s.
  * kernel: ours through `DecoderStep(cpu_kernels=True)` (the CPU kernel of
    `model/cpu_kernels.py` for every few-row product) and top-p's threshold through its
    kernel (`TopP(cpu_kernel=True)`), as `Generator(cpu_kernels=True)` samples, beside ours
    through XLA's dot; with bf16 and cfg, their kernel variants too.
  * bf16: the same with bfloat16 weights and activations (ours and the peer's).
  * cfg: classifier-free guidance (a second, unconditional stream of 4 rows): its time
    over the unguided time.
  * image: one 1024-code image with CFG (2 streams of 1 row) from `small.gin`
    (position table 1088 long so that prompt + 1024 codes fit).
  * prefill: a text-to-image prompt with 2 retrieved documents (each 16 text tokens,
    `<break>`, 1024 codes, `<eos>`), 2,101 tokens, through the prefill of the d512 model.
  * shared: best of 8 with CFG, as the demo and the paper draw text to image: 2 captions
    x 8 samples, each prompt 2 retrieved documents (16 text tokens, `<break>`, 256 codes,
    `<eos>`) and the caption, the unconditional stream `<sentinel> <break>` for every row,
    64 new tokens, `small` with the CPU kernels; the sampler prefilling each distinct prompt
    once (`share_prefill`, the default) against prefilling all 32 rows, trial by trial.
  * profile: where a step of ours goes, alone in the process (no peer loaded), XLA's dot
    and the kernels, f32: one 256-token call under `jax.profiler`, the time of each XLA op
    (ms a step) summed per kind (the op name without its number), and the costliest ops.
Peak memory: XLA's `memory_analysis()` of the compiled sampler (arguments + outputs +
temporaries) and the process's peak RSS. Results and commands: benchmarks/RESULTS_decode.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import resource
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Idle torch threads must not spin.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import flax.struct  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import reporting  # noqa: E402
from reporting import spread  # noqa: E402

from cm3leon_jax.decode import processors as proc  # noqa: E402
from cm3leon_jax.decode import sampler  # noqa: E402
from cm3leon_jax.model import hf_weights  # noqa: E402
from cm3leon_jax.model.config import DecoderConfig  # noqa: E402
from cm3leon_jax.model.decode_step import DecoderStep  # noqa: E402
from cm3leon_jax.model.decoder import Decoder, abstract_variables, init_cache  # noqa: E402
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID  # noqa: E402

PAUSE_S = 0.3
KERNEL_TOP_P = functools.partial(proc.TopP, cpu_kernel=True)  # as Generator(cpu_kernels=True)
BENCH = DecoderConfig(vocab_size=9216, num_layers=8, d_model=512, num_heads=8, mlp_dim=2048,
                      max_length=4096)


def random_params(config: DecoderConfig, seed: int = 0) -> dict:
    """Every weight random (fresh init zeroes the output projections), ~N(0, 1/d)."""
    shapes = nn.unbox(abstract_variables(config)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)
                                              / np.sqrt(config.d_model)), shapes)


def cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


def timed(fn) -> float:
    return reporting.timed(fn, PAUSE_S)


# -- the streaming-read rate and the roofline ---------------------------------------------

def stream_rates(mib: int = 512) -> dict[str, float]:
    """Bytes/s reading a `mib` MiB float32 array once, best of 3, by three readers."""
    import torch
    n = mib * 2 ** 20 // 4
    x_np = np.ones(n, np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np)
    jax_sum = jax.jit(jnp.sum)
    jax_sum(x_jax).block_until_ready()
    readers = {"numpy": lambda: x_np.sum(), "torch": lambda: float(x_torch.sum()),
               "xla": lambda: jax_sum(x_jax).block_until_ready()}
    return {name: n * 4 / min(timed(f) for _ in range(3)) for name, f in readers.items()}


def bytes_per_step(config: DecoderConfig, params, batch: int, prompt: int, new: int,
                   kv_bytes: int) -> float:
    """Weights (the position table aside) + the mean KV cache written so far, per step."""
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    weights -= config.max_length * config.d_model * jax.tree.leaves(params)[0].dtype.itemsize \
        if config.position_embedding == "learned" else 0
    mean_context = prompt + (new - 1) / 2
    kv = 2 * config.num_layers * batch * mean_context * config.kv_heads * \
        config.dims_per_head * kv_bytes
    return weights + kv


# -- the two samplers ----------------------------------------------------------------------

@flax.struct.dataclass
class SortedTopP:
    """The previous `TopP`, kept as a peer: sort the vocabulary, accumulate, cut at p."""

    p: float

    def __call__(self, scores, state):
        ranked = -jnp.sort(-scores, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.where(jnp.cumsum(probs, axis=-1) - probs < self.p, ranked, jnp.inf)
        return jnp.where(scores >= kept.min(axis=-1, keepdims=True), scores, -jnp.inf)


class Ours:
    """`sampler.sample` with top-p 0.9 (optionally CFG), compiled once, timed per call."""

    def __init__(self, config, params, prompts, new, cfg=False, model=DecoderStep,
                 top_p=proc.TopP):
        self.model, self.params, self.new = model(config), params, new
        self.prompts = np.concatenate([prompts, prompts[:, -1:].repeat(prompts.shape[1], 1)]) \
            if cfg else prompts
        chain = (proc.ClassifierFreeGuidance(3.0),) if cfg else ()
        self.kwargs = dict(max_new_tokens=new, processors=chain + (top_p(0.9),),
                           num_streams=2 if cfg else 1)
        self.run()  # Compile.

    def run(self):
        out = sampler.sample(self.model, self.params, self.prompts,
                             jax.random.key(0), **self.kwargs)
        out.tokens.block_until_ready()
        assert int(np.asarray(out.lengths).min()) == self.new
        return out

    def memory(self) -> dict[str, float]:
        fn = sampler._compiled(self.model, False, self.kwargs["num_streams"], self.new)
        batch = self.prompts.shape[0] // self.kwargs["num_streams"]
        stats = fn.lower(self.params, jnp.asarray(self.prompts), jax.random.key(0),
                         jnp.arange(batch, dtype=jnp.uint32), self.kwargs["processors"],
                         None).compile().memory_analysis()
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes)
        return {"xla_total_mib": total / 2 ** 20,
                "xla_temp_mib": stats.temp_size_in_bytes / 2 ** 20}


@dataclasses.dataclass(frozen=True)
class ScannedDecoder:
    """The previous decode path: `Decoder(decode=True)` (scanned layers, stacked cache)."""

    config: DecoderConfig

    def init_cache(self, rows, length):
        return init_cache(Decoder(self.config), rows, length)

    def __call__(self, params, cache, tokens, segment_ids, positions):
        logits, new = Decoder(self.config).apply({"params": params, "cache": cache}, tokens,
                                                 segment_ids, positions, decode=True,
                                                 mutable=["cache"])
        return logits[:, -1], new["cache"]


class HF:
    """`OPTForCausalLM.generate` with the same weights, sampling top-p 0.9, KV cache on."""

    def __init__(self, config, params, prompts, new, dtype="float32"):
        import torch
        import transformers
        self.torch, self.new = torch, new
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
                **hf_weights.hf_config_kwargs(config, "opt"))).eval()
        sd = {k: torch.from_numpy(np.array(v, np.float32))
              for k, v in hf_weights.to_hf(cast(params, jnp.float32), config, "opt").items()}
        model.load_state_dict(sd, strict=False)
        self.model = model.to(getattr(torch, dtype))
        self.prompts = torch.from_numpy(prompts.astype(np.int64))
        self.run()  # Warm up.

    def run(self):
        with self.torch.no_grad():
            self.torch.manual_seed(0)
            out = self.model.generate(self.prompts, attention_mask=self.torch.ones_like(
                    self.prompts), do_sample=True, top_p=0.9, top_k=0, max_new_tokens=self.new,
                    min_new_tokens=self.new, pad_token_id=1)
        assert out.shape[1] == self.prompts.shape[1] + self.new
        return out


# -- the parts -----------------------------------------------------------------------------

def main_parts(args, parts) -> dict:
    """main / bf16 / cfg: ours and the peer interleaved, trial by trial."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, BENCH.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    params = random_params(BENCH)
    tokens = args.batch * args.new
    runners = {"ours_f32": Ours(BENCH, params, prompts, args.new),
               "hf_f32": HF(BENCH, params, prompts, args.new)}
    if "sort" in parts:
        runners["sort_f32"] = Ours(BENCH, params, prompts, args.new, top_p=SortedTopP)
    if "scanned" in parts:
        runners["scanned_f32"] = Ours(BENCH, params, prompts, args.new, model=ScannedDecoder)
    if "bf16" in parts:
        bf = BENCH.replace(dtype="bfloat16", param_dtype="bfloat16")
        runners["ours_bf16"] = Ours(bf, cast(params, jnp.bfloat16), prompts, args.new)
        runners["hf_bf16"] = HF(BENCH, params, prompts, args.new, dtype="bfloat16")
    if "cfg" in parts:
        runners["ours_f32_cfg"] = Ours(BENCH, params, prompts, args.new, cfg=True)
    kernel = dict(model=functools.partial(DecoderStep, cpu_kernels=True), top_p=KERNEL_TOP_P)
    if "kernel" in parts:
        runners["kernel_f32"] = Ours(BENCH, params, prompts, args.new, **kernel)
        if "bf16" in parts:
            runners["kernel_bf16"] = Ours(bf, cast(params, jnp.bfloat16), prompts, args.new,
                                          **kernel)
        if "cfg" in parts:
            runners["kernel_f32_cfg"] = Ours(BENCH, params, prompts, args.new, cfg=True,
                                             **kernel)
    need_f32 = bytes_per_step(BENCH, params, args.batch, args.prompt, args.new, 4)
    need_bf16 = bytes_per_step(BENCH, cast(params, jnp.bfloat16), args.batch, args.prompt,
                               args.new, 2)
    trials = []
    for t in range(args.trials):
        row = {name: tokens / timed(r.run) for name, r in runners.items()}
        rate = max(stream_rates().values())
        row["stream_gb_s"] = rate / 1e9
        row["roofline_f32"] = args.batch * rate / need_f32
        row["roofline_bf16"] = args.batch * rate / need_bf16
        row["speedup_f32"] = row["ours_f32"] / row["hf_f32"]
        row["of_roofline_f32"] = row["ours_f32"] / row["roofline_f32"]
        row["load1"] = os.getloadavg()[0]
        if "sort" in parts:
            row["speedup_vs_sort"] = row["ours_f32"] / row["sort_f32"]
        if "scanned" in parts:
            row["speedup_vs_scanned"] = row["ours_f32"] / row["scanned_f32"]
        if "bf16" in parts:
            row["speedup_bf16_vs_hf_f32"] = row["ours_bf16"] / row["hf_f32"]
            row["speedup_bf16_vs_hf_bf16"] = row["ours_bf16"] / row["hf_bf16"]
            row["of_roofline_bf16"] = row["ours_bf16"] / row["roofline_bf16"]
        if "cfg" in parts:
            row["cfg_cost"] = row["ours_f32"] / row["ours_f32_cfg"]
        if "kernel" in parts:
            row["kernel_speedup_f32"] = row["kernel_f32"] / row["hf_f32"]
            row["kernel_vs_xla_f32"] = row["kernel_f32"] / row["ours_f32"]
            row["kernel_of_roofline_f32"] = row["kernel_f32"] / row["roofline_f32"]
            if "bf16" in parts:
                row["kernel_bf16_vs_hf_f32"] = row["kernel_bf16"] / row["hf_f32"]
                row["kernel_bf16_vs_hf_bf16"] = row["kernel_bf16"] / row["hf_bf16"]
                row["kernel_of_roofline_bf16"] = row["kernel_bf16"] / row["roofline_bf16"]
            if "cfg" in parts:
                row["kernel_cfg_cost"] = row["kernel_f32"] / row["kernel_f32_cfg"]
        print(f"trial {t}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
        trials.append(row)
    out = {k: spread([r[k] for r in trials]) for k in trials[0]}
    out["memory"] = {name: r.memory() for name, r in runners.items() if isinstance(r, Ours)}
    out["bytes_per_step_mb"] = {"f32": need_f32 / 1e6, "bf16": need_bf16 / 1e6}
    return out


def choice_part(args) -> dict:
    """ms per step of choosing tokens alone: [batch, vocab] scores, top-p 0.9, then the
    sampler's inverse-CDF `draw`, 256 steps in one jit; each top-p, and no top-p with
    each draw (`sampler.draw` or the Gumbel draw of `jax.random.categorical`)."""
    scores = jnp.asarray(np.random.default_rng(3).normal(0, 3, (args.batch, BENCH.vocab_size)),
                         jnp.float32)
    state = proc.DecodeState(jnp.int32(0), jnp.zeros((args.batch, 1), jnp.int32),
                             jnp.zeros([args.batch], bool))
    keys = jax.random.split(jax.random.key(0), args.batch)
    warps = {"bisection": proc.TopP(0.9), "kernel": KERNEL_TOP_P(0.9), "sort": SortedTopP(0.9),
             "none": None, "none_gumbel": None}

    @functools.partial(jax.jit, static_argnums=1)
    def steps(scores, name):
        def one(i, total):  # The running total feeds back: no step can be hoisted.
            x = scores + total[:, None].astype(jnp.float32) * 1e-9
            x = x if warps[name] is None else warps[name](x, state)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
            if name == "none_gumbel":
                return total + jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)
            return total + sampler.draw(step_keys, x)
        return jax.lax.fori_loop(0, 256, one, jnp.zeros([args.batch], jnp.int32))

    trials = {name: [] for name in warps}
    for name in warps:
        steps(scores, name).block_until_ready()
    for _ in range(args.trials):
        for name in warps:
            trials[name].append(timed(lambda: steps(scores, name).block_until_ready())
                                / 256 * 1e3)
    return {f"{name}_ms_per_step": spread(v) for name, v in trials.items()}


def small_config() -> DecoderConfig:
    """`gin_configs/models/small.gin`'s decoder (the gin state left clear)."""
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", "small.gin"))
    config = DecoderConfig()
    gin.clear_config()
    return config


def image_part(args) -> dict:
    """One 1024-code image with CFG from `small` (2 streams of 1 row), seconds."""
    config = small_config().replace(max_length=1088)
    prompts = np.random.default_rng(1).integers(4, config.vocab_size, (1, 32)).astype(np.int32)
    params = random_params(config)
    runners = {"xla": Ours(config, params, prompts, 1024, cfg=True)}
    if "kernel" in args.parts.split(","):
        runners["kernel"] = Ours(config, params, prompts, 1024, cfg=True, top_p=KERNEL_TOP_P,
                                 model=functools.partial(DecoderStep, cpu_kernels=True))
    seconds = {name: [] for name in runners}
    for _ in range(args.trials):
        for name, runner in runners.items():
            seconds[name].append(timed(runner.run))
    return {"seconds_per_image": spread(seconds["xla"]), "memory": runners["xla"].memory(),
            **({"kernel_seconds_per_image": spread(seconds["kernel"])} if "kernel" in runners
               else {})}


def prefill_part(args) -> dict:
    """Tokens/s of the prefill of a 2-retrieved-document prompt (2,101 tokens), d512 model."""
    doc = [5] * 16 + [3] + [600] * 1024 + [2]
    length = 2 * len(doc) + 16 + 1
    prompts = jnp.asarray(np.random.default_rng(2).integers(4, BENCH.vocab_size, (1, length)),
                          jnp.int32)
    model = DecoderStep(BENCH)
    weights = jax.jit(model.prepare)(random_params(BENCH))  # Once per `sample` call: untimed.
    ones = jnp.ones_like(prompts)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    prefill = jax.jit(lambda p, t: model(p, model.init_cache(1, length + 1024), t, ones,
                                         positions)[0])
    prefill(weights, prompts).block_until_ready()
    seconds = [timed(lambda: prefill(weights, prompts).block_until_ready())
               for _ in range(args.trials)]
    return {"prompt_tokens": length, "seconds": spread(seconds),
            "tokens_per_s": spread([length / s for s in seconds])}


def shared_part(args) -> dict:
    """Best of 8 with CFG on 2 retrieved documents: seconds with the prefill shared by the
    rows of a prompt, and without (the same tokens to float rounding)."""
    config = small_config()
    rng = np.random.default_rng(3)
    ids = lambda n: rng.integers(40, config.vocab_size, n).tolist()
    doc = lambda: ids(16) + [BREAK_ID] + ids(256) + [EOS_ID]
    cond = [doc() + doc() + ids(16) + [BREAK_ID] for _ in range(2)]
    rows = [c for c in cond for _ in range(8)]
    prompts = sampler.left_pad(rows + [[5, BREAK_ID]] * len(rows))  # 5: a sentinel's place
    model, params = DecoderStep(config, cpu_kernels=True), random_params(config)
    kwargs = dict(max_new_tokens=64, num_streams=2,
                  processors=(proc.ClassifierFreeGuidance(3.0), KERNEL_TOP_P(0.9)))
    runs = {name: functools.partial(sampler.sample, model, params, prompts, jax.random.key(0),
                                    share_prefill=share, **kwargs)
            for name, share in (("shared", True), ("every_row", False))}
    for run in runs.values():
        run().tokens.block_until_ready()  # Compile.
    seconds = {name: [] for name in runs}
    for _ in range(args.trials):
        for name, run in runs.items():
            seconds[name].append(timed(lambda: run().tokens.block_until_ready()))
    return {"rows": int(prompts.shape[0]), "prompt_tokens": int(prompts.shape[1]),
            "distinct_prompts": len(cond) + 1,
            **{f"{name}_seconds": spread(v) for name, v in seconds.items()},
            "every_row_over_shared": spread([b / a for a, b in zip(seconds["shared"],
                                                                   seconds["every_row"])])}


def profile_part(args, top: int = 64) -> dict:
    """ms a step of ours' XLA ops, per kind and the costliest, XLA's dot and the kernels."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, BENCH.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    params = random_params(BENCH)
    out = {}
    for name, model, top_p in (
            ("xla", DecoderStep, proc.TopP),
            ("kernels", functools.partial(DecoderStep, cpu_kernels=True), KERNEL_TOP_P)):
        runner = Ours(BENCH, params, prompts, args.new, model=model, top_p=top_p)
        times, counts = reporting.xla_op_times(runner.run, 1)
        ms = {op: us / 1e3 / args.new for op, us in times.items()
              if not op.startswith(("$", "ThunkExecutor", "SlinkyThreadPool"))}
        kinds = collections.Counter()
        for op, t in ms.items():
            kinds[op.rsplit(".", 1)[0] if op.rsplit(".", 1)[-1].isdigit() else op] += t
        costliest = sorted(ms.items(), key=lambda kv: -kv[1])[:top]
        out[name] = {"ms_per_step_by_kind": dict(kinds.most_common()),
                     "costliest_ms_per_step": dict(costliest),
                     "calls_per_step": {op: counts[op] / args.new for op, _ in costliest}}
        print(f"{name}: ms a step by kind: " + ", ".join(
                f"{k} {v:.3f}" for k, v in kinds.most_common(12)), flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=reporting.at_least_one, default=3)
    parser.add_argument("--parts", default="main,kernel,bf16,cfg,sort,choice,image,prefill")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    result = {"args": vars(args), "devices": str(jax.devices())}
    run = {"main": lambda: main_parts(args, parts), "choice": lambda: choice_part(args),
           "image": lambda: image_part(args), "prefill": lambda: prefill_part(args),
           "shared": lambda: shared_part(args), "profile": lambda: profile_part(args)}
    variants = {"kernel", "bf16", "cfg", "sort", "scanned"}  # Variants of main's rows.
    unknown = sorted(set(parts) - set(run) - variants)
    if unknown or (set(parts) & variants and "main" not in parts):
        parser.error(f"--parts={args.parts}: " + (
            f"unknown {unknown}; choose from {sorted(set(run) | variants)}" if unknown else
            f"{sorted(set(parts) & variants)} are variants of the main rows: add main"))
    for name in (n for n in run if n in parts):
        result[name] = run[name]()
        result["load_average"] = os.getloadavg()
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        reporting.write_json(args.json, result)  # After each part: a later failure keeps it.
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    reporting.cli(main)
