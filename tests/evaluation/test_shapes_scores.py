"""Exact scores of generations: the truth scores 1, a wrong class or colour does not."""

import numpy as np

from cm3leon_jax.data import shapes, shapes_tasks
from cm3leon_jax.evaluation import shapes_scores

SCENES = [shapes.sample_scene(np.random.default_rng(i), 32) for i in range(30)]


def test_true_renders_and_every_caption_phrasing_score_one():
    images = np.stack([shapes.render(s) for s in SCENES])
    assert set(shapes_scores.image_scores(images, SCENES).values()) == {1.0}
    rng = np.random.default_rng(0)
    phrasings = [shapes_tasks.captions(s, rng) for s in SCENES]
    for i in range(4):  # "the <anchor>" in the relation phrasing is not counted twice
        assert set(shapes_scores.caption_scores([p[i] for p in phrasings],
                                                SCENES).values()) == {1.0}


def test_wrong_class_or_colour_is_caught():
    star = shapes.make_shape("star", "red", "large", 4, 4, 14)
    scene = shapes.Scene(32, SCENES[0].background, (star,))
    assert shapes_scores.compare(shapes_scores.caption_objects("a large red circle"), scene) == {
        "objects_right": False, "any_object_right": False, "colours_right": True,
        "classes_right": False}
    assert shapes_scores.caption_objects("a red star and a red star") == [("star", "red")] * 2
    assert not shapes_scores.compare([("star", "red")] * 2, scene)["objects_right"]
    assert shapes_scores.compare([("star", "red"), ("circle", "blue")], scene)[
        "any_object_right"]
