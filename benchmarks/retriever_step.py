r"""The demo retriever's train step with each CLIP attention kernel, interleaved in one process.

    .venv/bin/python benchmarks/retriever_step.py --rounds=5 --steps=10

The step `make demo` trains its retriever with (`gin_configs/runs/demo.gin`: the tiny CLIP
at 32 px in 4-pixel patches, 65 image positions; 128 pairs of the built-in corpus a step,
captions bucketed as `clip_train.bucketed_tokens` does; AdamW), once with
`ClipConfig.attention_impl = "xla"` (einsums) and once with "cpu" (the C++ flash kernel),
both compiled and warmed up first. Each round times `--steps` steps of every kernel, the order
alternating between rounds, so that a drift of the shared host falls on both alike. A
kernel's figure is the median over rounds of each round's mean step, with the range.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402

from benchmarks import reporting  # noqa: E402
from cm3leon_jax.data import synthetic  # noqa: E402
from cm3leon_jax.retrieval import clip, clip_tokenizer, clip_train  # noqa: E402
from cm3leon_jax.retrieval.encoder import preprocess_images  # noqa: E402

IMPLS = ("xla", "cpu")


def demo_batches(cfg: clip.ClipConfig, batch_size: int, count: int, seed: int = 0):
    """`count` batches (pixels, tokens, lengths) of the corpus' train pairs, as the demo
    draws them."""
    images, captions = synthetic.synthetic_pairs("train", 2000, cfg.image_size)
    tokenizer = clip_tokenizer.WordTokenizer(cfg.vocab_size)
    tokens = [[tokenizer.encode(c) for c in caps] for caps in captions]
    draws = clip_train.PairDraws(seed)
    batches = []
    for _ in range(count):
        batch, chosen = clip_train.pair_batch(draws, images, tokens, None, batch_size)
        toks, lengths = clip_train.bucketed_tokens(chosen, cfg.context_length)
        batches.append((preprocess_images(batch, cfg.image_size), toks, lengths))
    return batches


def make_step(cfg: clip.ClipConfig, steps: int):
    """The demo trainer's step (`clip_train.train_step`) for `cfg`, and its optimizer."""
    opt = clip_train.make_optimizer(1e-3, 50, steps + 100, 0.1)
    return clip_train.train_step(clip.CLIP(cfg), opt), opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=reporting.at_least_one, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per kernel per round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args()

    base = clip.clip_config(image_size=32, patch_size=4)
    batches = demo_batches(base, args.batch, args.steps)
    runs = {}
    for impl in IMPLS:
        cfg = dataclasses.replace(base, attention_impl=impl)
        step, opt = make_step(cfg, args.steps * (args.rounds + 1))
        params = clip.init_params(cfg, 0)
        runs[impl] = [step, params, opt.init(params)]
        jax.block_until_ready(step(runs[impl][1], runs[impl][2], *batches[0]))  # compile
    per_round = {impl: [] for impl in IMPLS}
    losses = {impl: [] for impl in IMPLS}
    for r in range(-1, args.rounds):  # Round -1 warms up, untimed.
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            step, params, opt_state = runs[impl]
            t0 = time.perf_counter()
            for pixels, tokens, lengths in batches:
                params, opt_state, loss, _ = step(params, opt_state, pixels, tokens, lengths)
            jax.block_until_ready(loss)
            if r >= 0:
                per_round[impl].append((time.perf_counter() - t0) / len(batches))
                losses[impl].append(float(loss))
            runs[impl][1:] = [params, opt_state]
    result = {"batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
              "step_s": {impl: reporting.spread(v) for impl, v in per_round.items()},
              "last_loss": {impl: v[-1] for impl, v in losses.items()}}
    for impl in IMPLS:
        s = result["step_s"][impl]
        print(f"attention_impl={impl!r}: {1e3 * s['median']:.1f} ms a step "
              f"[{1e3 * s['min']:.1f}, {1e3 * s['max']:.1f}] over {args.rounds} rounds; "
              f"loss after {(args.rounds + 1) * args.steps} steps {result['last_loss'][impl]:.4f}")
    x, c = result["step_s"]["xla"], result["step_s"]["cpu"]
    apart = c["max"] < x["min"] or x["max"] < c["min"]
    print(f"'cpu' takes {c['median'] / x['median']:.3f}x the time of 'xla' "
          f"({'ranges apart' if apart else 'ranges overlap'})")
    if args.json:
        reporting.write_json(args.json, result)


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
