"""Per-family exact scores before and after SFT, on the built-in corpus.

    python benchmarks/sft_families.py --demo_dir=runs/demo --out=runs/demo/sft_bench \
        [--steps=300 --lr=1e-3 --warmup=30 --train_scenes=2000 --examples=32 \
         --split=test --rates='{"edit": 3.0}']

Needs a finished demo (`make demo`: MODEL_DIR/config.gin, data/, image_tokenizer/,
pretrain/). Runs the SFT stage (`cm3leon_jax.demo.finetune.finetune`: SFT shards of every family,
then fine-tuning from pretrain/ into OUT/sft), then generates for `--examples` test
scenes per family with the pretrained and the fine-tuned decoder (the same prompts,
`data/sft_prompts.py`) and scores both exactly (`evaluation/sft_families.py`). Writes
OUT/sft_families.json and prints a markdown table. The paper's LR (5e-5) is for 7B-scale
models; the tiny demo decoder was pretrained at 3e-3, so its short SFT defaults to 1e-3.
The family mixing rates are the demo's (`sft_mixture_rates` in its config.gin) unless
`--rates` overrides some. An OUT that already holds sft_data/ and a finished sft/ of the
same settings (e.g. a copy of the demo's) is reused, not retrained. Choose SFT settings
with `--split=validation` (held-out validation scenes); report them on `--split=test`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# What the SFT run takes over from the demo's resolved config: the model, the batch, the
# mesh and the optimizer (not its other stages' settings).
KEPT = ("IMAGE_SIZE", "DecoderConfig.", "train.", "make_mesh.", "make_optimizer.",
        "cross_entropy_loss.", "learning_rate_schedule.", "Checkpointer.", "sft_mixture_rates.")


def _training_bindings(path: str) -> str:
    with open(path) as f:
        lines = [line for line in f if line.startswith(KEPT)]
    return "".join(line for line in lines if not line.startswith("train.task"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", default="runs/demo")
    p.add_argument("--out", default="runs/demo/sft_bench")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--train_scenes", type=int, default=2000)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="the corpus split whose scenes are scored")
    p.add_argument("--rates", default=None,
                   help='JSON {family: rate} overriding the mixing rates, e.g. \'{"vqa": 2}\'')
    args = p.parse_args(argv)

    import gin

    import cm3leon_jax.train.trainer  # noqa: F401  (the configurables the bindings name)
    import tasks  # noqa: F401  (registers the SFT tasks)
    from cm3leon_jax.data import sft_examples, sft_prompts
    from cm3leon_jax.decode import restore
    from cm3leon_jax.decode.generate import Generator, SamplingConfig
    from cm3leon_jax.demo import finetune
    from cm3leon_jax.evaluation import sft_families
    from cm3leon_jax.vocab.image_tokenizer import load_image_tokenizer
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    from tasks import sft as tasks_sft

    demo = args.demo_dir
    if not os.path.exists(os.path.join(demo, "config.gin")):
        raise SystemExit(f"sft_families.py: --demo_dir={demo!r} holds no config.gin: give a "
                         "finished demo run (make demo).")
    gin.parse_config(_training_bindings(os.path.join(demo, "config.gin")))
    if args.rates:
        rates = {**gin.get_bindings("sft_mixture_rates").get("rates", {}),
                 **json.loads(args.rates)}
        gin.bind_parameter("sft_mixture_rates.rates", rates)
    image_size = gin.query_parameter("%IMAGE_SIZE")
    tokenizer_dir = os.path.join(demo, "image_tokenizer")

    def tokenizer():
        return load_image_tokenizer(checkpoint=tokenizer_dir)

    start = time.time()
    sizes = {"train": args.train_scenes, "validation": 50, "test": 50}
    stage = finetune.finetune(args.out, base_model_dir=os.path.join(demo, "pretrain"),
                              pretrain_data_dir=os.path.join(demo, "data"),
                              image_tokenizer_fn=tokenizer, image_size=image_size,
                              split_sizes=sizes, num_steps=args.steps, peak_lr=args.lr,
                              warmup_steps=args.warmup, seed=args.seed)
    sft_seconds = time.time() - start
    examples = {f: [sft_examples.corpus_example(args.seed, args.split, i, image_size, f)
                    for i in range(args.examples)] for f in sft_prompts.FAMILIES}
    vocab = MultimodalVocabulary(os.path.join(demo, "data", "vocab"))
    images = SamplingConfig(guidance="cfg", guidance_scale=3.0, top_p=0.9)
    texts = SamplingConfig(greedy=True, guidance="none")
    result = {"args": vars(args), "sft_seconds": round(sft_seconds, 1),
              "rates": tasks_sft.sft_mixture_rates(),
              "final_train": stage["train"].get("eval")}
    for name, run in (("before", os.path.join(demo, "pretrain")),
                      ("after", os.path.join(args.out, "sft"))):
        config, params, step = restore.restore_decoder(run)
        gen = Generator(config, params, vocab, tokenizer(), batch_size=16)
        result[name] = {"step": step, "scores": sft_families.evaluate_families(
            gen, examples, image_sampling=images, text_sampling=texts, seed=args.seed)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sft_families.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("| family | exact before SFT | exact after SFT |\n|---|---|---|")
    for family in sft_prompts.FAMILIES:
        b, a = (result[k]["scores"][family]["exact"] for k in ("before", "after"))
        print(f"| {family} | {b:.2f} | {a:.2f} |")
    return result


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
