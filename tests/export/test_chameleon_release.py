"""Import of the original Chameleon release: a tiny release written in its exact layout
(2 model-parallel ranks, bfloat16, interleaved rotary, per-rank q/k norms, the VQGAN's
Lightning checkpoint + yaml, a tokenizers file with IMGIMG tokens) must give the logits
of the released architecture, a working vocabulary, and images."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import prompts, restore
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.export import chameleon_release, chameleon_vocab, import_run
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.vocab import layout as layout_lib
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from tests.export import chameleon_testlib
from tests.export.conftest import HF_VQ, TEXTS, random_vq_params
from tests.model.model_testlib import forward

RUN_GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "gin_configs", "runs")
VQ = HF_VQ  # taming (the release) has 32 GroupNorm groups; 4 x 4 = 16 codes of 32.


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chameleon_release"))
    vq_params = random_vq_params(VQ, seed=4)
    shards = chameleon_testlib.write_release(root, TEXTS, VQ, vq_params)
    return root, shards, vq_params


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("import_run"))
    manifest = import_run.import_weights(run_dir, source=release[0])
    return os.path.join(run_dir, "import"), manifest


def _tokenizer_file(root):
    return os.path.join(root, "tokenizer", "text_tokenizer.json")


def test_logits_match_the_released_architecture(release, imported):
    root, shards, _ = release
    out, manifest = imported
    assert manifest["imported_from"] == "chameleon" and manifest["dtype"] == "bfloat16"
    config, params, _ = pc.load_decoder(out)
    assert (config.mlp_dim, config.kv_heads, config.block_order) == (192, 2, "pre")
    with open(_tokenizer_file(root), "rb") as f:
        vocab = chameleon_vocab.build(f.read(), VQ.codes_per_image)
    layout, source = vocab.layout, vocab.source_ids
    bundled = MultimodalVocabulary(os.path.join(out, "vocab"))
    assert bundled.layout == layout
    # The manifest records the bundled vocabulary, where it lies: a run reading the import
    # with a vocabulary of its own is checked against it.
    assert manifest["vocabulary"]["fingerprint"] == bundled.fingerprint
    assert manifest["vocabulary"]["directory"] == os.path.join(out, "vocab")
    assert restore.vocabulary_mismatch(out, bundled) is None

    ours = np.random.default_rng(0).integers(0, layout.used_size, (2, 24))
    theirs = chameleon_testlib.reference_logits(shards, source[ours])
    got = np.asarray(forward(config)(params, ours))
    want = theirs[..., source[:layout.used_size]]
    rel = np.abs(got[..., :layout.used_size] - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
    # Padding ids borrow a reserved token's output row: never a likely token.
    reserved = Tokenizer.from_file(_tokenizer_file(root)).token_to_id("<reserved00003>")
    np.testing.assert_allclose(got[..., layout.used_size:],
                               np.repeat(theirs[..., reserved:reserved + 1],
                                         layout.vocab_size - layout.used_size, -1), rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_vocabulary_maps_text_specials_and_image_codes(release, imported):
    root, out = release[0], imported[0]
    vocab = MultimodalVocabulary(os.path.join(out, "vocab"))
    hf = Tokenizer.from_file(_tokenizer_file(root))
    with open(_tokenizer_file(root), "rb") as f:
        source = chameleon_vocab.build(f.read(), VQ.codes_per_image).source_ids
    text = "a red circle above a purple square"
    ids = np.asarray(vocab.encode(text))
    assert vocab.decode(ids) == text
    np.testing.assert_array_equal(source[ids], hf.encode(text).ids)  # Token for token.
    names = {layout_lib.BREAK_ID: "<racm3:break>", layout_lib.EOS_ID: "</s>",
             layout_lib.EOSS_ID: "<eoss>", layout_lib.PAD_ID: "<pad>",
             vocab.layout.sentinel_id(0): "<s>"}  # No <sentinel:i>: <s> masks for CFG.
    for ours, name in names.items():
        assert hf.id_to_token(int(source[ours])) == name
    for code in (0, 7, 31):
        image_id = vocab.layout.codes_to_ids(code)
        assert hf.id_to_token(int(source[image_id])) == chameleon_testlib.image_token_name(code)
    # Its prompts open with Chameleon's own <s> (ours open with <eos>, as our training did):
    # the conditional prompt as Chameleon's `<s> caption <boi>`, the unconditional
    # `<sentinel:0> <break>` as `<s> <boi>`, not `<s> <s> <boi>`.
    start = vocab.prompt_start_id
    assert hf.id_to_token(int(source[start])) == "<s>"
    cond = prompts.opened(prompts.text_to_image(ids), start)
    uncond = prompts.opened(prompts.text_to_image_unconditional(vocab.layout), start)
    assert [hf.id_to_token(int(source[i])) for i in (cond[0], cond[-1])] == ["<s>",
                                                                          "<racm3:break>"]
    assert [hf.id_to_token(int(source[i])) for i in uncond] == ["<s>", "<racm3:break>"]


def test_text_to_image_runs_on_the_import_and_decodes_pixels(release, imported):
    out = imported[0]
    config, params, _ = pc.load_decoder(out)
    tokenizer = ImageTokenizer.from_checkpoint(os.path.join(out, "image_tokenizer"))
    gen = Generator(config, params, MultimodalVocabulary(os.path.join(out, "vocab")), tokenizer,
                    batch_size=2, prompt_multiple=16)
    made = gen.text_to_image(["a red circle"], num_samples=2, num_retrieved=0,
                             sampling=SamplingConfig(guidance="cfg", guidance_scale=3.0), seed=1)
    assert made.images.shape == (2, 8, 8, 3) and made.images.dtype == np.uint8
    assert made.codes.shape == (2, 16) and made.codes.max() < 32
    # The pixels are the released VQGAN decoder's (which transformers' conversion drops).
    np.testing.assert_array_equal(made.images, ImageTokenizer(VQ, release[2]).decode(made.codes))


@pytest.mark.slow
def test_the_import_edits_with_two_scale_guidance_and_refuses_an_infill(imported):
    """Its one sentinel (Chameleon's <s>) masks every input of a guidance stream (an edit's
    source image and instruction alike: there is no second sentinel); a CM3 infill, which
    needs sentinels it has not got, is refused naming what to use instead."""
    out = imported[0]
    config, params, _ = pc.load_decoder(out)
    vocab = MultimodalVocabulary(os.path.join(out, "vocab"))
    gen = Generator(config, params, vocab,
                    ImageTokenizer.from_checkpoint(os.path.join(out, "image_tokenizer")),
                    batch_size=2, prompt_multiple=16)
    source = np.zeros((1, 8, 8, 3), np.uint8)
    made = gen.edit(source, ["make it red"], seed=0)
    assert made.images.shape == (1, 8, 8, 3)
    neither = gen._streams([sft_prompts.edit(np.zeros(16, np.int64), "make it red")],  # noqa: SLF001
                           SamplingConfig(guidance="cfg"), (1.5, 7.5))[-1][0]
    assert (neither == vocab.prompt_start_id).sum() == 2  # both inputs masked by <s>
    for call in (lambda: gen.image_to_text(source, num_retrieved=0, style="infill"),
                 lambda: gen.infill_text(["a"], [""], source)):
        with pytest.raises(UserInputError, match="no CM3 sentinels.*use"):
            call()
    assert len(gen.image_to_text(source, num_retrieved=0, style="image_first",
                                 max_tokens=4)) == 1


def _copy(release, tmp_path):
    root = str(tmp_path / "release")
    shutil.copytree(release[0], root)
    return root, os.path.join(root, "models", "7b")


def test_a_missing_shard_is_named_and_nothing_is_left(release, tmp_path):
    root, model_dir = _copy(release, tmp_path)
    os.remove(os.path.join(model_dir, "consolidated.01.pth"))
    with pytest.raises(chameleon_release.ReleaseError,
                       match=r"consolidated\.01\.pth: missing; model_parallel_size=2"):
        import_run.import_weights(str(tmp_path / "run"), source=root)
    assert not (tmp_path / "run").exists()


def test_a_bad_params_json_is_a_user_error(release, tmp_path):
    """A UserInputError, so the command line prints one line, not a traceback."""
    root, model_dir = _copy(release, tmp_path)
    params = os.path.join(model_dir, "params.json")
    good = json.loads(open(params).read())
    for bad, match in [([good], "a JSON list, not an object"),
                       ({**good, "model": {**good["model"], "n_heads": 0}},
                        r"\{'n_heads': 0\} must be positive")]:
        with open(params, "w") as f:
            json.dump(bad, f)
        with pytest.raises(UserInputError, match=match):
            import_run.import_weights(str(tmp_path / "run"), source=root)
    assert issubclass(chameleon_release.ReleaseError, UserInputError)


def test_a_tensor_that_does_not_fit_is_named(release, tmp_path):
    root, model_dir = _copy(release, tmp_path)
    path = os.path.join(model_dir, "consolidated.00.pth")
    sd = torch.load(path, weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"][:, :50]
    torch.save(sd, path)
    with pytest.raises(chameleon_release.ReleaseError,
                       match=r"consolidated\.00\.pth: tensor 'layers\.1\.feed_forward\.w2\.weight'"
                             r" has shape \(64, 50\); params\.json implies \(64, 96\)"):
        import_run.import_weights(str(tmp_path / "run"), source=root)
    os.remove(os.path.join(root, "tokenizer", "vqgan.yaml"))
    with pytest.raises(chameleon_release.ReleaseError, match=r"vqgan\.yaml: missing"):
        chameleon_release.read_release(root)
    assert sorted(os.listdir(tmp_path)) == ["release"]


def test_import_run_mode_from_the_command_line(release, tmp_path):
    import gin

    from cm3leon_jax import main
    argv = ["--gin_file=gin_configs/runs/import.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
            f"--gin.import_weights.source='{release[0]}'",
            "--gin.import_weights.dtype='float32'", "--gin.import_weights.model_size='7b'"]
    try:
        assert main.main(argv) == 0
    finally:
        gin.clear_config()
    manifest = pc.read_manifest(str(tmp_path / "run" / "import"))
    assert manifest["dtype"] == "float32" and manifest["imported_from"] == "chameleon"


def test_hf_export_of_the_import_carries_its_tokenizer(release, imported, tmp_path):
    import transformers

    from cm3leon_jax.export import hf_export
    out = imported[0]
    config, params, _ = pc.load_decoder(out)
    vocab_dir = os.path.join(out, "vocab")
    hf_export.write_hf(str(tmp_path / "hf"), config, params, vocab_dir=vocab_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    vocab = MultimodalVocabulary(vocab_dir)
    for text in ("a red circle above a purple square", "  green  star", "blue"):
        assert theirs.encode(text, add_special_tokens=False) == list(vocab.encode(text))
    assert theirs.convert_tokens_to_ids(["<racm3:break>", "<eoss>", "</s>", "IMGIMGBDZ"]) == \
        [2, 3, 1, vocab.layout.codes_to_ids(13)]
    # Its sequences open with Chameleon's <s>, not our <eos>: config.json and the tokenizer
    # say so.
    with open(tmp_path / "hf" / "config.json") as f:
        bos = json.load(f)["bos_token_id"]
    assert bos == vocab.prompt_start_id != layout_lib.EOS_ID
    assert theirs.bos_token == "<s>" and theirs.bos_token_id == bos


def test_a_transformers_chameleon_folder_in_its_own_ids_imports(release, tmp_path):
    """transformers' conversion of the release: Chameleon's ids, its tokenizer.json."""
    import transformers

    from cm3leon_jax.export import hf_import
    from cm3leon_jax.model import hf_weights
    from tests.model.model_testlib import tiny_chameleon
    tok_file = _tokenizer_file(release[0])
    rows = -(-Tokenizer.from_file(tok_file).get_vocab_size() // 2) * 2
    config = tiny_chameleon(vocab_size=rows)
    tiny_vq = dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=8,
                   base_channels=32, channel_multiplier=[1], num_res_blocks=1)
    hf_config = transformers.ChameleonConfig(**hf_weights.hf_config_kwargs(config, "chameleon"),
                                             vq_config=tiny_vq)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(hf_config).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    shutil.copy(tok_file, folder / "tokenizer.json")

    back, params, extras = hf_import.read_hf(str(folder))
    with open(tok_file, "rb") as f:
        vocab = chameleon_vocab.build(f.read(), 64)  # 8 px / f1: 8 x 8 codes.
    assert back == config.replace(vocab_size=vocab.layout.vocab_size)
    assert extras["image_tokenizer"] is None and extras["write_vocab"] is not None
    layout, source = vocab.layout, vocab.source_ids
    ours = np.random.default_rng(3).integers(0, layout.used_size, (2, 16))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(source[ours])).logits.numpy()
    got = np.asarray(forward(back)(params, ours))[..., :layout.used_size]
    want = theirs[..., source[:layout.used_size]]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def _run_mode(gin_file: str, bindings: list[str]):
    """A run mode through its gin file, as the command line runs it."""
    import gin

    from cm3leon_jax import main as main_lib
    gin.clear_config()
    try:
        main_lib.configure([os.path.join(RUN_GIN, gin_file)], bindings)
        return main_lib.run()
    finally:
        gin.clear_config()


def _coco_captions(root, n: int, seed: int) -> list[str]:
    """A COCO captions file of n random images (20 x 24: cropped and resized to the
    tokenizer's 8 px): the sft_preprocess bindings that read it."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(root / "img", exist_ok=True)
    images, anns = [], []
    for i in range(n):
        name = f"{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "img" / name)
        images.append({"id": i, "file_name": name})
        anns.append({"id": i, "image_id": i, "caption": TEXTS[(seed * n + i) % len(TEXTS)]})
    path = root / f"captions_{seed}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return [repr(str(path)), repr(str(root / "img"))]


def test_the_import_fine_tunes_left_to_right_and_generates(imported, tmp_path):
    """SFT of an imported Chameleon: its vocabulary (a tokenizers text.json, no CM3
    sentinels: its one sentinel holds <s>) goes through sft_preprocess and the sft run; CM3
    spans are refused (they would be masked with <s>); its training sequences open with
    Chameleon's <s>, as its prompts do; the fine-tuned run generates."""
    import gin

    from cm3leon_jax.train import data as train_data
    out = imported[0]
    train, val = _coco_captions(tmp_path, 12, 0), _coco_captions(tmp_path, 4, 1)
    sft_data = str(tmp_path / "sft_data")
    _run_mode("sft_preprocess.gin", [
        f"MODEL_DIR={sft_data!r}", f"PRETRAIN_DATA={out!r}",
        f"IMAGE_TOKENIZER_DIR={os.path.join(out, 'image_tokenizer')!r}", "IMAGE_SIZE=8",
        "sft_preprocess.source=@FormatSource()",
        "FormatSource.splits={'train': [@CocoCaptions()], "
        "'validation': [@validation/CocoCaptions()]}",
        f"CocoCaptions.annotations={train[0]}", f"CocoCaptions.image_dir={train[1]}",
        f"validation/CocoCaptions.annotations={val[0]}",
        f"validation/CocoCaptions.image_dir={val[1]}"])
    vocab = MultimodalVocabulary(os.path.join(sft_data, "vocab"))
    assert sorted(os.listdir(vocab.directory)) == ["layout.json", "text.json"]
    assert vocab == MultimodalVocabulary(os.path.join(out, "vocab"))

    sft_dir = str(tmp_path / "sft")
    common = [f"MODEL_DIR={sft_dir!r}", f"SFT_DATA={sft_data!r}", f"BASE_MODEL_DIR={out!r}",
              "train.num_steps=2", "train.eval_every=2", "train.seq_len=128",
              "train.global_batch_size=8", "Checkpointer.save_every=2",
              "train.task='cm3leon_sft_caption'"]
    with pytest.raises(UserInputError, match="no CM3 sentinels.*sft_cm3.mean_spans=0.0"):
        _run_mode("sft.gin", common)
    assert not os.path.exists(os.path.join(sft_dir, "checkpoints"))

    left_to_right = common + ["sft_cm3.mean_spans=0.0", "sft_cm3.loss_on='output'"]
    from cm3leon_jax import main as main_lib
    gin.clear_config()
    try:  # What the trainer reads: every packed sequence opens with <s>.
        main_lib.configure([os.path.join(RUN_GIN, "sft.gin")], left_to_right)
        batch = next(iter(train_data.seqio_shard_dataset(
            0, 1, 2, task="cm3leon_sft_caption", seq_len=128, shuffle=False)))
    finally:
        gin.clear_config()
    inputs, segments = (np.asarray(batch[k]) for k in ("decoder_input_tokens",
                                                      "decoder_segment_ids"))
    starts = np.diff(segments, axis=1, prepend=0) > 0
    assert starts.sum() >= 2 and (inputs[starts] == vocab.prompt_start_id).all()
    hf = Tokenizer.from_file(os.path.join(vocab.directory, "text.json"))
    with open(os.path.join(vocab.directory, "text.json"), "rb") as f:
        source = chameleon_vocab.build(f.read(), VQ.codes_per_image).source_ids
    assert hf.id_to_token(int(source[vocab.prompt_start_id])) == "<s>"

    result = _run_mode("sft.gin", left_to_right)
    assert result["step"] == 2 and np.isfinite(result["eval"]["loss"])
    config, params, step = restore.restore_decoder(sft_dir, vocab=vocab)
    tokenizer = ImageTokenizer.from_checkpoint(os.path.join(out, "image_tokenizer"))
    made = Generator(config, params, vocab, tokenizer, batch_size=2, prompt_multiple=16
                     ).text_to_image(["a red circle"], num_samples=1, num_retrieved=0, seed=0)
    assert step == 2 and made.images.shape == (1, 8, 8, 3)
