r"""Is the input pipeline fast enough to feed the trainer? Both measured in one run.

    .venv/bin/python benchmarks/data_throughput.py [--data_dir=runs/demo/data]

Pipeline: the retrieval-augmented pretraining task (`cm3leon_synthetic`: k = 2
neighbors among 3, CM3 transform, packing by `CM3FeatureConverter`) read
through seqio into batches of `--batch` rows of `--seq_len` tokens, timed after
a warm-up. Its shards are the demo's tokenized corpus (`make demo`) with the
neighbors its preprocessing retrieved (3 per document). A data folder
preprocessed without retrieval is copied first, each record given 3 neighbors
drawn at random from its split: assembling the sequence costs the same.

Trainer: a jit-compiled forward+backward step of the `small` decoder
(`gin_configs/models/small.gin`) on the same batch shape, timed after compile.

The pipeline must deliver >= 3x the tokens/s the step consumes. Prints a table
and prints its report (`--out=benchmarks/RESULTS_data_throughput.md` records it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_random_neighbors(src: str, dst: str, seed: int = 0) -> None:
    """Copies src's shards into dst, giving each record 3 random neighbors."""
    import shutil

    from cm3leon_jax.data import shards
    rng = np.random.default_rng(seed)
    shutil.copytree(os.path.join(src, "vocab"), os.path.join(dst, "vocab"), dirs_exist_ok=True)
    for split in ("train", "validation"):
        records = list(shards.read_split(src, split).as_numpy_iterator())
        docs = []
        for i, r in enumerate(records):
            picks = rng.choice(len(records) - 1, size=3, replace=False)
            picks = picks + (picks >= i)  # never the record itself
            docs.append(shards.TokenizedDocument(
                r["doc_id"].decode(), r["ids"], [records[j]["ids"] for j in picks],
                [records[j]["doc_id"].decode() for j in picks]))
        shards.write_split(docs, dst, split, num_shards=4)


def pipeline_rate(data_dir: str, batch: int, seq_len: int, steps: int) -> dict:
    import gin
    import seqio

    import tasks  # noqa: F401  (registers)
    from cm3leon_jax.train.feature_converter import CM3FeatureConverter
    from cm3leon_jax.vocab.layout import EOS_ID
    gin.bind_parameter("data_dirs.synthetic", data_dir)
    ds = seqio.get_dataset(
        "cm3leon_synthetic", task_feature_lengths={"targets": seq_len},
        dataset_split="train", shuffle=True, seed=0, num_epochs=None,
        feature_converter=CM3FeatureConverter(bos_id=EOS_ID, pack=True))
    it = ds.batch(batch, drop_remainder=True).prefetch(2).as_numpy_iterator()
    for _ in range(3):
        next(it)  # warm-up: tf.data graph building, first reads
    start, tokens, examples = time.perf_counter(), 0, 0
    for _ in range(steps):
        b = next(it)
        tokens += int((b["decoder_target_tokens"] != 0).sum())
        # A packed row holds as many examples as it has distinct segment ids.
        examples += int(sum(len(np.unique(s[s > 0])) for s in b["decoder_segment_ids"]))
    dt = time.perf_counter() - start
    return {"tokens_per_s": tokens / dt, "examples_per_s": examples / dt,
            "padded_tokens_per_s": steps * batch * seq_len / dt}


def trainer_rate(batch: int, seq_len: int, steps: int) -> dict:
    import flax.linen as nn
    import gin
    import jax
    import jax.numpy as jnp

    from cm3leon_jax.model import config as config_lib
    from cm3leon_jax.model import decoder as decoder_lib
    from cm3leon_jax.model import loss as loss_lib
    gin.parse_config_file(os.path.join(ROOT, "gin_configs/models/small.gin"))
    cfg = config_lib.DecoderConfig()
    model = decoder_lib.Decoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, seq_len)), jnp.int32)
    data = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
            "decoder_loss_weights": jnp.ones((batch, seq_len), jnp.float32)}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1])["params"])
    grad = jax.jit(jax.value_and_grad(
        lambda p, b: loss_lib.decoder_loss(model, p, b)[0]))
    jax.block_until_ready(grad(params, data))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        out = grad(params, data)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - start) / steps
    return {"tokens_per_s": batch * seq_len / dt, "step_s": dt,
            "config": f"{cfg.num_layers} layers, d {cfg.d_model}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "runs/demo/data"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--pipeline_steps", type=int, default=200)
    parser.add_argument("--trainer_steps", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="also write the report here (the recorded one: "
                        "benchmarks/RESULTS_data_throughput.md); default: print only")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data_dir, "manifest.json")):
        sys.exit(f"no tokenized corpus in {args.data_dir}: run `make demo` first "
                 "(or pass --data_dir).")
    load_before = os.getloadavg()[0]
    with open(os.path.join(args.data_dir, "manifest.json")) as f:
        retrieved = "retrieval" in json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if not retrieved:
            print(f"{data_dir} has no retrieved neighbors: using 3 random ones per record")
            with_random_neighbors(args.data_dir, tmp)
            data_dir = tmp
        pipe = pipeline_rate(data_dir, args.batch, args.seq_len, args.pipeline_steps)
    train = trainer_rate(args.batch, args.seq_len, args.trainer_steps)
    ratio = pipe["tokens_per_s"] / train["tokens_per_s"]
    neighbors = "retrieved" if retrieved else "random"
    rows = [
        (
            f"pipeline: retrieval-augmented task ({neighbors} neighbors), packed",
            f"{pipe['examples_per_s']:,.0f}",
            f"{pipe['tokens_per_s']:,.0f}",
        ),
        (
            f"trainer: `small` decoder fwd+bwd ({train['config']}), jit",
            "",
            f"{train['tokens_per_s']:,.0f}",
        ),
    ]
    table = ["| what | examples/s | tokens/s |", "|---|---:|---:|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    verdict = (f"pipeline / trainer = {ratio:.1f}x "
               f"({'meets' if ratio >= 3 else 'MISSES'} the >= 3x target)")
    text = "\n".join([
        f"Batch {args.batch} x {args.seq_len} tokens, this machine "
        f"({os.cpu_count()} CPU cores), one run of:",
        "", "    .venv/bin/python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]),
        "", *table, "", verdict, "",
        f"Host load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: "
        "other jobs on the 2 cores slow both rows.", ""])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
