"""The sampling loop: KV-cache decoding matches full forward passes, rows are independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import sampler
from cm3leon_jax.decode.sampler import left_pad, sample
from cm3leon_jax.model.decode_step import DecoderStep
from cm3leon_jax.vocab.layout import PAD_ID, IdLayout
from tests.model.model_testlib import forward, random_params, tiny_chameleon, tiny_config

CONFIG = tiny_config()
PARAMS = random_params(CONFIG)
PROMPTS = [np.random.default_rng(i).integers(5, 500, n) for i, n in enumerate((7, 3, 5))]
WARP = (proc.Temperature(1.0), proc.TopK(40))
LAYOUT = IdLayout(text_size=290, image_codes=64, num_sentinels=8, image_length=16)


class NextIdStub:
    """A `tokens_to_logits` model whose next token is known: last token + params (mod 64).

    The cache counts the calls, so the test also sees that it is threaded through.
    """

    vocab = 64

    def init_cache(self, rows, length):
        return jnp.zeros([rows], jnp.int32)

    def __call__(self, params, cache, tokens, segment_ids, positions):
        following = (tokens[:, -1] + params) % self.vocab
        return 10.0 * jax.nn.one_hot(following, self.vocab), cache + 1


STUB = NextIdStub()


def test_a_stub_model_plugs_in_and_its_tokens_come_out():
    prompts = left_pad([[5, 6], [60]])
    out = sample(STUB, jnp.int32(1), prompts, jax.random.key(0), max_new_tokens=6,
                 greedy=True, stop=proc.StopOnTokens((9,)))
    np.testing.assert_array_equal(out.tokens, [[7, 8, 9, 0, 0, 0], [61, 62, 63, 0, 1, 2]])
    np.testing.assert_array_equal(out.lengths, [3, 6])
    np.testing.assert_array_equal(out.finished, [True, False])


def test_stub_guidance_follows_the_conditional_stream_at_scale_one():
    prompts = left_pad([[5], [20], [40], [40]])  # Two conditional rows, then two unconditional.
    out = sample(STUB, jnp.int32(2), prompts, jax.random.key(0), max_new_tokens=3,
                 greedy=True, num_streams=2, processors=(proc.ClassifierFreeGuidance(1.0),))
    np.testing.assert_array_equal(out.tokens, [[7, 9, 11], [22, 24, 26]])


def _greedy_by_full_forward(config, params, prompt, steps, width=32):
    """Greedy decoding with no cache: the whole sequence again at every step.

    Rows are right-padded to a fixed width (invisible to a causal model): one compilation.
    """
    seq = list(prompt)
    for _ in range(steps):
        row = np.zeros((1, width), np.int32)
        row[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(forward(config)(params, jnp.asarray(row))[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", ["cm3leon", "chameleon"])
def test_greedy_with_kv_cache_equals_repeated_full_forward(variant):
    config = tiny_config() if variant == "cm3leon" else tiny_chameleon()
    params = random_params(config, seed=1)
    out = sample(config, params, left_pad(PROMPTS), jax.random.key(0), max_new_tokens=8,
                 greedy=True)
    for row, prompt in enumerate(PROMPTS):
        want = _greedy_by_full_forward(config, params, prompt, 8)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), want)
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])
    assert not np.asarray(out.finished).any()  # No stop rule: every row ran out of steps.


def test_left_padded_rows_equal_the_same_prompts_alone():
    """Sampled, not greedy: each row keeps its own random stream, whatever its batch."""
    batch = sample(CONFIG, PARAMS, left_pad(PROMPTS, length=12), jax.random.key(3),
                   max_new_tokens=8, processors=WARP)
    for row, prompt in enumerate(PROMPTS):
        alone = sample(CONFIG, PARAMS, left_pad([prompt], length=7), jax.random.key(3),
                       max_new_tokens=8, processors=WARP, row_ids=[row])
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])


def test_same_key_same_tokens_other_key_other_tokens():
    run = lambda key: np.asarray(sample(CONFIG, PARAMS, left_pad(PROMPTS), key,
                                        max_new_tokens=8, processors=WARP).tokens)
    np.testing.assert_array_equal(run(jax.random.key(5)), run(jax.random.key(5)))
    assert (run(jax.random.key(5)) != run(jax.random.key(6))).any()


def test_draw_follows_the_softmax_and_never_picks_an_excluded_token():
    scores = jnp.asarray([[0.0, 1.0, 2.0, -jnp.inf, 0.5, -jnp.inf],
                          [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, 3.0]])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), (n, 2))
    tokens = np.asarray(jax.jit(jax.vmap(sampler.draw, (0, None)))(keys, scores))
    want = np.asarray(jax.nn.softmax(scores, axis=-1))
    for row in range(2):
        freq = np.bincount(tokens[:, row], minlength=6) / n
        # 5 standard errors of a frequency: a wrong law (e.g. an off-by-one token) fails.
        np.testing.assert_allclose(freq, want[row], atol=5 * np.sqrt(0.25 / n))
        assert freq[want[row] == 0].sum() == 0


def test_each_row_stops_at_its_own_stop_token():
    free = np.asarray(sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(0),
                             max_new_tokens=8, greedy=True).tokens)
    stop_id = int(free[0, 3])
    out = sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(0), max_new_tokens=8,
                 greedy=True, stop=proc.StopOnTokens((stop_id,)))
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == stop_id)
        n = int(hits[0]) + 1 if hits.size else 8
        assert int(out.lengths[row]) == n and bool(out.finished[row]) == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])
        assert (np.asarray(out.tokens[row, n:]) == PAD_ID).all()


@pytest.mark.parametrize("scale,stream", [(1.0, 0), (0.0, 1)])
def test_cfg_scale_one_is_the_conditional_stream_and_zero_the_unconditional(scale, stream):
    cond, uncond = PROMPTS, [np.array([7, 2]), np.array([9, 2, 3, 4]), np.array([7, 2])]
    guided = sample(CONFIG, PARAMS, left_pad(cond + uncond), jax.random.key(0),
                    max_new_tokens=8, processors=(proc.ClassifierFreeGuidance(scale),),
                    greedy=True, num_streams=2)
    alone = sample(CONFIG, PARAMS, left_pad([cond, uncond][stream], length=7),
                   jax.random.key(0), max_new_tokens=8, greedy=True)
    np.testing.assert_array_equal(guided.tokens, alone.tokens)


def test_two_streams_without_guidance_are_refused():
    with pytest.raises(ValueError, match="no guidance processor"):
        sample(CONFIG, PARAMS, left_pad(PROMPTS[:2]), jax.random.key(0), max_new_tokens=2,
               num_streams=2)


def test_image_constraint_writes_exactly_image_length_codes_then_stops():
    constraint = proc.ImageCodesOnly(LAYOUT)
    out = sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(1), max_new_tokens=20,
                 processors=(constraint, *WARP), stop=constraint)
    tokens = np.asarray(out.tokens)
    assert LAYOUT.is_image(tokens[:, :16]).all() and (tokens[:, 16:] == PAD_ID).all()
    np.testing.assert_array_equal(out.lengths, [16, 16, 16])
    assert np.asarray(out.finished).all()


def test_a_buffer_shorter_than_an_exact_length_constraint_is_refused():
    """An image constraint's rows are right only at their full length: a buffer of fewer
    tokens returned every image cut short, unfinished, without a word."""
    for constraint in (proc.ImageCodesOnly(LAYOUT), proc.ImageSpan(LAYOUT, 8)):
        with pytest.raises(ValueError, match=f"max_new_tokens=4 is fewer than the "
                           f"{constraint.max_new_tokens} tokens {type(constraint).__name__}"):
            sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(1), max_new_tokens=4,
                   processors=(constraint,), stop=constraint)
    text = proc.TextOnly(LAYOUT, max_tokens=8)  # A cap, not a length: a shorter buffer is fine.
    out = sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(1), max_new_tokens=4,
                 processors=(text,), stop=text)
    assert np.asarray(out.tokens).shape == (3, 4)
    with pytest.raises(ValueError, match="max_new_tokens=2.5: give a whole number >= 1"):
        sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(1), max_new_tokens=2.5)


def test_bad_prompts_are_refused_with_the_fix():
    right_padded = np.array([[5, 6, 0], [5, 6, 7]], np.int32)
    with pytest.raises(ValueError, match="row 0 is not left-padded"):
        sample(CONFIG, PARAMS, right_padded, jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="DecoderConfig.max_length=128"):
        sample(CONFIG, PARAMS, left_pad(PROMPTS), jax.random.key(0), max_new_tokens=125)
    with pytest.raises(ValueError, match="outside"):
        sample(CONFIG, PARAMS, np.array([[600]]), jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="holds <pad>"):
        left_pad([[5, 0, 6]])


def test_one_compilation_per_prompt_bucket_whatever_the_prompts_and_numbers():
    """Other prompts (contents, padding) of the bucket's length, other top-p and CFG
    numbers: the loop compiled for the first call serves the second."""
    compiled = sampler._compiled(DecoderStep(CONFIG), False, 2, 5)
    sizes = []
    for scale, p, prompts in ((3.0, 0.9, PROMPTS), (1.5, 0.4, [[9, 8], [7], [6, 5, 4]])):
        sample(CONFIG, PARAMS, left_pad(prompts + prompts[::-1], length=8), jax.random.key(0),
               max_new_tokens=5, num_streams=2,
               processors=(proc.ClassifierFreeGuidance(scale), proc.TopP(p)))
        sizes.append(compiled._cache_size())
    assert sizes[1] == sizes[0] >= 1


def test_the_cache_is_written_in_place_not_copied_per_step():
    """The KV cache lives in the loop's carry; were a step to copy it, the program would
    hold two caches. Rows and length chosen so the cache dwarfs the tiny weights."""
    rows, prompt, new = 32, 8, 100
    prompts = jnp.full((rows, prompt), 7, jnp.int32)
    fn = sampler._compiled(DecoderStep(CONFIG), False, 1, new)
    memory = fn.lower(PARAMS, prompts, jax.random.key(0), jnp.arange(rows, dtype=jnp.uint32),
                      (proc.TopP(0.9),), None).compile().memory_analysis()
    cache = 2 * CONFIG.num_layers * rows * (prompt + new) * CONFIG.d_model * 4
    weights = sum(x.nbytes for x in jax.tree.leaves(PARAMS))
    assert cache < memory.temp_size_in_bytes < 1.5 * cache + 2 * weights


class CountingStep:
    """`DecoderStep` that records how many rows each cache it makes holds."""

    def __init__(self, step):
        self.step, self.cache_rows = step, []

    def init_cache(self, rows, length):
        self.cache_rows.append(rows)
        return self.step.init_cache(rows, length)

    def __call__(self, *args):
        return self.step(*args)

    def prepare(self, params):
        return self.step.prepare(params)

    def select_rows(self, cache, rows):
        return self.step.select_rows(cache, rows)


@pytest.mark.parametrize("config", [CONFIG, tiny_config(image_grid=2, image_code_ids=(200, 500),
                                                        sentinel_ids=(5, 40))],
                         ids=["plain", "image_places"])
def test_rows_that_share_a_prompt_share_its_prefill(config):
    """Best of 4 with CFG, the unconditional stream one prompt for every row: 4 distinct
    prompts of 24 rows are prefilled, and every row samples what its own prefill gives."""
    params = random_params(config)
    cond = [p for p in PROMPTS for _ in range(4)]
    prompts = left_pad(cond + [[7, 3]] * len(cond))
    kwargs = dict(max_new_tokens=6, num_streams=2,
                  processors=(proc.ClassifierFreeGuidance(3.0),) + WARP)
    model = CountingStep(DecoderStep(config))
    shared = sample(model, params, prompts, jax.random.key(2), **kwargs)
    assert model.cache_rows == [4]
    alone = sample(DecoderStep(config), params, prompts, jax.random.key(2),
                   share_prefill=False, **kwargs)
    np.testing.assert_array_equal(shared.tokens, alone.tokens)
    np.testing.assert_array_equal(shared.lengths, alone.lengths)
    assert len({tuple(t) for t in np.asarray(shared.tokens)[:4]}) > 1  # Samples differ.


def test_distinct_prompts_keep_their_first_order_and_pad_to_a_power_of_two():
    prompts = np.array([[0, 9], [5, 6], [0, 9], [4, 4], [5, 6], [0, 9], [5, 6], [0, 9]])
    rows, index = sampler.distinct_prompts(prompts)
    np.testing.assert_array_equal(rows, [[0, 9], [5, 6], [4, 4], [4, 4]])
    np.testing.assert_array_equal(index, [0, 1, 0, 2, 1, 0, 1, 0])
    assert sampler.distinct_prompts(prompts[:4]) is None  # 3 -> 4 rows: nothing saved.
    assert sampler.distinct_prompts(np.arange(12).reshape(6, 2)) is None
