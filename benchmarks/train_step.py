r"""The trainer's step on this CPU against a PyTorch peer, and where its time goes.

    .venv/bin/python benchmarks/train_step.py [--model=small] [--batch=8] [--seq=512] \
        [--trials=5] [--warmup=4] [--microbatches=1] [--packed] [--profile] [--json=out.json] \
        [--binding DecoderConfig.num_layers=4 ...]

Measures, in one process and interleaved trial by trial (this host is shared, so
contention drifts; each trial's numbers are taken side by side and the medians reported;
each timing starts after a short pause so that neither framework's idle worker threads
spin on the cores the other one is using):

  * the matmul peak of this host: the best float32 `[n, n] @ [n, n]` rate (n = 1024, 2048),
  * the trainer's jitted train step (`train/step.py`: forward, backward, global-norm
    clipping, AdamW, on a one-device mesh) of `gin_configs/models/<model>.gin`,
  * the same architecture in PyTorch: `transformers`' `OPTForCausalLM` with no biases,
    LayerNorm without affine parameters, GELU, tied embeddings, `torch.optim.AdamW`
    after `clip_grad_norm_(1.0)`, at the same batch and sequence length and threads.

Both are charged the same model FLOPs (`train/metrics.py`, MaxText's count), so MFU =
FLOPs / (step time * the peak measured in that trial). `--profile` also prints the
JAX step's most expensive XLA ops from a profiler trace (with the jax op they came from).
Results and exact commands: benchmarks/RESULTS_train.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Idle OpenMP threads of the peer must sleep, not spin on the cores the JAX step needs
# (and XLA's pool gets PAUSE_S to park before each timing, for the same reason).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
PAUSE_S = 0.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cm3leon_jax import hostmem  # noqa: E402

# As the trainer's entry point does (cm3leon_jax/main.py), before any thread starts: with
# $CM3LEON_JAX_HOST_MEMORY=retain, freed heap is kept for reuse, for both frameworks in
# this process (unset: glibc's own policy).
HOST_MEMORY_RETAINED = hostmem.retain_freed_memory()

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import reporting  # noqa: E402

from cm3leon_jax.model import partitioning  # noqa: E402
from cm3leon_jax.model.config import DecoderConfig  # noqa: E402
from cm3leon_jax.model.decoder import Decoder, count_params  # noqa: E402
from cm3leon_jax.train import metrics, optimizer  # noqa: E402
from cm3leon_jax.train import state as state_lib  # noqa: E402
from cm3leon_jax.train import step as step_lib  # noqa: E402

HP = dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0)


def load_config(model: str, bindings: list[str] = ()) -> DecoderConfig:
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", f"{model}.gin"))
    gin.parse_config(list(bindings))
    config = DecoderConfig()
    gin.clear_config()
    return config


def make_batch(config: DecoderConfig, batch: int, seq: int, packed: bool) -> dict:
    """Random tokens; `packed`: 4 documents a row with segment ids and positions."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    out = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": np.ones((batch, seq), np.float32)}
    if packed:
        seg = np.repeat(np.arange(1, 5, dtype=np.int32), seq // 4)[None].repeat(batch, 0)
        pos = np.tile(np.arange(seq // 4, dtype=np.int32), 4)[None].repeat(batch, 0)
        out.update(decoder_segment_ids=seg, decoder_positions=pos)
    return out


class JaxStep:
    """The trainer's train step (AdamW + clipping) on a one-device mesh."""

    def __init__(self, config: DecoderConfig, batch: dict, microbatches: int):
        mesh = partitioning.make_mesh(devices=jax.devices()[:1])
        model = Decoder(config)
        tx = optimizer.make_optimizer(optax.constant_schedule(HP["lr"]), b1=HP["b1"],
                                      b2=HP["b2"], eps=HP["eps"],
                                      weight_decay=HP["weight_decay"], clip_norm=HP["clip"])
        self.mesh = mesh
        with jax.set_mesh(mesh):
            self.state = state_lib.create_train_state(model, tx, mesh, seed=0)
            sharding = step_lib.batch_sharding(mesh, batch["decoder_input_tokens"].shape)
            self.batch = jax.device_put(batch, sharding)
            self.fn = step_lib.jit_train_step(
                step_lib.make_train_step(model, tx, num_microbatches=microbatches),
                state_lib.state_shardings(model, tx, mesh), sharding, mesh)

    def __call__(self) -> float:
        with jax.set_mesh(self.mesh):
            self.state, m = self.fn(self.state, self.batch)
            return float(m["loss"])  # Blocks until the step is done.


class TorchStep:
    """OPTForCausalLM of the same shape, trained with AdamW after clipping."""

    def __init__(self, config: DecoderConfig, batch: dict, threads: int):
        import torch
        from transformers import OPTConfig, OPTForCausalLM
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        hf = OPTConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                       num_hidden_layers=config.num_layers, ffn_dim=config.mlp_dim,
                       num_attention_heads=config.num_heads,
                       max_position_embeddings=config.max_length,
                       word_embed_proj_dim=config.d_model, do_layer_norm_before=True,
                       enable_bias=False, layer_norm_elementwise_affine=False,
                       activation_function="gelu", dropout=0.0, attention_dropout=0.0,
                       tie_word_embeddings=config.tie_embeddings)
        self.torch = torch
        self.model = OPTForCausalLM(hf).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=HP["lr"],
                                     betas=(HP["b1"], HP["b2"]), eps=HP["eps"],
                                     weight_decay=HP["weight_decay"])
        self.inputs = torch.tensor(batch["decoder_input_tokens"], dtype=torch.long)
        self.targets = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
        self.attn_impl = self.model.config._attn_implementation  # pylint: disable=protected-access

    def __call__(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 self.targets.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), HP["clip"])
        self.opt.step()
        return float(loss)


def timed(fn) -> float:
    return reporting.timed(fn, PAUSE_S)


def profile_ops(step: JaxStep, top: int) -> list[tuple[float, int, str, str]]:
    """(ms per step, calls per step, costliest XLA op, jax op) of the costliest jax ops.

    XLA ops from the same jax op are summed (an unrolled layer loop gives each layer its
    own XLA op, a scanned one calls one op per layer). Plain `dot` thunks run on a
    separate pool and show only their launch here.
    """
    names = {}
    with jax.set_mesh(step.mesh):
        hlo = step.fn.lower(step.state, step.batch).compile().as_text()
    for line in hlo.splitlines():
        line = line.strip()
        if " = " in line and "op_name=" in line:
            name = line.split(" = ")[0].replace("ROOT ", "").lstrip("%")
            names[name] = line.split('op_name="')[1].split('"')[0].replace("jit(step)/", "")
    steps = 2
    times, counts = reporting.xla_op_times(step, steps)
    per_op = collections.Counter({n: us for n, us in times.items() if n in names})
    total, calls, costliest = collections.Counter(), collections.Counter(), {}
    for name, us in per_op.most_common():
        source = names[name].replace("while/body/", "").replace("closed_call/", "")
        total[source] += us
        calls[source] += counts[name]
        costliest.setdefault(source, name)
    return [(us / 1e3 / steps, calls[src] // steps, costliest[src], src)
            for src, us in total.most_common(top)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--trials", type=reporting.at_least_one, default=5)
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed steps of each framework first (at least 1: the compile)")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--binding", action="append", default=[],
                        help="a gin binding applied after the model file, e.g. "
                             "DecoderConfig.num_layers=4 (repeatable)")
    parser.add_argument("--packed", action="store_true",
                        help="JAX batch with 4 packed documents a row (segment ids)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no_peer", action="store_true")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest ops")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    config = load_config(args.model, args.binding)
    batch = make_batch(config, args.batch, args.seq, args.packed)
    flops = metrics.train_flops_per_step(config, args.batch, args.seq)
    tokens = args.batch * args.seq
    print(f"{args.model}: {count_params(config):,} params; batch {args.batch} x {args.seq}; "
          f"{flops / 1e9:.1f} GFLOP per train step; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"freed host memory retained: {HOST_MEMORY_RETAINED} (cm3leon_jax/hostmem.py)")

    jax_step = JaxStep(config, batch, args.microbatches)
    peer = None if args.no_peer else TorchStep(config, batch, args.threads)
    # Compile, then warm up: on a freshly booted VM the peer's first steps ran 1.4-1.6x its
    # settled time (memory the guest had never touched; RESULTS_train.md, 6 Dec evening).
    for _ in range(max(args.warmup, 1)):
        jax_step()
        if peer:
            peer()
    if peer:
        print(f"peer: transformers OPTForCausalLM, attention {peer.attn_impl!r}, "
              f"torch {peer.torch.__version__}, {args.threads} threads")

    rows = []
    for trial in range(args.trials):
        peak = metrics.measure_matmul_peak.__wrapped__((1024, 2048), 2)
        t_jax = timed(jax_step)
        t_peer = timed(peer) if peer else float("nan")
        peak = max(peak, metrics.measure_matmul_peak.__wrapped__((1024, 2048), 2))
        rows.append({"peak": peak, "jax": t_jax, "peer": t_peer})
        print(f"trial {trial}: peak {peak / 1e9:6.1f} GFLOP/s | jax {t_jax:6.3f} s "
              f"({flops / t_jax / peak:5.1%} MFU) | peer {t_peer:6.3f} s "
              f"({flops / t_peer / peak:5.1%} MFU)", flush=True)

    med = lambda k: statistics.median(r[k] for r in rows)
    mfu = lambda k: statistics.median(flops / r[k] / r["peak"] for r in rows)
    result = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "packed": args.packed,
        "microbatches": args.microbatches, "bindings": args.binding,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_memory_retained": HOST_MEMORY_RETAINED,
        "gflop_per_step": flops / 1e9, "peak_gflops": med("peak") / 1e9,
        "jax_step_s": med("jax"), "jax_tokens_per_s": tokens / med("jax"), "jax_mfu": mfu("jax"),
        "jax_step_s_spread": reporting.spread([r["jax"] for r in rows]),
    }
    if peer:
        result.update(peer_step_s=med("peer"), peer_tokens_per_s=tokens / med("peer"),
                      peer_mfu=mfu("peer"),
                      peer_step_s_spread=reporting.spread([r["peer"] for r in rows]),
                      jax_over_peer=statistics.median(r["peer"] / r["jax"] for r in rows),
                      jax_over_peer_spread=reporting.spread([r["peer"] / r["jax"] for r in rows]))
    print(json.dumps(result, indent=1))
    if args.profile:
        print(
            f"\nthe JAX step's {args.profile} costliest ops "
            "(ms per step, calls, costliest XLA op, source):"
        )
        for ms, n, name, source in profile_ops(jax_step, args.profile):
            print(f"  {ms:8.1f} {n:4d}  {name:34s} {source[:90]}")
    reporting.write_json(args.json, result)
    return result


if __name__ == "__main__":
    reporting.cli(main)
