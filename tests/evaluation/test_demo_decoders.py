"""benchmarks/demo_decoders.py's table: the mean over seeds with the range beside it."""

import pytest

from benchmarks import demo_decoders


def test_the_table_gives_each_decoder_its_mean_and_range_over_seeds():
    t2i = {m: [0.2, 0.3] for m in demo_decoders.T2I}
    result = {"step": 700, "captions": {m: 0.25 for m in demo_decoders.CAPTIONS},
              "text_to_image": {"k2": t2i, "k0": {m: [0.1, 0.1] for m in demo_decoders.T2I}}}
    lines = demo_decoders.table({"places": result}).splitlines()
    assert lines[0].startswith("| decoder | step | t2i k=2 objects_right")
    assert lines[2].startswith("| places | 700 | 25.0% (20.0%-30.0%) |")
    assert "| 10.0% |" in lines[2] and lines[2].endswith("| 25.0% | 25.0% |")


def test_the_retrieval_row_leaves_the_columns_it_has_no_figure_for_empty():
    t2i = {m: [0.2] for m in demo_decoders.T2I}
    decoder = {"step": 700, "captions": {m: 0.25 for m in demo_decoders.CAPTIONS},
               "text_to_image": {"k2": t2i, "k0": t2i}}
    alone = {"step": "-", "captions": {m: 0.5 for m in demo_decoders.CAPTIONS},
             "text_to_image": {"k2": {m: [0.6] for m in demo_decoders.T2I}}}
    lines = demo_decoders.table({"d": decoder, demo_decoders.RETRIEVAL_ROW: alone}).splitlines()
    row = lines[3].split(" | ")
    n = len(demo_decoders.T2I)
    assert row[0] == f"| {demo_decoders.RETRIEVAL_ROW}" and row[1] == "-"
    assert row[2:2 + n] == ["60.0%"] * n and row[2 + n:2 + 2 * n] == ["-"] * n
    assert lines[3].endswith("| 50.0% | 50.0% |")


def test_the_settings_are_the_runs_own_with_the_stages_defaults(tmp_path):
    import gin

    (tmp_path / "config.gin").write_text(
        "import cm3leon_jax.demo.generate\n"
        "generate_stage.num_retrieved = 1\n"
        "generate_stage.image_sampling = @images/SamplingConfig()\n"
        "images/SamplingConfig.top_p = 0.5\n"
        "images/SamplingConfig.guidance = 'cfg'\n"
        "import cm3leon_jax.retrieval.select\n"
        "SelectionConfig.k = 3\n"
        "SelectionConfig.max_relevance = 0.99\n"
        "import cm3leon_jax.decode.generate\n"
        "Generator.guidance_keeps_documents = True\n"
        "DecoderConfig.num_heads = 4\n")
    try:
        settings = demo_decoders.generate_settings(str(tmp_path))
        # The run's bindings are gone: a --decoder of another size is read as it was
        # trained, not refused as a mismatch with the run's decoder.
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.gin").write_text("DecoderConfig.num_heads = 2\n")
        from cm3leon_jax.train import run_config
        assert run_config.decoder_config(str(other)).num_heads == 2
    finally:
        gin.clear_config()
    assert set(settings) == set(demo_decoders.SETTINGS)
    assert settings["num_retrieved"] == 1
    assert settings["image_sampling"].top_p == 0.5
    assert settings["image_sampling"].guidance == "cfg"
    # Its guidance's unconditional stream kept the documents, as the demo's does.
    assert settings["keeps_documents"] is True
    # The rules the run's generate stage searched with: its thresholds, k as served.
    assert settings["selection"].max_relevance == 0.99 and settings["selection"].k == 2
    # Unbound: generate_stage's own defaults.
    assert settings["rerank_samples"] == 4 and settings["caption_style"] == "infill"
    assert settings["caption_sampling"] is None and settings["max_caption_tokens"] == 24


def test_a_sampling_variant_changes_only_the_fields_it_names():
    from cm3leon_jax.decode.generate import SamplingConfig

    run = {"image_sampling": SamplingConfig(guidance_scale=5.0)}
    name, sampling = demo_decoders.parse_variant("cold=temperature:0.7,top_k:8,greedy:false", run)
    assert name == "cold"
    assert (sampling.temperature, sampling.top_k, sampling.greedy) == (0.7, 8, False)
    assert sampling.guidance_scale == 5.0 and sampling.top_p == 0.9
    assert demo_decoders.parse_variant("g=greedy:TRUE", run)[1].greedy is True
    for bad in ("cold", "=temperature:0.7", "cold=warmth:1", "cold=temperature",
                "cold=temperature:warm", "cold=greedy:yes", "cold=top_k:0.5"):
        try:
            demo_decoders.parse_variant(bad, run)
        except SystemExit as e:
            assert "FIELD" in str(e)
        else:
            raise AssertionError(bad)


def test_the_rerank_rates_compare_the_kept_sample_with_a_perfect_pick():
    import numpy as np

    right = [0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]  # 3 captions, 4 samples each
    rows = [{"objects_right": float(x)} for x in right]
    rates = demo_decoders.pick_rates(rows, 4, np.array([0, 1, 3]))
    assert rates == {"kept": 1 / 3, "first": 1 / 3, "mean": 3 / 12, "best": 2 / 3}


def test_the_counts_from_the_command_line_replace_the_runs_and_are_checked():
    run = {"num_retrieved": 2, "rerank_samples": 8, "caption_style": "image_first"}
    assert demo_decoders.override_settings(run) == run
    out = demo_decoders.override_settings(run, rerank_samples=4, num_retrieved=1)
    assert out == {"num_retrieved": 1, "rerank_samples": 4, "caption_style": "image_first"}
    assert run["num_retrieved"] == 2  # The run's settings are left as they were.
    # --guidance-drops-documents / --guidance-keeps-documents replace the run's choice.
    kept = {**run, "keeps_documents": True}
    assert demo_decoders.override_settings(kept)["keeps_documents"] is True
    assert demo_decoders.override_settings(kept, keeps_documents=False)["keeps_documents"] is False
    for bad, flag in (({"rerank_samples": 0}, "--rerank-samples=0"),
                      ({"num_retrieved": 0}, "--num-retrieved=0")):
        with pytest.raises(SystemExit, match=flag):
            demo_decoders.override_settings(run, **bad)


def test_the_class_table_gives_each_asked_class_its_rate_and_share():
    by_class = {"k2": {"circle": {"asked": [3.0, 3.0], "drawn_right": [1.0, 0.5],
                                  "drawn_share": [0.6, 0.8]},
                       "star": {"asked": [0.0, 0.0], "drawn_share": [0.1, 0.0]}}}
    alone = {"step": "-", "captions": {}, "text_to_image": {}}
    lines = demo_decoders.class_table({"d": {"by_class": by_class},
                                       demo_decoders.RETRIEVAL_ROW: alone}).splitlines()
    assert lines[2] == "| decoder | k | circle | star |"
    # A class nobody asked for has no rate; the retrieval row has no images, so no row.
    assert lines[4:] == ["| d | 2 | 75.0% (50.0%-100.0%) / 70.0% (60.0%-80.0%) | - |"]


def test_read_out_scores_every_caption_against_its_swaps(eval_files, image_tokenizer, tmp_path):
    import numpy as np

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocab").symlink_to(eval_files["vocab"])
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                 "captions": [caption.encode()]}
                for caption in ("a small red circle above a yellow square", "a large blue star",
                                "a plain gray background")]
    reads = demo_decoders.read_out(str(tmp_path), eval_files["checkpoint"], image_tokenizer,
                                   examples)
    assert reads["step"] == 1
    # Two objects (11 captions) and one (6): chance is the mean of 1/11 and 1/6.
    assert reads["class_chance"] == pytest.approx((1 / 11 + 1 / 6) / 2)
    assert reads["color_chance"] == pytest.approx((1 / 15 + 1 / 8) / 2)
    assert {reads["class"], reads["color"]} <= {0.0, 0.5, 1.0}
    # The caption that names no object is left out, not counted as read or not.
    assert reads["class_scenes"] == reads["color_scenes"] == 2
    line = demo_decoders.reads_table({"d": {"reads": reads}}).splitlines()[-1]
    assert line == (f"| d | 1 | {reads['class']:.1%} (12.9%) | {reads['color']:.1%} (9.6%) |")


def test_circle_negatives_reach_the_generator_renamed():
    import numpy as np

    from cm3leon_jax.data import shapes
    from cm3leon_jax.decode.generate import Images, SamplingConfig

    class Recorder:
        def __init__(self):
            self.negatives = []

        def text_to_image(self, captions, *, num_samples, negative_captions=None, **_):
            self.negatives.append(negative_captions)
            n = len(captions) * num_samples
            return Images(np.zeros((n, 64), np.int32), np.zeros((n, 32, 32, 3), np.uint8),
                          [c for c in captions for _ in range(num_samples)])

    scene = shapes.Scene(32, shapes.Background(), (shapes.make_shape("star", "red", "small",
                                                                      4, 4, 10),))
    examples = [{"captions": [b"a red star"]}, {"captions": [b"a blue circle"]}]
    settings = {"rerank_samples": 1, "num_retrieved": 2}
    gen = Recorder()
    demo_decoders._text_to_image(gen, None, examples, [scene] * 2, [0], settings,
                                 (SamplingConfig(), True))
    assert gen.negatives == [["a red circle", "a blue square"]] * 2  # k = 2, then k = 0.
    gen.negatives.clear()
    demo_decoders._text_to_image(gen, None, examples, [scene] * 2, [0], settings, None)
    assert gen.negatives == [None, None]
