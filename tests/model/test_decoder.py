"""The decoder's behavior: shapes, packing isolation, the KV cache, initialization, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testlib import forward, packed_batch, random_params, tiny_chameleon, tiny_config

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import attention
from cm3leon_jax.model.decoder import Decoder, init_cache

VARIANTS = {
    "cm3leon": tiny_config(),
    "chameleon": tiny_chameleon(),
    "chameleon_swin": tiny_chameleon(block_order="swin"),
    # Image codes 200..499 on a 2 x 2 grid, sentinels 5..39: random ids hold all three.
    "cm3leon_image_places": tiny_config(image_grid=2, image_code_ids=(200, 500),
                                        sentinel_ids=(5, 40)),
    "cm3leon_image_next_place": tiny_config(image_grid=2, image_next_place=True,
                                            image_code_ids=(200, 500), sentinel_ids=(5, 40)),
}


def _alone(tokens, seg):
    """Each segment of a packed batch as its own row, left-aligned (positions 0..n-1)."""
    rows, where = [], []
    for b in range(tokens.shape[0]):
        for s in range(1, int(seg[b].max()) + 1):
            idx = np.flatnonzero(np.asarray(seg[b]) == s)
            row = np.zeros(tokens.shape[1], np.int32)
            row[:len(idx)] = np.asarray(tokens[b, idx])
            rows.append(row)
            where.append((b, idx))
    return jnp.asarray(np.stack(rows)), where


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_segments_never_attend_across(name):
    """Logits of a packed row equal those of each segment run alone, at the same positions.

    The "alone" rows are padded on the right only, which a causal model cannot see.
    """
    config = VARIANTS[name]
    fwd, params = forward(config), random_params(config)
    batch = packed_batch(2, 48, config.vocab_size, seed=1)
    tokens, seg, pos = (batch[k] for k in ("decoder_input_tokens", "decoder_segment_ids",
                                           "decoder_positions"))
    packed = fwd(params, tokens, seg, pos)
    rows, where = _alone(tokens, seg)
    alone = fwd(params, rows)
    for r, (b, idx) in enumerate(where):
        np.testing.assert_allclose(packed[b, idx], alone[r, :len(idx)], atol=1e-5, rtol=1e-5)


def test_changing_one_segment_leaves_the_others_unchanged():
    config = VARIANTS["chameleon"]
    fwd, params = forward(config), random_params(config)
    batch = packed_batch(1, 40, config.vocab_size, seed=2)
    tokens, seg, pos = (batch[k] for k in ("decoder_input_tokens", "decoder_segment_ids",
                                           "decoder_positions"))
    other = jnp.where(seg == 2, (tokens + 7) % config.vocab_size, tokens)
    a, b = fwd(params, tokens, seg, pos), fwd(params, other, seg, pos)
    keep = np.asarray(seg != 2)
    np.testing.assert_array_equal(np.asarray(a)[keep], np.asarray(b)[keep])
    assert not np.allclose(np.asarray(a)[~keep], np.asarray(b)[~keep])  # The test can fail.


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kv_cache_decoding_matches_full_forward(name):
    """Prefill a prompt, then feed one token at a time: logits equal the full pass (f32)."""
    config = VARIANTS[name]
    model, params = Decoder(config), random_params(config)
    batch, length, prompt, max_len = 2, 12, 5, 16
    tokens = jax.random.randint(jax.random.key(3), (batch, length), 1, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    full = forward(config)(params, tokens)

    step = jax.jit(lambda p, c, t, pos: model.apply({"params": p, "cache": c}, t, None, pos,
                                                    decode=True, mutable=["cache"]))
    cache = init_cache(model, batch, max_len)
    logits, new = step(params, cache, tokens[:, :prompt], positions[:, :prompt])
    got = [logits]
    for i in range(prompt, length):
        logits, new = step(params, new["cache"], tokens[:, i:i + 1], positions[:, i:i + 1])
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    print(
        f"{name}: KV-cache decoding vs full forward, max abs error {np.abs(got - full).max():.1e}"
    )
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)
    assert int(new["cache"]["layers"]["attention"]["cache_index"][0]) == length


def test_kv_cache_with_left_padded_prompts():
    """Rows with shorter prompts are left-padded with segment 0; padding is never attended."""
    config = VARIANTS["chameleon"]
    model, params = Decoder(config), random_params(config)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, config.vocab_size, n) for n in (6, 3)]
    width = 6
    tokens = np.zeros((2, width), np.int32)
    seg = np.zeros((2, width), np.int32)
    pos = np.zeros((2, width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):], seg[b, width - len(p):] = p, 1
        pos[b, width - len(p):] = np.arange(len(p))
    decode = jax.jit(lambda c, t, s, p: model.apply({"params": params, "cache": c}, t, s, p,
                                                     decode=True, mutable=["cache"]))
    logits, new = decode(init_cache(model, 2, 10), tokens, seg, pos)
    nxt = np.array([[5], [9]], np.int32)
    step, _ = decode(new["cache"], nxt, np.ones((2, 1), np.int32), np.array([[6], [3]], np.int32))
    alone = np.zeros((2, width + 1), np.int32)  # Right-padded: invisible to a causal model.
    for b, p in enumerate(prompts):
        alone[b, :len(p) + 1] = np.concatenate([p, nxt[b]])
    alone = forward(config)(params, jnp.asarray(alone))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, width - len(p):], alone[b, :len(p)], atol=1e-5)
        np.testing.assert_allclose(step[b, 0], alone[b, len(p)], atol=1e-5)


def test_init_follows_the_paper():
    """Truncated normal std 0.006 (3 std), positions std 0.0002, zero output layers,
    no biases, parameter-free LayerNorm."""
    config = tiny_config(d_model=256, num_heads=4, mlp_dim=1024, vocab_size=4096)
    init = jax.jit(lambda: Decoder(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    params = nn.unbox(init())["params"]
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any("bias" in k or "scale" in k for k in flat), sorted(flat)
    # Untruncated std s, cut at 3s: std 0.9865 s.
    for name in ("['token_embed']['embedding']", "['layers']['mlp']['wi']['kernel']",
                 "['layers']['attention']['query']['kernel']"):
        w = flat[name]
        assert abs(w.std() / (0.006 * 0.9865) - 1) < 0.02, (name, w.std())
        assert np.abs(w).max() <= 3 * 0.006 + 1e-9
    pos = flat["['position_embed']['embedding']"]
    assert abs(pos.std() / (0.0002 * 0.9865) - 1) < 0.02
    assert not flat["['layers']['attention']['out']['kernel']"].any()
    assert not flat["['layers']['mlp']['wo']['kernel']"].any()


def test_remat_and_dtype_switches_keep_the_function():
    config = VARIANTS["chameleon"]
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 1, config.vocab_size)
    params = random_params(config)
    loss = lambda c: jax.value_and_grad(
            lambda p: jnp.mean(Decoder(c).apply({"params": p}, tokens) ** 2))
    base, base_grad = jax.jit(loss(config))(params)
    other, grad = jax.jit(loss(config.replace(remat_policy="dots_no_batch")))(params)
    np.testing.assert_allclose(other, base, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, base_grad)
    low = forward(config.replace(dtype="bfloat16"))(params, tokens)
    assert low.dtype == jnp.float32  # Logits leave in f32 whatever the compute dtype.
    np.testing.assert_allclose(jnp.mean(low ** 2), base, rtol=0.05)


def test_registered_kernel_is_used():
    """The seam: a kernel registered by name replaces the built-in one."""
    calls = []

    def counting_kernel(q, k, v, q_seg, kv_seg, offset):
        calls.append(q.shape)
        return attention.KERNELS["xla"](q, k, v, q_seg, kv_seg, offset)

    attention.register_kernel("counting", counting_kernel)
    config = tiny_config(attention_impl="counting")
    tokens = jnp.ones((1, 8), jnp.int32)
    params = random_params(config)
    a = Decoder(config).apply({"params": params}, tokens)
    b = Decoder(tiny_config()).apply({"params": params}, tokens)
    assert (1, 8, 4, 16) in calls
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not a registered attention kernel"):
        Decoder(tiny_config(attention_impl="nope")).apply({"params": params}, tokens)


def test_clear_errors():
    config = tiny_config()
    model, params = Decoder(config), random_params(config)
    with pytest.raises(ValueError, match="segment_ids shape"):
        model.apply({"params": params}, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="max_length"):
        model.apply({"params": params}, jnp.ones((1, config.max_length + 1), jnp.int32))
    with pytest.raises(ValueError, match="needs explicit positions"):
        model.apply({"params": params, "cache": init_cache(model, 1, 8)},
                    jnp.ones((1, 2), jnp.int32), decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config(num_kv_heads=3)
    with pytest.raises(ValueError, match="norm="):
        tiny_config(norm="batchnorm")
    with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
        tiny_config(loss_chunk=-1)
    with pytest.raises(ValueError, match="loss_impl='tpu'; choose one of"):
        tiny_config(loss_impl="tpu")
    for bad, match in [({"num_kv_heads": 0}, "num_kv_heads must be >= 1"),
                       ({"num_kv_heads": -2}, "num_kv_heads must be >= 1"),
                       ({"head_dim": 0}, "head_dim must be >= 1"),
                       ({"image_code_ids": (10, 14, 20)}, "image_code_ids must be a"),
                       ({"norm_eps": -1.0}, "norm_eps=-1.0"),
                       ({"position_embedding": "rope", "rope_theta": 0.0}, "rope_theta=0.0")]:
        with pytest.raises(UserInputError, match=match):  # Were NaN or a late traceback.
            tiny_config(**bad)
