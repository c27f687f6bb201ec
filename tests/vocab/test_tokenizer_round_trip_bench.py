"""benchmarks/image_tokenizer.py demo_recipe: the round trip's exact scores, by object size."""

import numpy as np

from benchmarks import image_tokenizer as bench
from cm3leon_jax.data import shapes
from cm3leon_jax.data.synthetic import synthetic_example


class _Reconstructs:
    """A stand-in tokenizer whose round trip returns the image, or a plain gray one."""

    def __init__(self, keep: bool):
        self.keep = keep

    def reconstruct(self, images):
        return images if self.keep else np.full_like(images, 128)


def test_a_perfect_round_trip_scores_every_size_right_and_a_blank_one_none():
    scenes = [synthetic_example("validation", i, 32).scene for i in range(200, 260)]
    perfect = bench.round_trip_scores(_Reconstructs(True), scenes)
    blank = bench.round_trip_scores(_Reconstructs(False), scenes)
    sizes = {s.size for scene in scenes for s in scene.shapes}
    assert sizes == set(shapes.SIZES)  # 60 scenes hold every size
    assert perfect["objects_right"] == perfect["any_object_right"] == 1.0
    assert all(perfect[f"{size}_right"] == 1.0 for size in shapes.SIZES)
    assert perfect["psnr"] > 90  # identical images: the 1e-10 floor of the MSE
    assert blank["objects_right"] == blank["any_object_right"] == 0.0
    assert all(blank[f"{size}_right"] == 0.0 for size in shapes.SIZES)
