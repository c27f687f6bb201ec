"""The parser recovers clean renders exactly, and `match` scores what it finds."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from cm3leon_jax.data import parse, shapes


def test_split_scenes(size: int, count: int) -> list[shapes.Scene]:
    """The scenes of the `synthetic_shapes` test split (seed 0) at `size`."""
    return [shapes.sample_scene(shapes.example_rng(0, "test", i), size) for i in range(count)]


test_split_scenes.__test__ = False  # a helper, not a test


def exact_fraction(scenes: list[shapes.Scene]) -> float:
    return np.mean([parse.match(parse.parse_image(shapes.render(s)), s, exact=True)["all_correct"]
                    for s in scenes])


@pytest.mark.parametrize("size,count", [(64, 300), (256, 25), (32, 100)])
def test_clean_renders_parse_exactly(size, count):
    assert exact_fraction(test_split_scenes(size, count)) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("size,count", [(64, 3000), (256, 500)])
def test_clean_renders_parse_exactly_at_scale(size, count):
    assert exact_fraction(test_split_scenes(size, count)) >= 0.99


def test_parse_reports_sizes_and_perfect_scores_on_clean_renders():
    for scene in test_split_scenes(64, 20):
        found = parse.parse_image(shapes.render(scene))
        by_box = {o.box: o for o in found}
        for shape in scene.shapes:
            o = by_box[shape.box]
            assert (o.kind, o.color, o.side, o.size, o.score) == (
                shape.kind,
                shape.color,
                shape.side,
                shape.size,
                1.0,
            )
            assert o.area == shapes.template(shape.kind, shape.side).sum()


def test_background_hint_gives_the_same_result():
    for scene in test_split_scenes(64, 10):
        image = shapes.render(scene)
        hinted = parse.parse_image(image, background_hint=scene.background.color)
        assert hinted == parse.parse_image(image)


def test_blurred_noisy_renders_still_match_with_iou_tolerance():
    """Generated images are blurry and noisy; the IoU mode must still recognize most objects."""
    recalls = []
    for i, scene in enumerate(test_split_scenes(256, 10)):
        image = ndimage.gaussian_filter(shapes.render(scene).astype(np.float32), (1, 1, 0))
        image += np.random.default_rng(i).normal(0, 10, image.shape)
        noisy = np.clip(image, 0, 255).round().astype(np.uint8)
        found = parse.parse_image(noisy)
        recalls.append(parse.match(found, scene, iou_threshold=0.7)["recall"])
    assert np.mean(recalls) >= 0.9


def test_match_counts_missing_extra_and_wrong_objects():
    scene = next(s for s in test_split_scenes(64, 50) if len(s.shapes) == 3)
    truth = parse.parse_image(shapes.render(scene))
    perfect = parse.match(truth, scene, exact=True)
    assert (perfect["precision"], perfect["recall"], perfect["all_correct"]) == (1.0, 1.0, True)

    missing = parse.match(truth[:2], scene, exact=True)
    assert missing["precision"] == 1.0 and missing["recall"] == pytest.approx(2 / 3)

    wrong_color = [
        dataclasses.replace(truth[0], color="white" if truth[0].color != "white" else "red")
    ]
    wrong = parse.match(wrong_color + truth[1:], scene, exact=True)
    assert (
        wrong["correct"] == 2
        and wrong["paired"] == 3
        and wrong["color_accuracy"] == pytest.approx(2 / 3)
    )
    assert wrong["kind_accuracy"] == 1.0 and not wrong["all_correct"]

    extra = dataclasses.replace(truth[0], box=(0, 0, 3, 3))
    assert parse.match(truth + [extra], scene, exact=True)["precision"] == pytest.approx(3 / 4)

    x0, y0, x1, y1 = truth[0].box
    shifted = [dataclasses.replace(truth[0], box=(x0 + 1, y0, x1 + 1, y1))] + truth[1:]
    assert parse.match(shifted, scene, exact=True)["recall"] == pytest.approx(2 / 3)
    assert parse.match(shifted, scene, iou_threshold=0.5)["recall"] == 1.0


def test_match_on_empty_inputs():
    scene = test_split_scenes(64, 1)[0]
    assert parse.match([], scene)["recall"] == 0.0 and parse.match([], scene)["precision"] == 1.0


def test_box_iou():
    assert parse.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert parse.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert parse.box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0


def test_parse_rejects_bad_images_with_clear_errors():
    with pytest.raises(ValueError, match="square uint8"):
        parse.parse_image(np.zeros((64, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 pixels"):
        parse.parse_image(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="Unknown background_hint"):
        parse.parse_image(np.zeros((64, 64, 3), np.uint8), background_hint="pink")


def test_blank_background_parses_to_nothing():
    for texture in shapes.TEXTURES:
        image = shapes.render_background(shapes.Background(texture, "teal", 3, 1), 64)
        assert parse.parse_image(image) == []


def test_tiny_blobs_of_generated_images_parse_without_error():
    """A 1x4 line asks for 2-pixel stars, which render no pixel; they are skipped."""
    image = np.full((32, 32, 3), 128, np.uint8)
    image[10, 10:14] = shapes.COLORS["red"]
    found = parse.parse_image(image, min_area=1)
    assert [(o.color, o.box) for o in found] == [("red", (10, 10, 14, 11))]
