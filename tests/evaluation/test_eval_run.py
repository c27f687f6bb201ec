"""The eval run: through the CLI on a tiny random checkpoint, and run_suite on COCO-format
and VQAv2-format fixture files with 0 / 1 / 2 retrieved documents."""

import json
import os
import shutil
from types import SimpleNamespace

import gin
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import main as main_lib
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import rerank
from cm3leon_jax.decode.generate import Generator, SamplingConfig
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import eval_run, fid, grading, likelihood, suites
from cm3leon_jax.evaluation.grading import Context, Strategy
from cm3leon_jax.retrieval.encoder import DocumentEncoder
from cm3leon_jax.retrieval.retriever import SearchResult
from cm3leon_jax.vocab import document
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from tests.evaluation.conftest import CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JAVA = shutil.which("java") is not None


def test_eval_cli_on_the_corpus_suite(eval_files, tmp_path, capfd, monkeypatch):
    """`main` as the command line runs it, in this process (the `python -m` wrapper and its
    exit codes are tests/cli's: a subprocess here would only add 12 s of imports)."""
    out = tmp_path / "run"
    args = [
        "--gin_file=gin_configs/runs/eval.gin", f"--gin.MODEL_DIR='{out}'",
        f"--gin.evaluate.checkpoint='{eval_files['checkpoint']}'",
        f"--gin.evaluate.vocab_dir='{eval_files['vocab']}'",
        "--gin.load_image_tokenizer.checkpoint=None",
        "--gin.load_image_tokenizer.config=@VQGANConfig()",
        "--gin.VQGANConfig.image_size=32", "--gin.VQGANConfig.base_channels=8",
        "--gin.VQGANConfig.channel_multipliers=(1, 2, 2, 2)", "--gin.VQGANConfig.attn_levels=()",
        "--gin.VQGANConfig.latent_channels=8", "--gin.VQGANConfig.embed_dim=8",
        "--gin.VQGANConfig.codebook_size=64", "--gin.VQGANConfig.num_groups=4",
        "--gin.evaluate.retrieval_dir=None", "--gin.evaluate.num_retrieved=[0]",
        f"--gin.evaluate.clip_encoder_dir='{eval_files['clip']}'",
        "--gin.evaluate.strategies=[@cfg3/Strategy(), @rerank8/Strategy()]",
        "--gin.rerank8/Strategy.num_samples=2", "--gin.corpus_suite.num_examples=2",
        "--gin.evaluate.caption_metrics=" + ("['BLEU-4', 'CIDEr-D']" if JAVA else "[]"),
        "--gin.evaluate.batch_size=4",
    ]
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    try:
        status = main_lib.main(args)
    finally:
        gin.clear_config()
    stdout, stderr = capfd.readouterr()
    assert status == 0, stderr[-3000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    rows = {(row["task"], row["strategy"]): row for row in report["rows"]}
    assert set(rows) == {("text_to_image", "cfg3"), ("text_to_image", "rerank8"),
                         ("captioning", "greedy"), ("vqa", "greedy"), ("edit", "two_scale"),
                         ("text_to_image", "real:vq_reconstruction"),
                         ("text_to_image", "real:other_scenes")}
    # eval.gin's reference rows: real images graded like samples, retrieved "-".
    other = rows[("text_to_image", "real:other_scenes")]
    assert other["retrieved"] == "-" and other["fid_retrieval_encoder"] > 0
    assert "objects_right" in rows[("text_to_image", "real:vq_reconstruction")]
    t2i = rows[("text_to_image", "rerank8")]
    for key in ("objects_right", "count_right", "box_iou", "clip_score",
                "fid_retrieval_encoder"):
        assert key in t2i and np.isfinite(t2i[key])
    assert 0 <= t2i["clip_score"] <= 100 and t2i["fid_retrieval_encoder"] > 0
    assert {"object_precision", "object_recall"} <= set(rows[("captioning", "greedy")])
    assert JAVA <= ("CIDEr-D" in rows[("captioning", "greedy")])
    vqa_row = rows[("vqa", "greedy")]
    assert "vqa_exact_match" in vqa_row
    # Broken down by question type, each type with its count.
    asked = [k for k in vqa_row if k.startswith("vqa_questions/")]
    assert asked and all(f"vqa_exact_match/{k.split('/')[1]}" in vqa_row for k in asked)
    assert all(isinstance(vqa_row[k], int) and vqa_row[k] > 0 for k in asked)
    edit = rows[("edit", "two_scale")]
    assert "edit_right" in edit and 0 <= edit["edit_kept_codes"] <= 1
    assert all(np.isnan(edit[k]) or 0 < edit[k] < 1
               for k in ("edit_copy_prob", "edit_first_copy_prob"))
    table = (out / "eval" / "report.md").read_text()
    assert table.count("| text_to_image |") == 4 and "clip_score" in table
    for name in ("text_to_image_cfg3_k0", "text_to_image_rerank8_k0", "captioning_k0", "vqa",
                 "edit_two_scale"):
        assert Image.open(out / "eval" / f"{name}.png").size[0] > 0
    assert "[eval] wrote" in stdout and "eval:" in stderr  # tqdm's progress bar
    assert report["complete"] and t2i["fid_n"] == 2  # What the FID is of.

    # A second run into the same MODEL_DIR, or one into the trained run it reads: refused
    # before anything is written (config.gin included).
    before = {p: p.read_bytes() for p in (out / "config.gin", out / "eval" / "report.json")}
    for model_dir, message in ((out, "earlier run's eval/"),
                               (eval_files["checkpoint"], "lies inside evaluate.checkpoint")):
        again = [a if not a.startswith("--gin.MODEL_DIR=") else f"--gin.MODEL_DIR='{model_dir}'"
                 for a in args]
        gin.clear_config()
        try:
            assert main_lib.main(again) == 2
        finally:
            gin.clear_config()
        assert message in capfd.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


class Documents:
    """A retrieval service that returns the same real documents for every query."""

    def __init__(self, docs):
        self.docs = docs

    def _results(self, n, k):
        return [SearchResult([f"d{i}" for i in range(k)], [1.0] * k, self.docs[:k],
                             list(range(k))) for _ in range(n)]

    def search_texts(self, texts, k):
        return self._results(len(texts), k)

    def search_images(self, images, k):
        return self._results(len(images), k)


def _write_fixtures(root, images):
    """A COCO captions file, VQAv2 question/annotation files and their images."""
    os.makedirs(root / "val2014")
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg", quality=95)
    coco = {"images": [{"id": i + 1, "file_name": f"COCO_val2014_{i + 1:012d}.jpg"}
                       for i in range(len(images))],
            "annotations": [{"image_id": i + 1, "id": 10 * i + j, "caption": c}
                            for i in range(len(images)) for j, c in
                            enumerate(["A red circle.", "a small red circle on gray"])]}
    questions = {"questions": [{"question_id": 100 + i, "image_id": i + 1,
                                "question": "How many shapes are there?"}
                               for i in range(len(images))]}
    answers = {"annotations": [{"question_id": 100 + i, "image_id": i + 1,
                                "answers": [{"answer": a, "answer_id": j} for j, a in
                                            enumerate(["1"] * 6 + ["one"] * 2 + ["2"] * 2)]}
                               for i in range(len(images))]}
    for name, data in (("captions.json", coco), ("questions.json", questions),
                       ("answers.json", answers)):
        (root / name).write_text(json.dumps(data))


def test_coco_and_vqav2_files_a_suite_cannot_use_are_named(tmp_path):
    """Each was a traceback (KeyError, ValueError) or, for the images, silently wrong: a
    16-bit grayscale file read as white, a 1x1 file as a flat square."""
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    _write_fixtures(tmp_path, images)
    coco = json.loads((tmp_path / "captions.json").read_text())

    def built(data=None, max_images=None):
        if data is not None:
            (tmp_path / "c.json").write_text(json.dumps(data))
        path = str(tmp_path / ("c.json" if data is not None else "captions.json"))
        return suites.coco_suite(path, str(tmp_path / "val2014"), max_images=max_images)(32)

    instances = {**coco, "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4],
                                          "category_id": 1}]}
    missing = {**coco, "images": coco["images"] + [{"id": 9, "file_name": "gone.jpg"}],
               "annotations": coco["annotations"] + [{"image_id": 9, "caption": "c"}]}
    for kwargs, match in (({"data": instances}, "is an instances \\(boxes\\) file"),
                          ({"max_images": 1}, "coco_suite.max_images=1: give a whole number"),
                          ({"data": missing}, "gone.jpg' \\(image id 9 of "
                                              ".*coco_suite.image_dir\\) does not exist")):
        with pytest.raises(UserInputError, match=match):
            built(**kwargs)
    second = tmp_path / "val2014" / "COCO_val2014_000000000002.jpg"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(second)
    with pytest.raises(UserInputError, match="is 1x1 pixels, under 8"):
        built()
    gray = (np.arange(40 * 48).reshape(40, 48) * 20).astype(np.uint16)  # 0 .. 38380
    Image.fromarray(gray).save(second.with_suffix(".png"))
    data = {**coco, "images": [coco["images"][0], {"id": 2, "file_name":
                                                    "COCO_val2014_000000000002.png"}]}
    read = built(data).captioning.images[1]
    assert 0 < read.mean() < 200 and read.std() > 10  # Scaled to 8 bits, not all white.
    with pytest.raises(UserInputError, match="swapped"):
        suites.vqav2_suite(str(tmp_path / "answers.json"), str(tmp_path / "questions.json"),
                           str(tmp_path / "val2014"))(32)


def test_run_suite_on_coco_and_vqav2_files_with_retrieval(eval_files, image_tokenizer, tmp_path,
                                                          monkeypatch):
    vocab = MultimodalVocabulary(eval_files["vocab"])
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    _write_fixtures(tmp_path, images)
    coco = suites.coco_suite(str(tmp_path / "captions.json"), str(tmp_path / "val2014"))(32)
    assert coco.text_to_image.prompts == ["A red circle."] * 3
    assert coco.captioning.references[0] == ["A red circle.", "a small red circle on gray"]
    assert coco.captioning.images.shape == (3, 32, 32, 3)
    vqa = suites.vqav2_suite(str(tmp_path / "questions.json"), str(tmp_path / "answers.json"),
                             str(tmp_path / "val2014"))(32)
    assert vqa.vqa.references[2] == ["1"] * 6 + ["one"] * 2 + ["2"] * 2
    doc = document.encode(document.Document([document.Text("a red circle"),
                                             document.Image(np.arange(16))]), vocab)
    gen = Generator(CONFIG, eval_files["params"], vocab, image_tokenizer,
                    retriever=Documents([doc, doc]), batch_size=4)
    encoder = DocumentEncoder.load(eval_files["clip"])
    ctx = Context(gen, rerank.ClipRanker(encoder),
                  {"fid_retrieval_encoder": fid.EncoderFeatures(encoder)},
                  caption_metrics=("BLEU-4", "CIDEr-D") if JAVA else ())
    strategy = Strategy("top-p", (SamplingConfig(guidance="none"),))
    rows = eval_run.run_suite(ctx, coco, str(tmp_path / "coco"), [strategy], (0, 1, 2))
    assert [(r["task"], r["retrieved"]) for r in rows] == [
        ("text_to_image", 0), ("text_to_image", 1), ("text_to_image", 2),
        ("captioning", 0), ("captioning", 1), ("captioning", 2)]
    assert all(np.isfinite(r["fid_retrieval_encoder"]) for r in rows[:3])
    if JAVA:
        assert all(0 <= r["CIDEr-D"] <= 10 for r in rows[3:])
    rows = eval_run.run_suite(ctx, vqa, str(tmp_path / "vqa"), [strategy])
    assert rows[0]["task"] == "vqa" and 0 <= rows[0]["vqa_accuracy"] <= 100
    report = eval_run.write_report(str(tmp_path / "vqa"), {"suite": vqa.name}, rows)
    assert report["rows"] == rows and "vqa_accuracy" in (tmp_path / "vqa" / "report.md").read_text()

    # A job that fails late keeps the rows done before it in the report.
    def broken(*args):
        raise RuntimeError("captioning broke")
    monkeypatch.setattr(grading, "caption", broken)
    with pytest.raises(RuntimeError, match="captioning broke"):
        eval_run.evaluate_generator(gen, str(tmp_path / "partial"), suite=lambda size: coco,
                                    strategies=[strategy], encoder=encoder, caption_metrics=())
    partial = json.loads((tmp_path / "partial" / "report.json").read_text())
    assert not partial["complete"] and [r["task"] for r in partial["rows"]] == ["text_to_image"]


def test_fid_reference_statistics_say_what_they_are_of(tmp_path, caplog):
    stats = fid.Statistics(np.zeros(3), np.eye(3))
    key = {"suite": "coco_30000", "images": 30000, "image_size": [256, 256]}
    path = str(tmp_path / "ref.npz")
    fid.save_statistics(path, stats, key)
    np.testing.assert_array_equal(fid.load_statistics(path, key).sigma, np.eye(3))
    with pytest.raises(ValueError, match="computed from .*'images': 30000.*not this run's"):
        fid.load_statistics(path, {**key, "images": 5})
    np.savez(path, mu=stats.mu, sigma=stats.sigma)  # pytorch-fid's --save-stats: no key.
    with caplog.at_level("WARNING"):
        fid.load_statistics(path, key)
    assert "do not say what they were computed from" in caplog.text
    (tmp_path / "ref.npz").write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(ValueError, match="unreadable.*delete the file"):
        fid.load_statistics(path, key)


class _Pixels:
    """A stand-in feature extractor: a few pixels as features, `fingerprint` its weights."""

    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    def __call__(self, images):
        return images.reshape(len(images), -1)[:, :4].astype(np.float64)


def test_cached_reference_statistics_of_other_images_or_weights_are_refused(tmp_path):
    """The cache's key named only the suite, the counts and the sizes: statistics of other
    images of the same count (another image_dir) or of other Inception weights were used
    without a word."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    cache = {"fid_inception": str(tmp_path / "ref.npz")}

    def references(pixels, weights):
        ctx = SimpleNamespace(features={"fid_inception": _Pixels(weights)}, references={})
        suite = SimpleNamespace(name="coco_6", text_to_image=SimpleNamespace(
            reference_images=pixels))
        eval_run._references(ctx, suite, cache)
        return ctx.references["fid_inception"]

    first = references(images, "w1")
    np.testing.assert_array_equal(references(images.copy(), "w1").mu, first.mu)  # Reused.
    for pixels, weights in ((images[::-1], "w1"), (images, "w2")):
        with pytest.raises(UserInputError, match="were computed from .* not this run's"):
            references(pixels, weights)


def test_an_overwrite_keeps_the_earlier_eval_when_the_cached_statistics_are_refused(
        eval_files, image_tokenizer, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    _write_fixtures(tmp_path, images)
    coco = suites.coco_suite(str(tmp_path / "captions.json"), str(tmp_path / "val2014"))(32)
    fid.save_statistics(str(tmp_path / "ref.npz"), fid.Statistics(np.zeros(4), np.eye(4)),
                        {"suite": "another"})
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("the earlier run's report")
    monkeypatch.setattr(eval_run, "_features", lambda *a: {"fid_inception": _Pixels("w")})
    gen = Generator(CONFIG, eval_files["params"], MultimodalVocabulary(eval_files["vocab"]),
                    image_tokenizer, batch_size=4)
    with pytest.raises(UserInputError, match="were computed from"):
        eval_run.evaluate_generator(gen, str(out), suite=lambda size: coco, caption_metrics=(),
                                    fid_reference=str(tmp_path / "ref.npz"), overwrite=True)
    assert (out / "report.md").read_text() == "the earlier run's report"


def test_bad_settings_are_named(eval_files, tmp_path):
    with pytest.raises(ValueError, match="num_retrieved=\\[0, 2\\] retrieves documents"):
        eval_run.evaluate("x", checkpoint=eval_files["checkpoint"], vocab_dir="v",
                          image_tokenizer=None, num_retrieved=(0, 2))
    for bad, match in [({"num_retrieved": 0}, r"num_retrieved=0: give a list"),
                       ({"num_retrieved": [0, -1]}, r"num_retrieved=\[0, -1\]"),
                       ({"caption_metrics": ["CIDEr"]}, r"unknown \['CIDEr'\].*CIDEr-D"),
                       ({"strategies": [Strategy("a"), Strategy("a", num_samples=2)]},
                        r"name \['a'\] more than once")]:
        with pytest.raises(UserInputError, match=match):  # Before anything is read.
            eval_run.evaluate("x", checkpoint="no_such_run", vocab_dir="v",
                              image_tokenizer=None, **bad)
    data = tmp_path / "data"
    (data / "vocab").mkdir(parents=True)
    (data / "vocab" / "layout.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"evaluate.data_dir='.*data' and "
                       r"evaluate.vocab_dir='v' name different folders \(gin_configs/runs/"
                       r"eval.gin .* as gin_configs/runs/eval_user.gin does"):
        eval_run.evaluate("x", checkpoint="no_such_run", vocab_dir="v", data_dir=str(data),
                          image_tokenizer=None)
    for data_dir, what in (("nope", "does not exist"), (str(tmp_path), "holds no vocab/")):
        with pytest.raises(FileNotFoundError, match=f"evaluate.data_dir '{data_dir}' {what}: "
                           "give the folder the model's data was preprocessed into"):
            eval_run.evaluate("x", checkpoint="no_such_run", data_dir=data_dir,
                              image_tokenizer=None)
    with pytest.raises(UserInputError, match="evaluate needs the training data's vocabulary"):
        eval_run.evaluate("x", checkpoint="no_such_run", image_tokenizer=None)
    with pytest.raises(ValueError, match="Strategy 'bad': num_samples=0: give a whole number >= 1"):
        Strategy("bad", num_samples=0)
    for bad, match in [({"split": "val"}, r"split='val' is not a split .*'validation'"),
                       ({"num_examples": 1}, r"num_examples=1: give a whole number >= 2 \(FID"),
                       ({"tasks": ("vqa", "ocr")}, r"\['ocr'\] unknown")]:
        with pytest.raises(UserInputError, match=match):
            suites.corpus_suite(**bad)
    (tmp_path / "not_coco.json").write_text("[]")
    with pytest.raises(UserInputError, match="is not a COCO captions file"):
        suites.coco_suite(str(tmp_path / "not_coco.json"), "x")(32)
    with pytest.raises(FileNotFoundError, match="COCO captions file 'nope.json'"):
        suites.coco_suite("nope.json", "x")(32)


def test_reference_rows_grade_real_images_like_samples():
    task = suites.corpus_suite(num_examples=4)(32).text_to_image
    assert task.other_images.shape == task.reference_images.shape
    assert not np.array_equal(task.other_images, task.reference_images)

    class Lossless:  # An image tokenizer that keeps every pixel.
        def reconstruct(self, images):
            return np.asarray(images)

    ctx = Context(SimpleNamespace(image_tokenizer=Lossless()))
    rows = {r["strategy"]: r for r in grading.reference_rows(ctx, task)}
    assert rows["real:vq_reconstruction"]["objects_right"] == 1.0  # The parser is exact.
    assert rows["real:other_scenes"]["objects_right"] < 1.0  # Other scenes: not the prompts'.
    assert {r["retrieved"] for r in rows.values()} == {"-"}


def test_captioning_uses_the_context_caption_style():
    task = suites.corpus_suite(num_examples=2, tasks=("captioning",))(32).captioning
    asked = []

    class Recorder:  # Stands in for a Generator: records how it was asked to caption.
        def image_to_text(self, images, **kwargs):
            asked.append(kwargs["style"])
            return ["a red circle"] * len(images)

    for style in ("infill", "image_first"):
        row, texts = grading.caption(Context(Recorder(), caption_style=style), task, 0)
        assert texts == ["a red circle"] * 2 and row["task"] == "captioning"
    assert asked == ["infill", "image_first"]
    assert Context(Recorder()).caption_style == "infill"


def test_edit_copying_weighs_the_sources_code_where_the_target_keeps_it(eval_files,
                                                                      image_tokenizer):
    vocab = MultimodalVocabulary(eval_files["vocab"])
    gen = Generator(CONFIG, eval_files["params"], vocab, image_tokenizer, batch_size=4)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    asked = ["make the red circle blue", "remove the red circle", "add a circle"]
    unchanged = grading.edit_copying(gen, images, asked, images)
    assert unchanged["edit_kept_codes"] == 1.0
    # Nothing changed: the source's code is the target's own, weighed after the prompt the
    # SFT template builds and the target's earlier codes.
    codes = image_tokenizer.encode(images)
    prompts = [sft_prompts.prompt_ids(sft_prompts.edit(c, t), vocab) for c, t in zip(codes, asked)]
    own, _ = likelihood.token_log_probs(CONFIG, eval_files["params"], prompts,
                                        [vocab.layout.codes_to_ids(c) for c in codes])
    probs = np.exp(np.stack(own))
    assert unchanged["edit_copy_prob"] == pytest.approx(probs.mean(), rel=1e-5)
    assert unchanged["edit_first_copy_prob"] == pytest.approx(probs[:, 0].mean(), rel=1e-5)
    swapped = grading.edit_copying(gen, images, asked, images[::-1])
    assert swapped["edit_kept_codes"] < 1.0


def test_each_way_of_decoding_an_edit_runs_once_named_for_what_runs():
    def cfg(scale):
        return SamplingConfig(guidance="cfg", guidance_scale=scale)

    strategies = [Strategy("top-p", (SamplingConfig(guidance="none"),)),
                  Strategy("cfg3", (cfg(3.0),)), Strategy("cfg5", (cfg(5.0),)),
                  Strategy("cdk", (SamplingConfig(guidance="cdk"),)),
                  Strategy("rerank8", (cfg(3.0),), num_samples=8),
                  Strategy("greedy", (SamplingConfig(greedy=True),))]
    got = grading.edit_strategies(strategies)
    # cfg3, cfg5 and cdk all guide an edit with two scales; re-ranking is not an edit's.
    assert [s.name for s in got] == ["unguided", "two_scale", "two_scale_greedy"]
    assert got[1].samplings[0] == cfg(3.0) and got[2].samplings[0].greedy
    # Only re-ranking strategies: edits still run, once, with the first one's sampling.
    only = grading.edit_strategies([Strategy("rerank8", (cfg(3.0),), num_samples=8)])
    assert [(s.name, s.num_samples, s.samplings) for s in only] == [
        ("two_scale", 1, (cfg(3.0),))]


def test_an_eval_twice_writes_the_same_files_and_another_seed_other_samples(
        eval_files, image_tokenizer, tmp_path):
    """The eval run end to end (every corpus task, sampled text to image included),
    deterministic given its seed: every file of two runs the same byte for byte, seed 1
    other images."""
    gen = Generator(CONFIG, eval_files["params"], MultimodalVocabulary(eval_files["vocab"]),
                    image_tokenizer, batch_size=4)
    suite = suites.corpus_suite(num_examples=2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        eval_run.evaluate_generator(gen, str(tmp_path / name), suite=suite, caption_metrics=(),
                                    seed=seed)

    def files(name):
        root = tmp_path / name
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = files("a"), files("b"), files("c")
    assert {"report.json", "report.md", "text_to_image_cfg3_k0.png"} <= set(a)
    assert a == b, sorted(k for k in a if a[k] != b.get(k))
    assert a["text_to_image_cfg3_k0.png"] != c["text_to_image_cfg3_k0.png"]
