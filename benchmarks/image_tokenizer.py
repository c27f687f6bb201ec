r"""Image tokenizer benchmark: reconstruction quality, codebook usage, speed.

    # 1. tiny.gin's tokenizer (8 x 8 codes of 512: the demo's until 7 Dec, which now adds a
    #    level and 1024 codes, gin_configs/runs/demo.gin) on the synthetic corpus
    python -m cm3leon_jax.main --gin_file=gin_configs/runs/train_image_tokenizer.gin \
        --gin.MODEL_DIR="'runs/vq_tiny'"
    python benchmarks/image_tokenizer.py synthetic --model_dir=runs/vq_tiny
    # 2. real photographs bundled with scikit-image: train on crops of some, test on others
    python benchmarks/image_tokenizer.py photos --model_dir=runs/vq_photos --steps=2000
    # 3. encode / decode throughput of the paper's f8 config (256 px, batch 8), random weights
    python benchmarks/image_tokenizer.py speed --config=vq_f8_8192 --batch=8
    # 4. the training step of tiny.gin's tokenizer, 1 stream against 2 (vqgan_train.py);
    #    --optimizers adamw muon times each optimizer too; --gin binds the config further
    #    (the demo's own: "VQGANConfig.channel_multipliers=(1, 1, 1, 2)" and
    #    VQGANConfig.codebook_size=1024)
    python benchmarks/image_tokenizer.py train_step --config=tiny --batch=16 --trials=5
    # 5. what an edit leaves of the source's codes, and the shape scores of reconstructions,
    #    for trained tokenizers side by side (the demo's, tiny_local.gin's, ...; on the
    #    demo's 4 x 4 grid no cell is 4 or more from an edit: kept_at_4+ is nan there)
    python benchmarks/image_tokenizer.py edits --model_dir=runs/demo/image_tokenizer \
        --model_dir=runs/vq_local --examples=300
    # 6. a recipe for the demo's tokenizer (gin_configs/runs/demo.gin's settings, plus any
    #    --gin bindings) trained alone on the corpus' 2000 train scenes, then its round trip
    #    of 1000 validation scenes beyond the corpus' 200, parsed as the demo scores images
    #    (the ceiling of every image the demo's decoder draws or reads), by object size;
    #    --score_only scores tokenizers already trained (the demo's own, for one)
    python benchmarks/image_tokenizer.py demo_recipe --model_dir=runs/vq_lr2e-3 \
        --gin=train_image_tokenizer.learning_rate=2e-3
    python benchmarks/image_tokenizer.py demo_recipe --score_only \
        --model_dir=runs/demo/image_tokenizer --model_dir=runs/vq_lr2e-3

Each prints a markdown table; benchmarks/RESULTS_image_tokenizer.md records them.
Quality is PSNR (dB, on uint8 pixels) and SSIM (scikit-image, 7x7 Gaussian-free
window, channel-averaged) of decode(encode(x)) against x; usage is the share of
the codebook that the test images use and the perplexity of their code histogram.
A thumbnail baseline (the image down-sampled by the tokenizer's factor and
up-sampled back bicubically, i.e. the same grid of *continuous* values) shows
how much of the loss is the grid and how much the quantization.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import reporting  # noqa: E402

# Photos from scikit-image (public test images, none made here). `cat` is the same
# photo as `chelsea`, so it is in neither list.
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "camera", "grass", "gravel", "brick", "moon", "clock", "colorwheel")
HELD_OUT_PHOTOS = ("coffee", "chelsea", "coins", "page")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR of uint8 batches."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity
    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=255)
                     for x, y in zip(a, b)])


def thumbnail_baseline(images: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image
    s = images.shape[1]
    return np.stack(
        [
            np.asarray(
                Image.fromarray(im)
                .resize((s // factor, s // factor), Image.BICUBIC)
                .resize((s, s), Image.BICUBIC)
            )
            for im in images
        ]
    )


def quality(tok, images: np.ndarray) -> dict[str, float]:
    from cm3leon_jax.vocab import quantizer
    codes = tok.encode(images)
    recon = tok.decode(codes)
    counts = np.bincount(codes.ravel(), minlength=tok.codebook_size).astype(np.float32)
    stats = quantizer.codebook_stats(counts)
    base = thumbnail_baseline(images, tok.config.downsample_factor)
    return {"images": len(images), "psnr": float(psnr(images, recon).mean()),
            "ssim": float(ssim(images, recon).mean()),
            "code_usage_pct": 100.0 * float(stats["used_fraction"]),
            "perplexity": float(stats["perplexity"]),
            "thumbnail_psnr": float(psnr(images, base).mean()),
            "thumbnail_ssim": float(ssim(images, base).mean())}


def _table(rows: list[tuple[str, dict]]) -> str:
    keys = list(rows[0][1])
    out = ["| set | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        out.append(f"| {name} | " + " | ".join(
            f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)


def cmd_synthetic(args) -> dict:
    from cm3leon_jax.data.synthetic import synthetic_images
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    tok = ImageTokenizer.from_checkpoint(args.model_dir, batch_size=64)
    src = synthetic_images(tok.image_size, "test")
    images = np.stack([src(i) for i in range(args.examples)])
    r = quality(tok, images)
    print(_table([(f"synthetic test split ({tok.image_size} px)", r)]))
    return r


def _photo(name: str) -> np.ndarray:
    import skimage.data

    from cm3leon_jax.vocab.image_inputs import rgb_uint8_unresized
    return rgb_uint8_unresized(getattr(skimage.data, name)())


def held_out_tiles(size: int, short_side: int) -> np.ndarray:
    """Each held-out photo resized so its short side is `short_side`, cut into
    non-overlapping size x size tiles: the whole photo is tested, deterministically."""
    from PIL import Image
    tiles = []
    for name in HELD_OUT_PHOTOS:
        im = _photo(name)
        h, w = im.shape[:2]
        s = short_side / min(h, w)
        im = np.asarray(Image.fromarray(im).resize((round(w * s), round(h * s)), Image.LANCZOS))
        for y in range(0, im.shape[0] - size + 1, size):
            for x in range(0, im.shape[1] - size + 1, size):
                tiles.append(im[y:y + size, x:x + size])
    return np.stack(tiles)


def cmd_photos(args) -> dict:
    from cm3leon_jax import main as main_lib
    from cm3leon_jax.vocab.image_sources import array_images
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    from cm3leon_jax.vocab.vqgan import VQGANConfig
    from cm3leon_jax.vocab.vqgan_train import train_image_tokenizer

    main_lib.configure([os.path.join(ROOT, "gin_configs/runs/train_image_tokenizer.gin")],
                       [f"MODEL_DIR='{args.model_dir}'"])
    cfg = VQGANConfig()
    photos = [_photo(n) for n in TRAIN_PHOTOS]
    # Crops of 1/8 .. 1/2 of a photo's short side, resized to the tokenizer's size:
    # textures at several scales, never the held-out photos.
    train = array_images(photos, cfg.image_size, seed=0, min_scale=0.125)
    test = held_out_tiles(cfg.image_size, args.short_side)
    eval_src = array_images([test[i] for i in range(len(test))], cfg.image_size, min_scale=1.0,
                            flip=False)
    if not args.skip_train:
        t0 = time.time()
        train_image_tokenizer(args.model_dir, config=cfg, image_source=train,
                              eval_source=eval_src, num_steps=args.steps,
                              eval_examples=min(128, len(test)))
        print(f"trained {args.steps} steps in {time.time() - t0:.0f} s")
    tok = ImageTokenizer.from_checkpoint(args.model_dir, batch_size=64)
    r = quality(tok, test)
    print(_table([(f"held-out photos {HELD_OUT_PHOTOS} as {len(test)} tiles", r)]))
    return r


def cmd_speed(args) -> dict:
    import gin
    import jax
    import jax.numpy as jnp

    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    from cm3leon_jax.vocab.vqgan import VQGANConfig

    gin.parse_config_file(os.path.join(ROOT, f"gin_configs/image_tokenizer/{args.config}.gin"))
    cfg = dataclasses.replace(VQGANConfig(), dtype=args.dtype)
    gin.clear_config()
    tok = ImageTokenizer.random_init(cfg, seed=0, batch_size=args.batch)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(tok.params))
    images = np.random.default_rng(0).integers(0, 256, (args.batch, cfg.image_size,
                                                        cfg.image_size, 3), dtype=np.uint8)
    x = jnp.asarray(images)
    codes = jnp.asarray(tok.encode(images))  # compiles encode

    def timed(fn, arg):
        jax.block_until_ready(fn(tok.params, arg))  # warm-up / compile
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(tok.params, arg))
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    t_enc = timed(tok._encode, x)
    t_dec = timed(tok._decode, codes)
    r = {
        "config": args.config,
        "dtype": args.dtype,
        "image_size": cfg.image_size,
        "codes": cfg.codes_per_image,
        "params_M": n_params / 1e6,
        "batch": args.batch,
        "device": jax.devices()[0].device_kind,
        "cpu_cores": os.cpu_count(),
        "encode_images_per_s": args.batch / t_enc,
        "decode_images_per_s": args.batch / t_dec,
        "encode_s_per_batch": t_enc,
        "decode_s_per_batch": t_dec,
    }
    print(_table([(args.config, r)]))
    return r


def cmd_train_step(args) -> dict:
    """Steps per second of `vqgan_train.Trainer.step` (the run mode's loss, restarts every 50
    steps) for each `--streams` value and each `--optimizers` kind (AdamW; Muon on the
    hidden convolutions), on one device, trials interleaved; rows "<kind> x<streams>"."""
    import functools

    import gin
    import jax

    from cm3leon_jax.vocab import vqgan_train
    from cm3leon_jax.vocab.vqgan import VQGANConfig, init_key

    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, f"gin_configs/image_tokenizer/{args.config}.gin")], args.gin)
    cfg = VQGANConfig()
    gin.clear_config()
    images = jax.numpy.asarray(np.random.default_rng(0).integers(
        0, 256, (args.batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8))
    shapes = vqgan_train.param_shapes(cfg)
    runs, losses = {}, {}
    for kind in args.optimizers:
        opt = vqgan_train.make_optimizer(1e-3, 100, 1500, 0.5, 0.9, 0.0, 1.0,
                                         muon_params=shapes if kind == "muon" else None)
        for n in args.streams:
            tr = vqgan_train.Trainer(cfg, opt, vqgan_train.VQGANLossWeights(),
                                     restart_every=50, streams=n)
            step = jax.jit(functools.partial(tr.step, use_disc=False), donate_argnums=0)
            state, m = step(jax.jit(tr.init)(init_key(0)), images)  # compiles
            losses[f"{kind} x{n}"] = float(m["loss"])
            runs[f"{kind} x{n}"] = {"step": step, "state": state}

    def steps(n):
        run = runs[n]
        for _ in range(args.steps):
            run["state"], m = run["step"](run["state"], images)
        jax.block_until_ready(m)

    names = list(runs)
    rates = {name: [] for name in names}
    for _ in range(args.trials):
        for name in names:
            rates[name].append(args.steps / reporting.timed(lambda: steps(name)))
    base = names[0]
    r = {"config": args.config, "batch": args.batch, "cpu_cores": os.cpu_count(),
         "steps_per_trial": args.steps, "first_step_loss": losses,
         "steps_per_s": {n: reporting.spread(v) for n, v in rates.items()},
         "speedup_over_first": {n: reporting.spread([a / b for a, b in zip(v, rates[base])])
                                for n, v in rates.items()}}
    print(f"| optimizer x streams | steps/s median [min, max] | x {base} | first-step loss |")
    print("|---|---|---|---|")
    for n in names:
        sp, x = r["steps_per_s"][n], r["speedup_over_first"][n]
        print(f"| {n} | {sp['median']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}] | "
              f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}] | {losses[n]:.6f} |")
    return r


def _cells_from(box: tuple, grid: int, cell: int) -> np.ndarray:
    """int[grid, grid]: each code cell's distance in cells (Chebyshev) to the cells `box`
    (pixels, exclusive ends) covers; 0 on them."""
    x0, y0, x1, y1 = box
    rows, cols = np.indices((grid, grid))
    r0, r1, c0, c1 = y0 // cell, (y1 - 1) // cell, x0 // cell, (x1 - 1) // cell
    return np.maximum(np.maximum(r0 - rows, rows - r1), np.maximum(c0 - cols, cols - c1)).clip(0)


def edit_locality(tok, sources: list, targets: list) -> dict:
    """How many of a source image's codes its edited image keeps, by the code cell's
    distance to what the edit changed (the objects in one scene and not the other).

    A decoder can copy an edit's unchanged region code by code only where the tokenizer
    keeps those codes: the pixels there are the same, so a code that changes anyway does so
    because the encoder sees the whole image (GroupNorm statistics, attention) or reaches
    the edited object through its receptive field."""
    from cm3leon_jax.data import shapes
    grid, cell = tok.config.grid_size, tok.image_size // tok.config.grid_size
    kept = tok.encode(np.stack([shapes.render(s) for s in sources])) == \
        tok.encode(np.stack([shapes.render(t) for t in targets]))
    distance = np.stack([
        np.min([_cells_from(o.box, grid, cell) for o in set(a.shapes) ^ set(b.shapes)],
               axis=0).ravel() for a, b in zip(sources, targets)])
    out = {"edits": len(sources), "codes_kept": float(kept.mean())}
    for d in range(5):
        near = distance == d if d < 4 else distance >= d
        out[f"kept_at_{d}{'+' if d == 4 else ''}"] = float(kept[near].mean()) if near.any() \
            else float("nan")
    out["cells_4+"] = int((distance >= 4).sum())
    return out


def cmd_edits(args) -> dict:
    from cm3leon_jax.data import sft_examples, shapes
    from cm3leon_jax.evaluation import shapes_scores
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    size, sources, targets, rows = None, [], [], []
    for model_dir in args.model_dir:
        tok = ImageTokenizer.from_checkpoint(model_dir, batch_size=64)
        if size != tok.image_size:  # The corpus' edit examples at this tokenizer's size.
            size = tok.image_size
            examples = [sft_examples.corpus_example(0, args.split, i, size, "edit")
                        for i in range(args.examples)]
            sources = [shapes.Scene.from_json(e.truth["source"]) for e in examples]
            targets = [shapes.Scene.from_json(e.truth["scene"]) for e in examples]
        r = edit_locality(tok, sources, targets)
        # The sources are the corpus' scenes: their round trip scored as the demo scores the
        # tokenizer's ceiling (objects right) and an edit (placed right).
        recon = tok.reconstruct(np.stack([shapes.render(s) for s in sources]))
        scores = shapes_scores.text_to_image_metrics(recon, sources)
        r["reconstructions_objects_right"] = scores["objects_right"]
        r["reconstructions_placed_right"] = scores["placed_right"]
        rows.append((model_dir, r))
    print(f"{args.examples} {args.split} edits of the corpus (one object recolored, reshaped, "
          "added or removed); kept_at_d: the share of code cells d cells from the edited "
          "object whose code the edit leaves as it was")
    print(_table(rows))
    return dict(rows)


def round_trip_scores(tok, scenes: list) -> dict:
    """The demo's exact scores of the tokenizer's reconstructions of `scenes`, with the
    share of objects found right (class, color, box IoU >= 0.5) by size category."""
    from cm3leon_jax.data import parse, shapes
    from cm3leon_jax.evaluation import shapes_scores
    images = np.stack([shapes.render(s) for s in scenes])
    recon = tok.reconstruct(images)
    scores = shapes_scores.text_to_image_metrics(recon, scenes)
    found = {size: [] for size in shapes.SIZES}
    for image, scene in zip(recon, scenes):
        right = {j for _, j, _, ok in parse.match(parse.parse_image(image), scene)["pairs"] if ok}
        for j, obj in enumerate(scene.shapes):
            found[obj.size].append(j in right)
    return {"objects_right": float(scores["objects_right"]),
            "any_object_right": float(scores["any_object_right"]),
            "psnr": float(psnr(images, recon).mean()),
            **{f"{size}_right": float(np.mean(v)) if v else float("nan")
               for size, v in found.items()}}


def cmd_demo_recipe(args) -> dict:
    from cm3leon_jax import main as main_lib
    from cm3leon_jax.data.synthetic import synthetic_example
    from cm3leon_jax.vocab import vqgan_train
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
    if not args.score_only and len(args.model_dir) > 1:
        raise SystemExit("demo_recipe trains one recipe a run: give one --model_dir, or "
                         "--score_only to score several trained tokenizers")
    rows = []
    for model_dir in args.model_dir:
        seconds = None
        if not args.score_only:
            main_lib.configure([args.gin_file], [f"MODEL_DIR={model_dir!r}", *args.gin])
            import gin

            from cm3leon_jax import xla_flags
            try:  # The demo's backend flags, as its stages start with them.
                flags = gin.query_parameter("demo.xla_flags")
            except ValueError:  # A gin file without them.
                flags = []
            xla_flags.add(flags, "demo.xla_flags")
            size = gin.query_parameter("%IMAGE_SIZE")
            train = np.stack([synthetic_example("train", i, size, args.seed).image
                              for i in range(args.train_images)])
            start = time.perf_counter()
            vqgan_train.train_image_tokenizer(model_dir=model_dir,
                                              image_source=lambda i: train[i % len(train)])
            seconds = time.perf_counter() - start
        tok = ImageTokenizer.from_checkpoint(model_dir, batch_size=64)
        scenes = [synthetic_example("validation", i, tok.image_size, args.seed).scene
                  for i in range(args.first_example, args.first_example + args.examples)]
        rows.append((model_dir, {**round_trip_scores(tok, scenes),
                                 **({"train_s": seconds} if seconds is not None else {})}))
    print(f"{args.examples} validation scenes of the corpus generator (indices "
          f"{args.first_example}-{args.first_example + args.examples - 1}), each image's "
          "tokenizer round trip parsed exactly; <size>_right: objects of that size found right")
    print(_table(rows))
    return dict(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--model_dir", required=True)
    s.add_argument("--examples", type=int, default=500)
    s = sub.add_parser("photos")
    s.add_argument("--model_dir", required=True)
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--short_side", type=int, default=128,
                   help="held-out photos are resized to this short side before tiling")
    s.add_argument("--skip_train", action="store_true")
    s = sub.add_parser("speed")
    s.add_argument("--config", default="vq_f8_8192")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    s = sub.add_parser("train_step")
    s.add_argument("--config", default="tiny")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--streams", type=int, nargs="+", default=[1, 2])
    s.add_argument("--optimizers", nargs="+", default=["adamw"], choices=("adamw", "muon"))
    s.add_argument("--gin", action="append", default=[],
                   help="a VQGANConfig binding on top of --config's; repeat")
    s.add_argument("--steps", type=int, default=30, help="steps per trial")
    s.add_argument("--trials", type=int, default=5)
    s = sub.add_parser("edits")
    s.add_argument("--model_dir", action="append", required=True,
                   help="a trained tokenizer (MODEL_DIR of train_image_tokenizer); repeat")
    s.add_argument("--examples", type=int, default=300)
    s.add_argument("--split", default="validation")
    s = sub.add_parser("demo_recipe")
    s.add_argument("--model_dir", action="append", required=True,
                   help="where the recipe trains (or, with --score_only, a trained tokenizer); "
                        "with --score_only, repeat")
    s.add_argument("--gin", action="append", default=[],
                   help="a binding on top of --gin_file's, e.g. "
                        "train_image_tokenizer.learning_rate=2e-3; repeat")
    s.add_argument("--gin_file", default="gin_configs/runs/demo.gin")
    s.add_argument("--score_only", action="store_true")
    s.add_argument("--train_images", type=int, default=2000,
                   help="the corpus' train scenes 0..n-1 (the demo's corpus has 2000)")
    s.add_argument("--examples", type=int, default=1000)
    s.add_argument("--first_example", type=int, default=200,
                   help="the first validation index scored (the demo's corpus holds 0-199)")
    s.add_argument("--seed", type=int, default=0, help="the corpus seed")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.cmd in ("synthetic", "photos"):
        reporting.require("skimage")
    r = {"synthetic": cmd_synthetic, "photos": cmd_photos, "speed": cmd_speed,
         "train_step": cmd_train_step, "edits": cmd_edits,
         "demo_recipe": cmd_demo_recipe}[args.cmd](args)
    reporting.write_json(args.json, r)
    return 0


if __name__ == "__main__":
    import reporting
    reporting.cli(main)
