"""Exact scores of generations: the truth scores 1, a wrong class or color does not."""

import numpy as np
import pytest

from cm3leon_jax.data import shapes, shapes_language
from cm3leon_jax.evaluation import shapes_scores

SCENES = [shapes.sample_scene(np.random.default_rng(i), 32) for i in range(30)]


def test_true_renders_and_every_caption_phrasing_score_one():
    images = np.stack([shapes.render(s) for s in SCENES])
    assert set(shapes_scores.image_scores(images, SCENES).values()) == {1.0}
    rng = np.random.default_rng(0)
    phrasings = [shapes_language.captions(s, rng) for s in SCENES]
    for i in range(4):  # "the <anchor>" in the relation phrasing is not counted twice
        assert set(shapes_scores.caption_scores([p[i] for p in phrasings],
                                                SCENES).values()) == {1.0}


def test_wrong_class_or_color_is_caught():
    star = shapes.make_shape("star", "red", "large", 4, 4, 14)
    scene = shapes.Scene(32, SCENES[0].background, (star,))
    assert shapes_scores.compare(shapes_scores.caption_objects("a large red circle"), scene) == {
        "objects_right": False, "any_object_right": False, "colors_right": True,
        "classes_right": False}
    assert shapes_scores.caption_objects("a red star and a red star") == [("star", "red")] * 2
    assert not shapes_scores.compare([("star", "red")] * 2, scene)["objects_right"]
    assert shapes_scores.compare([("star", "red"), ("circle", "blue")], scene)[
        "any_object_right"]


def test_task_metrics_are_one_on_the_truth_and_catch_each_mistake():
    scenes = [shapes.sample_scene(np.random.default_rng(i), 64, min_objects=2)
              for i in range(12)]
    images = np.stack([shapes.render(s) for s in scenes])
    metrics = shapes_scores.text_to_image_metrics(images, scenes)
    assert set(metrics.values()) == {1.0} and "position_right" in metrics
    # Swap two objects' places (a mirrored render): classes and colors stay right,
    # positions and boxes do not.
    two = next(s for s in scenes if len(s.shapes) == 2
               and abs(s.shapes[0].center[0] - s.shapes[1].center[0]) > 4)
    mirrored = shapes.render(two)[:, ::-1].copy()
    row = shapes_scores.text_to_image_metrics(mirrored[None], [two])
    assert row["objects_right"] == 1.0 and row["count_right"] == 1.0
    assert row["position_right"] == 0.0 and row["box_iou"] < 1.0 and row["placed_right"] == 0.0
    # An edit graded against the edited scene: the unedited source fails it.
    edited, _ = shapes_language.recolor(two, 0, "white" if two.shapes[0].color != "white"
                                      else "black")
    assert shapes_scores.edit_metrics(shapes.render(edited)[None], [edited])["edit_right"] == 1.0
    assert shapes_scores.edit_metrics(shapes.render(two)[None], [edited])["edit_right"] == 0.0


def test_positions_are_what_the_position_caption_says_graded_apart_from_class():
    rng = np.random.default_rng(0)
    images = np.stack([shapes.render(s) for s in SCENES])
    assert shapes_scores.position_metrics(images, SCENES) == {"position_right": 1.0,
                                                              "scenes": 30.0}
    # The regions and relations are the words of the caption that names positions.
    one = shapes.Scene(32, SCENES[0].background,
                       (shapes.make_shape("star", "red", "small", 2, 2, 9),))
    assert shapes_language.captions(one, rng)[2].endswith("in the top left corner of the image")
    assert shapes_scores.scene_positions(one) == ((0, 0),)
    # The same place in another class is right (position apart from class); another
    # corner, or a missing color, is wrong.
    circle = shapes.Scene(32, one.background,
                          (shapes.make_shape("circle", "red", "small", 2, 2, 9),))
    moved = shapes.Scene(32, one.background,
                         (shapes.make_shape("star", "red", "small", 21, 21, 9),))
    blue = shapes.Scene(32, one.background,
                        (shapes.make_shape("star", "blue", "small", 2, 2, 9),))
    drawn = np.stack([shapes.render(s) for s in (circle, moved, blue)])
    assert shapes_scores.position_metrics(drawn[:1], [one])["position_right"] == 1.0
    assert shapes_scores.position_metrics(drawn[1:], [one, one])["position_right"] == 0.0
    # Guessing another scene's positions: the images are not looked at.
    guessed = shapes_scores.position_metrics(None, [one, moved], guesses=[moved, one])
    assert guessed == {"position_right": 0.0, "scenes": 2.0}
    assert shapes_scores.position_metrics(None, [one], guesses=[circle])["position_right"] == 1.0


def test_class_metrics_say_which_shapes_are_drawn_and_what_instead():
    background = SCENES[0].background
    star = shapes.Scene(32, background, (shapes.make_shape("star", "red", "large", 4, 4, 20),))
    circle = shapes.Scene(32, background, (shapes.make_shape("circle", "red", "large", 4, 4, 20),))
    square = shapes.Scene(32, background,
                          (shapes.make_shape("square", "blue", "small", 2, 2, 9),))
    # Asked for a star twice and a square once; drawn: a star, a circle instead of the
    # second star, the square right.
    by_class = shapes_scores.class_metrics(
        np.stack([shapes.render(s) for s in (star, circle, square)]), [star, star, square])
    assert by_class["star"] == {"asked": 2.0, "drawn_right": 0.5, "drawn_share": 1 / 3}
    assert by_class["square"] == {"asked": 1.0, "drawn_right": 1.0, "drawn_share": 1 / 3}
    assert by_class["circle"] == {"asked": 0.0, "drawn_share": 1 / 3}
    assert set(by_class) == set(shapes.KINDS)
    # On the true renders every asked shape is drawn right.
    truth = shapes_scores.class_metrics(np.stack([shapes.render(s) for s in SCENES]), SCENES)
    assert {row["drawn_right"] for row in truth.values() if row["asked"]} == {1.0}
    assert sum(row["asked"] for row in truth.values()) == sum(len(s.shapes) for s in SCENES)
    with pytest.raises(ValueError, match="2 images for 3 scenes"):
        shapes_scores.class_metrics(np.zeros((2, 32, 32, 3), np.uint8), SCENES[:3])


def test_swapped_captions_change_one_introduced_object_at_a_time():
    caption = "a small Red circle above a blue square; the red circle is large"
    classes = shapes_language.swapped_captions(caption, "class")
    assert classes[0] == caption and len(classes) == 1 + 2 * (len(shapes.KINDS) - 1)
    assert len(set(classes)) == len(classes)
    assert "a small Red star above a blue square; the red circle is large" in classes
    assert "a small Red circle above a blue star; the red circle is large" in classes
    # The later mention keeps its words; one object changes per alternative.
    assert all(c.endswith("the red circle is large") for c in classes)
    colors = shapes_language.swapped_captions(caption, "color")
    assert len(colors) == 1 + 2 * (len(shapes.COLORS) - 1)
    assert "a small green circle above a blue square; the red circle is large" in colors
    assert all(shapes_scores.caption_objects(c) != shapes_scores.caption_objects(caption)
               for c in colors[1:])
    assert shapes_language.swapped_captions("a plain gray background", "class") == [
        "a plain gray background"]
    with pytest.raises(ValueError, match="what='size'"):
        shapes_language.swapped_captions(caption, "size")


def test_renamed_classes_rename_every_mention_and_nothing_else():
    caption = "a small Red circle above a blue square; the red circle is large"
    rename = {"circle": "square", "square": "circle", "star": "circle"}
    assert shapes_scores.renamed_classes(caption, rename) == (
        "a small Red square above a blue circle; the red square is large")
    assert shapes_scores.renamed_classes("a plain gray background", rename) == (
        "a plain gray background")
    assert shapes_scores.renamed_classes("an orange hexagon", rename) == "an orange hexagon"
    with pytest.raises(ValueError, match=r"\['blob'\] are not classes"):
        shapes_scores.renamed_classes(caption, {"circle": "blob"})


def test_caption_precision_recall_and_vqa_exact_match():
    star = shapes.make_shape("star", "red", "large", 4, 4, 14)
    circle = shapes.make_shape("circle", "blue", "small", 20, 20, 8)
    scene = shapes.Scene(32, SCENES[0].background, (star, circle))
    # Names the red star and a green square: precision 1/2, recall 1/2.
    got = shapes_scores.caption_metrics(["a red star and a green square"], [scene])
    assert got["object_precision"] == 0.5 and got["object_recall"] == 0.5
    assert got["objects_right"] == 0.0
    assert shapes_scores.vqa_exact_match(["Two.", "yes", "red"], ["two", "no", "red"]) == \
        2 / 3


def test_every_corpus_question_has_one_type_and_scores_by_type():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(np.random.default_rng(i), 64) for i in range(30)]
    pairs = [p for s in scenes for p in shapes_language.vqa_pairs(s, rng)]
    kinds = [shapes_language.vqa_question_type(q) for q, _ in pairs]
    assert set(kinds) == set(shapes_language.VQA_TYPES)  # 30 scenes at 64 px ask every kind
    # A model that answers only the color questions right.
    questions, truths = [q for q, _ in pairs], [a for _, a in pairs]
    answers = [a if k == "color" else "no idea" for a, k in zip(truths, kinds)]
    got = shapes_scores.vqa_exact_match_by_type(questions, answers, truths)
    assert got["vqa_exact_match/color"] == 1.0
    assert {got[f"vqa_exact_match/{k}"] for k in shapes_language.VQA_TYPES if k != "color"} == {0.0}
    assert sum(got[f"vqa_questions/{k}"] for k in shapes_language.VQA_TYPES) == len(pairs)
    assert got["vqa_questions/count"] == len(scenes)  # one count question per scene
    with pytest.raises(ValueError, match="not a question vqa_pairs asks"):
        shapes_language.vqa_question_type("Why is the sky blue?")
    with pytest.raises(ValueError, match="one of each per question"):
        shapes_scores.vqa_exact_match_by_type(questions[:2], answers[:1], truths[:2])


def _twins(scene: shapes.Scene) -> shapes.Scene:
    """`scene` with every shape in the first one's class and color, at its own place:
    the captions must tell them apart ("the left red circle", "the bottom red circle")."""
    first = scene.shapes[0]
    return shapes.Scene(scene.image_size, scene.background, tuple(
        shapes.make_shape(first.kind, first.color, s.size, s.x, s.y, s.side)
        for s in scene.shapes))


def test_every_true_caption_scores_one_when_shapes_share_class_and_color():
    from cm3leon_jax.data import sft_examples
    from cm3leon_jax.evaluation import sft_families
    sampled = [shapes.sample_scene(np.random.default_rng(i), 64, min_objects=2)
               for i in range(60)]
    scenes = SCENES + sampled + [_twins(s) for s in sampled]
    # refer() writes every rank word for some of these scenes.
    ranks = {shapes_language.refer(s, i).split()[1] for s in scenes for i in range(len(s.shapes))}
    assert set(shapes_language._RANKS) <= ranks
    rng = np.random.default_rng(0)
    captions = [[*shapes_language.captions(s, rng), sft_examples.long_caption(s)] for s in scenes]
    for i in range(5):
        got = shapes_scores.caption_metrics([c[i] for c in captions], scenes)
        assert set(got.values()) == {1.0}, (i, got)
    assert shapes_scores.caption_objects("a red circle; the bottom large red circle is "
                                         "below the top red circle") == [("circle", "red")]
    # The SFT families that grade captions, on the corpus' own examples.
    for family in ("caption", "long_caption"):
        for index in range(80):
            example = sft_examples.corpus_example(0, "test", index, 64, family)
            assert sft_families.score_text(family, example.output, example)["exact"] == 1.0


def test_vqa_exact_match_refuses_a_string_for_a_list():
    from cm3leon_jax.errors import UserInputError
    with pytest.raises(UserInputError, match="takes lists of answers"):
        shapes_scores.vqa_exact_match("red", "rad")  # Was 2/3: letter by letter.
    assert shapes_scores.vqa_exact_match(["Two."], ["2"]) == 1.0
