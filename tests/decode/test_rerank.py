"""Best-of-N re-ranking: the kept sample is the ranker's arg-max; N = 1 changes nothing."""

import numpy as np
import pytest

from cm3leon_jax.decode import rerank
from cm3leon_jax.decode.generate import Generator, Images, SamplingConfig
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.vqgan import VQGANConfig
from tests.model.model_testlib import random_params, tiny_config

CONFIG = tiny_config()
PARAMS = random_params(CONFIG, seed=2)
CAPTIONS = ["a small red circle above a yellow square", "a large blue star"]
# 16 px images, 4x4 = 16 codes from a 64-entry codebook: the decode tests' vocabulary.
VQ = VQGANConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2, 2),
                 num_res_blocks=1, attn_levels=(), latent_channels=8, embed_dim=8,
                 codebook_size=64, num_groups=4)


@pytest.fixture(scope="module")
def gen(vocab):
    return Generator(CONFIG, PARAMS, vocab, ImageTokenizer.random_init(VQ, seed=0, batch_size=8))


@pytest.fixture(scope="module")
def ranker(random_clip_encoder):
    return rerank.ClipRanker(random_clip_encoder)  # the session's (shared with the eval tests)


def test_one_sample_is_the_plain_sample(gen, ranker):
    plain = gen.text_to_image(CAPTIONS, num_samples=1, num_retrieved=0)
    ranked = gen.text_to_image(CAPTIONS, num_samples=1, num_retrieved=0, ranker=ranker)
    np.testing.assert_array_equal(plain.codes, ranked.codes)
    np.testing.assert_array_equal(plain.images, ranked.images)


def test_kept_sample_is_the_arg_max_over_mixed_samplings(gen, ranker):
    samplings = (SamplingConfig(guidance="cfg"), SamplingConfig(guidance="cdk"))
    best = rerank.best_of(gen, CAPTIONS, num_samples=4, ranker=ranker, samplings=samplings,
                          num_retrieved=0, seed=3)
    assert best.scores.shape == (2, 4) and best.images.codes.shape == (2, 16)
    # Samples 0, 2 of each prompt are the CFG draws, 1, 3 the CD-K draws (each part's seed).
    cfg = gen.text_to_image(CAPTIONS, num_samples=2, num_retrieved=0, sampling=samplings[0],
                            seed=3)
    cdk = gen.text_to_image(CAPTIONS, num_samples=2, num_retrieved=0, sampling=samplings[1],
                            seed=rerank.part_seed(3, 1))
    for p in range(2):
        drawn = np.stack([cfg.images[2 * p], cdk.images[2 * p], cfg.images[2 * p + 1],
                          cdk.images[2 * p + 1]])
        want = ranker(drawn, [CAPTIONS[p]] * 4)
        np.testing.assert_allclose(best.scores[p], want, rtol=1e-5, atol=1e-4)
        assert best.kept[p] == int(np.argmax(want))
        np.testing.assert_array_equal(best.images.images[p], drawn[best.kept[p]])
    assert best.images.captions == CAPTIONS


def test_keep_best_with_any_ranker(gen):
    out = gen.text_to_image(CAPTIONS, num_samples=3, num_retrieved=0, seed=1)
    brightest = rerank.keep_best(out, 3, lambda images, _: images.reshape(len(images), -1)
                                 .mean(axis=1))
    means = out.images.reshape(2, 3, -1).mean(axis=2)
    np.testing.assert_array_equal(brightest.kept, means.argmax(axis=1))
    with pytest.raises(ValueError, match="give the Generator an image_tokenizer"):
        rerank.keep_best(out._replace(images=None), 3, lambda i, c: np.zeros(len(c)))


class SeedRecorder:
    """Stands in for a Generator: blank images, and the seed of every draw."""

    def __init__(self):
        self.seeds = []

    def text_to_image(self, captions, *, num_samples, seed, **kwargs):
        self.seeds.append(seed)
        n = len(captions) * num_samples
        return Images(np.zeros((n, 16), np.int32), np.zeros((n, 2, 2, 3), np.uint8),
                      [c for c in captions for _ in range(num_samples)])


def test_parts_of_different_seeds_draw_with_different_seeds():
    def seeds_of(seed, num_samplings):
        gen = SeedRecorder()
        rerank.best_of(gen, CAPTIONS, num_samples=6, ranker=lambda im, c: np.zeros(len(c)),
                       samplings=[None] * num_samplings, num_retrieved=0, seed=seed)
        return gen.seeds

    # One sampling draws with the seed itself, as a plain text_to_image (the demo's).
    assert [seeds_of(s, 1) for s in (0, 7)] == [[0], [7]]
    drawn = {s: seeds_of(s, 3) for s in range(8)}
    assert all(seeds[0] == s and all(0 <= x < 2 ** 32 for x in seeds)
               for s, seeds in drawn.items())
    every = [x for seeds in drawn.values() for x in seeds]
    assert len(set(every)) == len(every), drawn  # seed + part: seed s's part 1 = s + 1's 0.
    assert seeds_of(5, 3) == drawn[5]  # Deterministic.


def test_one_item_where_a_batch_belongs_is_named_not_split(gen, ranker, random_clip_encoder):
    """An image array of 3 dims went into the encoder as a batch of its rows, a string as a
    batch of its characters; a 2-D uint8 image into the Generator as image codes; an empty
    caption list into best_of as an IndexError; a NaN guidance scale as all-<pad> images."""
    from cm3leon_jax.decode import processors
    from cm3leon_jax.errors import UserInputError
    from cm3leon_jax.retrieval import neighbors

    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(UserInputError, match=r"one array of shape \(16, 16, 3\).*\[image\]"):
        random_clip_encoder.embed_images(image)
    with pytest.raises(UserInputError, match="texts is one string .*\\[text\\] for one"):
        random_clip_encoder.embed_texts("a red circle")
    with pytest.raises(UserInputError, match="captions is one string"):
        ranker.scores(image[None], "a red circle")
    with pytest.raises(UserInputError, match="one grayscale image, or image codes"):
        gen.image_to_text(np.zeros((16, 16), np.uint8), num_retrieved=0)
    with pytest.raises(UserInputError, match="non-empty list of captions"):
        rerank.best_of(gen, [], num_samples=2, ranker=ranker)
    for bad in (processors.ClassifierFreeGuidance, lambda s: processors.TwoScaleGuidance(
            text_scale=s)):
        with pytest.raises(ValueError, match="must be a finite number"):
            bad(float("nan"))
    with pytest.raises(ValueError, match="pass rows\\[i\\]"):
        neighbors.materialize(None, np.zeros((2, 3), np.int64))


def test_the_family_benchmark_passes_each_template_its_image(gen):
    """VQA's template puts the image first since 4 Dec; `sft_families.generate` took the
    second segment, the question, for the image (benchmarks/sft_families.py crashed)."""
    from cm3leon_jax.data import sft_examples
    from cm3leon_jax.evaluation import sft_families

    for family in ("vqa", "caption"):
        ex = sft_examples.corpus_example(0, "validation", 0, 32, family)  # Resized to 16.
        (out,) = sft_families.generate(gen, family, [ex], None,
                                       SamplingConfig(greedy=True, guidance="none"))
        assert isinstance(out, str)
