"""CLIP score = 100 * max(cos, 0), with a small random retrieval encoder saved and reloaded."""

import numpy as np
import pytest

from cm3leon_jax.evaluation.clip_score import ClipScorer
from cm3leon_jax.retrieval import clip, clip_tokenizer
from cm3leon_jax.retrieval.encoder import DocumentEncoder

CAPTIONS = ["a red circle", "a blue star above a green square", "two yellow triangles",
            "a purple square"]


@pytest.fixture(scope="module")
def encoder():
    cfg = clip.clip_config("tiny")
    return DocumentEncoder(cfg, clip.init_params(cfg, 0), clip_tokenizer.WordTokenizer(4096))


def test_scores_are_clipped_scaled_cosines(encoder, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    scorer = ClipScorer(encoder)
    got = scorer.scores(images, CAPTIONS)
    image_v, text_v = encoder.embed_images(list(images)), encoder.embed_texts(CAPTIONS)
    cos = np.array([float(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)
                    for a, b in zip(image_v, text_v)])
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-4)
    assert got.shape == (4,) and (got >= 0).all() and (got <= 100).all()
    assert scorer.score(images, CAPTIONS) == pytest.approx(got.mean())
    encoder.save(str(tmp_path))  # The HF layout the importer reads (OpenAI CLIP's too).
    np.testing.assert_allclose(ClipScorer.load(str(tmp_path)).scores(images, CAPTIONS), got,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="one caption per image: 4 images, 3 captions"):
        scorer.scores(images, CAPTIONS[:3])
