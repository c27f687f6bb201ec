"""evaluation/likelihood.py: log p(target | prompt) by one padded, batched forward pass."""

import jax
import numpy as np
import pytest

from cm3leon_jax.decode import prompts
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import likelihood
from cm3leon_jax.model.decoder import Decoder
from tests.model.model_testlib import random_params, tiny_config

CONFIG = tiny_config()


def _direct(params, prompt, target) -> float:
    """One unpadded row after the opening <eos> (as every prompt is read), summed token by
    token."""
    prompt = prompts.opened(prompt)
    tokens = np.concatenate([prompt, target]).astype(np.int32)[None]
    log_probs = jax.nn.log_softmax(Decoder(CONFIG).apply({"params": params}, tokens)[0], -1)
    return float(sum(log_probs[len(prompt) + i - 1, t] for i, t in enumerate(target)))


def test_the_batched_likelihoods_equal_each_row_scored_alone():
    params = random_params(CONFIG, seed=3)
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(3, CONFIG.vocab_size, rng.integers(1, 9)),
              rng.integers(3, CONFIG.vocab_size, rng.integers(1, 7))) for _ in range(5)]
    got = likelihood.sequence_log_likelihoods(CONFIG, params, *zip(*pairs), batch_size=2)
    want = [_direct(params, p, t) for p, t in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got.dtype == np.float32 and (got < 0).all()
    # The padding a longer neighbour forces on a row changes nothing.
    alone = likelihood.sequence_log_likelihoods(CONFIG, params, [pairs[0][0]], [pairs[0][1]])
    np.testing.assert_allclose(alone, got[:1], rtol=1e-5, atol=1e-4)


def test_token_log_probs_are_each_tokens_and_weigh_other_tokens_in_the_same_places():
    params = random_params(CONFIG, seed=5)
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(3, CONFIG.vocab_size, rng.integers(1, 9)),
              rng.integers(3, CONFIG.vocab_size, rng.integers(1, 7))) for _ in range(5)]
    others = [rng.integers(3, CONFIG.vocab_size, t.size) for _, t in pairs]
    mine, theirs = likelihood.token_log_probs(CONFIG, params, *zip(*pairs), others, batch_size=2)
    sums = likelihood.sequence_log_likelihoods(CONFIG, params, *zip(*pairs))
    np.testing.assert_allclose([m.sum() for m in mine], sums, rtol=1e-5, atol=1e-4)
    for (prompt, target), other, got in zip(pairs, others, theirs):
        prompt = prompts.opened(prompt)
        tokens = np.concatenate([prompt, target]).astype(np.int32)[None]
        log_probs = jax.nn.log_softmax(Decoder(CONFIG).apply({"params": params}, tokens)[0], -1)
        want = [log_probs[prompt.size + i - 1, o] for i, o in enumerate(other)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    same, again = likelihood.token_log_probs(CONFIG, params, *zip(*pairs))
    for a, b in zip(same, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="each of its target's length"):
        likelihood.token_log_probs(CONFIG, params, *zip(*pairs), [o[:-1] for o in others])


def test_ranked_first_compares_the_true_prompt_with_the_others():
    params = random_params(CONFIG, seed=4)
    rng = np.random.default_rng(1)
    sets = [[rng.integers(3, CONFIG.vocab_size, 4) for _ in range(n)] for n in (2, 3, 4, 3)]
    targets = [rng.integers(3, CONFIG.vocab_size, 5) for _ in sets]
    got = likelihood.ranked_first(CONFIG, params, sets, targets)
    want = []
    for candidates, target in zip(sets, targets):
        ll = [_direct(params, p, target) for p in candidates]
        want.append(ll[0] > max(ll[1:]))
    assert got.tolist() == want
    # The same prompt twice is a tie: not first.
    assert likelihood.ranked_first(CONFIG, params, [[sets[0][0]] * 2], targets[:1]).tolist() \
        == [False]


def test_bad_pairs_are_refused_with_what_to_change():
    params = random_params(CONFIG)
    one = np.array([5, 6], np.int32)
    with pytest.raises(ValueError, match="one target per prompt: 2 prompts, 1 targets"):
        likelihood.sequence_log_likelihoods(CONFIG, params, [one, one], [one])
    with pytest.raises(ValueError, match="pair 0: the target needs a token"):
        likelihood.sequence_log_likelihoods(CONFIG, params, [one], [np.array([], np.int32)])
    empty = np.array([], np.int32)
    with pytest.raises(ValueError, match="the prompt too when no opening token is given"):
        likelihood.sequence_log_likelihoods(CONFIG, params, [empty], [one], start=None)
    # An empty prompt after the opening <eos>: the target's unconditional likelihood.
    np.testing.assert_allclose(
        likelihood.sequence_log_likelihoods(CONFIG, params, [empty], [one]),
        [_direct(params, empty, one)], rtol=1e-5, atol=1e-4)
    long = np.full(CONFIG.max_length - 2, 5, np.int32)  # With the opening <eos>: one too many.
    with pytest.raises(ValueError, match="max_length"):
        likelihood.sequence_log_likelihoods(CONFIG, params, [long], [one])
    with pytest.raises(ValueError, match="at least one other"):
        likelihood.ranked_first(CONFIG, params, [[one]], [one])
    assert likelihood.sequence_log_likelihoods(CONFIG, params, [], []).shape == (0,)


@pytest.mark.parametrize("bad, match", [
    ([7, CONFIG.vocab_size], rf"target: token id {CONFIG.vocab_size} at position 1 is "
                             rf"outside the vocabulary \[0, {CONFIG.vocab_size}\)"),
    ([-1, 7], r"target: token id -1 at position 0 is outside"),
    ([7.0, 8.5], r"target: token ids must be integers, got dtype float64 \(first 7.0\)"),
])
def test_token_ids_outside_the_vocabulary_are_refused(bad, match):
    params = random_params(CONFIG)
    one = np.array([5, 6], np.int32)
    with pytest.raises(UserInputError, match="pair 1's " + match):
        likelihood.sequence_log_likelihoods(CONFIG, params, [one, one], [one, np.array(bad)])
    with pytest.raises(UserInputError, match="pair 0's prompt: token id"):
        likelihood.token_log_probs(CONFIG, params, [[5, CONFIG.vocab_size + 3]], [one])
    with pytest.raises(UserInputError, match=r"others\[0\]: token id -2 at position 1"):
        likelihood.token_log_probs(CONFIG, params, [one], [one], [np.array([3, -2])])
