"""A user's own image-text folder, end to end through the documented gin files:

    preprocess_user.gin (held-out validation split, retrieval over the user's bank)
    -> train/tiny_user.gin (pretraining, evaluated on the validation split)
    -> generate_user.gin (text -> image and image -> text, retrieving from that bank)

Each step runs through the entry point (`main.main`) as the README's commands do, with
bindings that shrink it: a random-weight tiny image tokenizer and retrieval encoder saved as
checkpoints (no trained models needed; read as the README's IMAGE_TOKENIZER_DIR and
ENCODER_DIR), a few training steps.
"""

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import main as main_lib
from cm3leon_jax.data import shards
from cm3leon_jax.vocab import vqgan_checkpoint
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.vqgan import VQGANConfig
from tests.retrieval.retrieval_testlib import save_random_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe", "dot")
# A random tiny VQGAN (32 px, 64 codes) stands in for a trained one, in every step.
TINY_VQ = VQGANConfig(image_size=32, base_channels=8, channel_multipliers=(1, 2, 2),
                      num_res_blocks=1, attn_levels=(), latent_channels=8, embed_dim=8,
                      codebook_size=64, num_groups=4)


def _picture(color, shape, side=48):
    pixels = np.full((side, side, 3), 245, np.uint8)
    if shape == "square":
        pixels[12:36, 12:36] = COLORS[color]
    elif shape == "stripe":
        pixels[20:28, :] = COLORS[color]
    else:
        yy, xx = np.mgrid[:side, :side]
        pixels[(yy - 24) ** 2 + (xx - 24) ** 2 < 100] = COLORS[color]
    return pixels


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """24 captioned pictures, one too small and one without a caption."""
    root = tmp_path_factory.mktemp("my_pictures")
    for color in COLORS:
        for shape in SHAPES:
            for k in range(2):
                name = f"{color}_{shape}_{k}"
                Image.fromarray(_picture(color, shape)).save(root / f"{name}.png")
                (root / f"{name}.txt").write_text(f"a {color} {shape} on white")
    Image.fromarray(_picture("red", "dot", side=16)).save(root / "thumbnail.png")
    (root / "thumbnail.txt").write_text("a red dot, too small to use")
    Image.fromarray(_picture("blue", "dot")).save(root / "uncaptioned.png")
    return root


def _main(gin_file, *bindings):
    gin.clear_config()
    try:
        code = main_lib.main([f"--gin_file={os.path.join(ROOT, gin_file)}",
                              *[f"--gin.{b}" for b in bindings]])
    finally:
        gin.clear_config()
    assert code == 0, f"{gin_file} exited with {code}"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_random_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A checkpoint as train_image_tokenizer writes it: loading one imports the trainer's
    checkpointing after the run's gin config is locked (that once failed every preprocess
    run that named IMAGE_TOKENIZER_DIR)."""
    directory = str(tmp_path_factory.mktemp("image_tokenizer"))
    vqgan_checkpoint.save_params(directory, 1, TINY_VQ,
                                 ImageTokenizer.random_init(TINY_VQ, seed=0).params)
    return directory


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def preprocessed(user_folder, encoder_dir, tokenizer_dir, tfds_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("my_data")
    _main("gin_configs/runs/preprocess_user.gin", f"MODEL_DIR='{data_dir}'",
          f"USER_DATA='{user_folder}'", f"ENCODER_DIR='{encoder_dir}'",
          f"IMAGE_TOKENIZER_DIR='{tokenizer_dir}'",
          f"user_data_builder.data_dir='{tfds_dir}'",
          "user_data_builder.validation_fraction=0.2", "preprocess.text_vocab_size=280",
          "preprocess.docs_per_shard=10", "preprocess.batch_size=8")
    return data_dir


def test_a_locked_run_config_loads_the_image_tokenizer_checkpoint(tokenizer_dir):
    """In a fresh interpreter, as the README's command starts: preprocess_user.gin parsed and
    locked, then the tokenizer restored. (In this process the trainer's modules are already
    imported, which hid the failure when a checkpoint's loader imported them only then.)"""
    script = ("import sys; from cm3leon_jax import main; "
              "main.configure([sys.argv[1]], sys.argv[2:]); "
              "from cm3leon_jax.vocab import image_tokenizer; "
              "print(image_tokenizer.load_image_tokenizer())")
    bindings = [f"IMAGE_TOKENIZER_DIR='{tokenizer_dir}'", "MODEL_DIR='unused'",
                "USER_DATA='unused'", "ENCODER_DIR='unused'"]
    done = subprocess.run([sys.executable, "-c", script,
                           os.path.join(ROOT, "gin_configs/runs/preprocess_user.gin"),
                           *bindings], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "32px -> 8x8 codes of 64" in done.stdout


def test_preprocessing_splits_counts_rejects_and_retrieves_from_the_users_bank(preprocessed):
    manifest = json.loads((preprocessed / "manifest.json").read_text())
    report = manifest["source_report"]
    assert report["rejected"]["image_too_small"] == 1 and report["rejected"]["missing_caption"] == 1
    assert report["ok"] == 24
    train = {r["doc_id"].decode(): r for r in shards.read_split(str(preprocessed), "train")
             .as_numpy_iterator()}
    validation = {r["doc_id"].decode(): r for r in shards.read_split(str(preprocessed),
                                                                     "validation")
                  .as_numpy_iterator()}
    assert len(train) + len(validation) == 24 and 2 <= len(validation) <= 10
    assert not set(train) & set(validation)
    # The bank is the user's train split: every neighbor is one of the user's documents.
    with_neighbors = [r for r in validation.values() if len(r["neighbor_doc_ids"])]
    assert with_neighbors, "no validation document got neighbors from the user's bank"
    for r in with_neighbors:
        assert {d.decode() for d in r["neighbor_doc_ids"]} <= set(train)


@pytest.mark.slow
def test_pretraining_then_generation_and_evaluation_on_the_users_data(
        preprocessed, user_folder, tokenizer_dir, tfds_dir, tmp_path):
    model_dir = tmp_path / "my_model"
    _main("gin_configs/train/tiny_user.gin", f"MODEL_DIR='{model_dir}'",
          f"DATA_DIR='{preprocessed}'", "train.num_steps=3", "train.seq_len=256",
          "train.eval_every=0", "train.eval_steps=1", "train.log_every=1",
          "train.progress_bar=False")
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["eval/loss"] for r in rows if "eval/loss" in r]).all()
    assert any("eval/loss" in r for r in rows)  # Evaluated on the held-out split.
    # The run records the data folder it trained on (generate's and eval's data_dir check).
    assert json.loads((model_dir / "vocabulary.json").read_text())["data"]["directory"] == str(
        preprocessed)

    out = tmp_path / "my_generated"
    _main("gin_configs/runs/generate_user.gin", f"MODEL_DIR='{out}'",
          f"TRAIN_DIR='{model_dir}'", f"DATA_DIR='{preprocessed}'",
          "generate.captions=['a green dot on white']",
          f"generate.image_files=['{user_folder}/red_square_0.png']",
          "generate.max_caption_tokens=8", f"IMAGE_TOKENIZER_DIR='{tokenizer_dir}'")
    generated = json.loads((out / "generated.json").read_text())
    assert generated[0]["caption"] == "a green dot on white"
    image = np.asarray(Image.open(out / generated[0]["images"][0]))
    assert image.shape == (32, 32, 3)
    captions = json.loads((out / "captions.json").read_text())
    assert captions[0]["image"].endswith("red_square_0.png") and len(captions[0]["captions"]) == 1

    # eval_user.gin: the held-out pairs, with and without the user's retrieved documents.
    held_out = {r["doc_id"].decode() for r in shards.read_split(str(preprocessed), "validation")
                .as_numpy_iterator()}
    _main("gin_configs/runs/eval_user.gin", f"MODEL_DIR='{tmp_path / 'my_eval'}'",
          f"TRAIN_DIR='{model_dir}'", f"DATA_DIR='{preprocessed}'", f"USER_DATA='{user_folder}'",
          f"IMAGE_TOKENIZER_DIR='{tokenizer_dir}'", f"user_data_builder.data_dir='{tfds_dir}'",
          "user_data_builder.validation_fraction=0.2", "user_suite.max_images=None",
          "evaluate.strategies=[@top_p/Strategy()]", "evaluate.batch_size=4")
    report = json.loads((tmp_path / "my_eval" / "eval" / "report.json").read_text())
    assert report["suite"] == f"user_validation_{len(held_out)}" and report["complete"]
    rows = {(r["task"], r["strategy"], r["retrieved"]): r for r in report["rows"]}
    assert {(t, s, k) for t, s, k in rows} == {
        ("text_to_image", "real:vq_reconstruction", "-"),
        ("text_to_image", "real:other_scenes", "-"), ("text_to_image", "top-p", 0),
        ("text_to_image", "top-p", 2), ("captioning", "greedy", 0), ("captioning", "greedy", 2)}
    assert all(np.isfinite(r["clip_score"]) and np.isfinite(r["fid_retrieval_encoder"])
               for (t, _, _), r in rows.items() if t == "text_to_image")
    assert all(0.0 <= r["CIDEr-D"] for (t, _, _), r in rows.items() if t == "captioning")


@pytest.mark.parametrize("gin_file, mode, bindings", [
    ("gin_configs/runs/preprocess_user.gin", "preprocess", ["ENCODER_DIR='unused'"]),
    ("gin_configs/runs/eval_user.gin", "eval", ["TRAIN_DIR='unused'", "DATA_DIR='unused'"]),
])
def test_a_model_dir_inside_the_users_folder_is_refused_before_anything_is_written(
        user_folder, tokenizer_dir, tmp_path, capsys, gin_file, mode, bindings):
    """Its config.gin and outputs would change the folder: every later run found the data
    "changed since it was prepared", and advice to rebuild that could not help."""
    before = sorted(p.name for p in user_folder.iterdir())
    inside = user_folder / "out"
    gin.clear_config()
    try:
        code = main_lib.main([
            f"--gin_file={os.path.join(ROOT, gin_file)}",
            f"--gin.MODEL_DIR='{inside}'", f"--gin.USER_DATA='{user_folder}'",
            f"--gin.IMAGE_TOKENIZER_DIR='{tokenizer_dir}'",
            f"--gin.user_data_builder.data_dir='{tmp_path / 'tfds'}'",
            *[f"--gin.{b}" for b in bindings]])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert code == 2 and f"{mode} MODEL_DIR '{inside}' is or lies inside the user data " \
        "folder" in err, err
    assert sorted(p.name for p in user_folder.iterdir()) == before
