"""The CPU kernels (`model/cpu_kernels.py`): the decode step's few-row products and one-query
attention (the numbers of a float64 product and of the XLA path, inside compiled loops,
through the sampler; clear refusals), and FlashAttention for training (`attention_impl =
"cpu"`: the values and gradients of the "xla" kernel)."""

import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import sampler
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import cpu_kernels
from cm3leon_jax.model.decode_step import DecoderStep
from tests.model.model_testlib import random_params, tiny_config
from tests.model.test_attention_chunked import CASES, _assert_same, _inputs, _value_and_grads


def _product(rows, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    return x, w, want


# Rows in and past the kernel's 4-row blocks; columns not a multiple of the tile's width
# (64 with AVX-512, 16 with AVX2); more than 4 rows over inputs past one 8 KiB chunk of a tile
# (128 rows of 16 float32 columns, 32 of 64) and not a multiple of it.
@pytest.mark.parametrize("rows,k,n,dtype", [
    (1, 64, 64, jnp.float32), (3, 100, 70, jnp.float32), (4, 256, 1000, jnp.float32),
    (6, 96, 130, jnp.float32), (9, 64, 192, jnp.float32), (17, 33, 65, jnp.float32),
    (9, 300, 40, jnp.float32), (6, 600, 24, jnp.bfloat16),
    (4, 128, 9216, jnp.bfloat16), (5, 64, 100, jnp.bfloat16)])
def test_matvec_is_the_product_for_any_rows_and_columns(rows, k, n, dtype):
    x, w, want = _product(rows, k, n, dtype)
    packed = cpu_kernels.pack(w, 1)
    width = cpu_kernels.tile_columns()
    assert width in (8, 16, 64) and packed.tiles.shape == (-(-n // width), k, width)
    np.testing.assert_array_equal(packed.unpack(), w)
    got = jax.jit(cpu_kernels.matvec)(x, packed)
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_pack_keeps_the_in_and_out_axes_of_a_higher_rank_kernel():
    w = jnp.arange(2 * 3 * 5 * 7, dtype=jnp.float32).reshape(2, 3, 5, 7)
    packed = cpu_kernels.pack(w, 2)
    assert (packed.in_shape, packed.out_shape) == ((2, 3), (5, 7))
    np.testing.assert_array_equal(packed.unpack(), w.reshape(6, 35))


def test_matvec_runs_inside_a_compiled_loop_with_a_carried_input():
    x, w, _ = _product(4, 64, 64, jnp.float32, seed=3)
    w = w / 8.0  # Keep the repeated product bounded.
    packed = cpu_kernels.pack(w, 1)
    loop = jax.jit(lambda x, p: jax.lax.fori_loop(0, 5, lambda i, y: cpu_kernels.matvec(y, p), x))
    want = np.asarray(x, np.float64)
    for _ in range(5):
        want = want @ np.asarray(w, np.float64)
    np.testing.assert_allclose(loop(x, packed), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_bad_inputs_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="float16.*float32 or bfloat16"):
        cpu_kernels.pack(jnp.zeros((4, 4), jnp.float16), 1)
    packed = cpu_kernels.pack(jnp.zeros((8, 64), jnp.float32), 1)
    with pytest.raises(ValueError, match=r"x \(2, 7\) against tiles of 8 inputs"):
        cpu_kernels.matvec(jnp.zeros((2, 7)), packed)
    width = cpu_kernels.tile_columns()
    other = cpu_kernels.Packed(jnp.zeros((1, 8, 2 * width), jnp.float32), (8,), (2 * width,))
    with pytest.raises(ValueError, match=f"tiles of {2 * width} columns.*reads {width}.*host"):
        cpu_kernels.matvec(jnp.zeros((2, 8)), other)


def test_without_a_compiler_the_error_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-cm3leon")
    monkeypatch.setenv("CM3LEON_JAX_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        with pytest.raises(cpu_kernels.KernelUnavailableError, match="apt install g\\+\\+") as e:
            cpu_kernels._library()
        assert isinstance(e.value, UserInputError)  # One `error:` line from main, exit 2.
    finally:
        cpu_kernels._library.cache_clear()


def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CM3LEON_JAX_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        cpu_kernels._library()
        built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_kernels._library.cache_clear()
        cpu_kernels._library()  # A second process: reuses the file.
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [stamp]
    finally:
        cpu_kernels._library.cache_clear()


# The kernels take the host's vector width (16, 8 or 4 lanes); this builds them for 4 (SSE,
# as on a host without AVX) on any x86 host and reruns the numeric tests against that build.
NARROW_TESTS = ("matvec_is_the_product or matvec_runs_inside or one_query_attention or "
                "flash_value_and_grads or flash_rows_that_see or softmax_grad_is_the or "
                "nucleus_threshold_is")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="builds an SSE-only copy of the kernels with g++ on x86")
def test_the_kernels_at_four_lanes_compute_the_same(tmp_path):
    marker = tmp_path / "built"
    wrapper = tmp_path / "g++-sse"
    wrapper.write_text(f"#!/bin/sh\ntouch {marker}\n"
                       "exec g++ \"$@\" -mno-avx -mno-avx2 -mno-fma -mno-f16c -mno-avx512f\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, CXX=str(wrapper), CM3LEON_JAX_CACHE=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", NARROW_TESTS], env=env, capture_output=True,
                          text=True, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert marker.exists() and " passed" in done.stdout


def test_the_sampler_draws_the_same_tokens_through_the_kernel():
    config = tiny_config()
    params = random_params(config, seed=2)
    prompts = sampler.left_pad([np.arange(5, 12), np.arange(40, 43)])
    runs = [sampler.sample(DecoderStep(config, cpu_kernels=on), params, prompts,
                           jax.random.key(0), max_new_tokens=12, greedy=True)
            for on in (False, True)]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)


def test_the_kernel_sampler_shares_a_prompts_prefill_and_draws_the_same_tokens():
    """Two prompts, four rows each (best of 4): the prefill of the two, gathered, feeds the
    kernel's one-query steps as a prefill of all eight would."""
    config = tiny_config()
    params = random_params(config, seed=2)
    prompts = sampler.left_pad([np.arange(5, 12)] * 4 + [np.arange(40, 43)] * 4)
    runs = [sampler.sample(DecoderStep(config, cpu_kernels=True), params, prompts,
                           jax.random.key(0), max_new_tokens=12, share_prefill=share,
                           processors=(proc.TopK(40),))
            for share in (False, True)]
    assert sampler.distinct_prompts(prompts)[0].shape[0] == 2
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)


def test_a_sharded_decoder_is_refused():
    config = tiny_config()
    step, params = DecoderStep(config, cpu_kernels=True), random_params(config)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="one CPU device, unsharded"):
        step.prepare(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 16), (8, 2, 64), (3, 1, 20)])
def test_one_query_attention_is_the_masked_softmax_of_the_xla_path(dtype, heads, kv_heads, d):
    from cm3leon_jax.model.decode_step import _one_query_attention

    rng = np.random.default_rng(heads + d)
    b, length = 4, 37
    q = jnp.asarray(rng.standard_normal((b, 1, heads, d)), dtype)
    ck, cv = (jnp.asarray(rng.standard_normal((b, kv_heads, length, d)), dtype)
              for _ in range(2))
    index = jnp.int32(30)  # Slots past it are unwritten: never seen.
    kv_seg = jnp.asarray(rng.integers(0, 3, (b, length)), jnp.int32).at[3].set(0)
    segment_ids = jnp.asarray([[1], [2], [0], [1]], jnp.int32)  # Row 3 sees no slot.
    args = (q, ck, cv, segment_ids, kv_seg, index)
    want = jax.jit(_one_query_attention, static_argnums=6)(*args, False)
    got = jax.jit(_one_query_attention, static_argnums=6)(*args, True)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


# -- attention_impl = "cpu": FlashAttention loops, forward and backward ---------------------
FLASH_CASES = dict(CASES, odd_head_dim=(2, 70, 70, 4, 2, 20, True, 0, 0),
                   longer_than_a_key_block=(1, 150, 150, 2, 2, 64, True, 0, 0),
                   # 32 + 16 columns, and rows and keys that fill no group of 4 or 16.
                   head_dim_48_odd_length=(2, 37, 37, 4, 2, 48, True, 0, 0))


@pytest.mark.parametrize("name", sorted(FLASH_CASES))
def test_flash_value_and_grads_equal_the_xla_kernel(name):
    from cm3leon_jax.model import attention

    b, t, s, n, kvh, h, segments, offset, _ = FLASH_CASES[name]
    args = _inputs(b, t, s, n, kvh, h, segments, offset)
    want = _value_and_grads(attention.KERNELS["xla"], *args, offset)
    got = _value_and_grads(attention.get_kernel("cpu"), *args, offset)
    _assert_same(got, want)
    assert float(jnp.max(jnp.abs(got[1][1]))) > 0


def test_flash_rows_that_see_nothing_get_the_mean_of_the_values():
    from cm3leon_jax.model import attention

    q, k, v, _, _, d_out = _inputs(2, 8, 24, 4, 2, 8, False, 0, seed=3)
    kv_seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 12], 2, axis=0), jnp.int32)
    q_seg = jnp.asarray([[1, 1, 2, 2, 3, 3, 1, 2]] * 2, jnp.int32)  # Segment 3 sees nothing.
    args = (q, k, v, q_seg, kv_seg, d_out)
    want = _value_and_grads(attention.KERNELS["xla"], *args, 10)
    _assert_same(_value_and_grads(attention.get_kernel("cpu"), *args, 10), want)


def test_a_decoder_with_the_cpu_kernel_trains_and_decodes_as_with_xla():
    from tests.model.model_testlib import forward, packed_batch, tiny_chameleon

    config, reference = tiny_chameleon(attention_impl="cpu"), tiny_chameleon()
    params = random_params(config, seed=5)
    batch = packed_batch(2, 40, config.vocab_size, seed=4)
    tokens, seg, pos = (batch[k] for k in ("decoder_input_tokens", "decoder_segment_ids",
                                           "decoder_positions"))
    loss = lambda cfg: jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(jnp.tanh(forward(cfg)(p, tokens, seg, pos)))))
    # 1e-3: float32 sums in another order; the "chunked" kernel differs from "xla" by the
    # same 4e-4 at most on this loss's gradients.
    _assert_same(loss(config)(params), loss(reference)(params), tol=1e-3)
    # Sampling reads the model's kernel for its prefill (a static offset of 0).
    prompts = sampler.left_pad([np.arange(5, 12), np.arange(40, 43)])
    runs = [sampler.sample(DecoderStep(c), params, prompts, jax.random.key(0),
                           max_new_tokens=6, greedy=True) for c in (reference, config)]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)


def test_weights_prepared_once_sample_the_same_tokens():
    config = tiny_config()
    params = random_params(config, seed=2)
    step = DecoderStep(config, cpu_kernels=True)
    prepared = jax.jit(step.prepare)(params)
    assert step.prepare(prepared) is prepared
    prompts = sampler.left_pad([np.arange(5, 12), np.arange(40, 43)])
    runs = [sampler.sample(step, weights, prompts, jax.random.key(1), max_new_tokens=8)
            for weights in (params, prepared)]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)


def test_flash_attention_on_a_sharded_mesh_is_refused():
    from cm3leon_jax.model import attention

    q, k, v, q_seg, kv_seg, _ = _inputs(2, 8, 8, 2, 2, 16, True, 0)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="one CPU device, unsharded"):
        attention.get_kernel("cpu")(q, k, v, q_seg, kv_seg, 0)


# -- loss_impl = "cpu": the loss's softmax and logits gradient, a row at a time -------------
def _softmax_grad_reference(logits, targets, g, z_loss):
    """The gradient of sum(g * (log_z - target_logit + z log_z^2)), written out in float64."""
    logits64 = np.asarray(logits, np.float64)
    top = logits64.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits64 - top).sum(-1, keepdims=True)))[:, 0]
    inside = (targets >= 0) & (targets < logits.shape[1])
    hit = np.arange(logits.shape[1]) == np.where(inside, targets, -1)[:, None]
    target_logit = np.where(hit, logits64, 0.0).sum(-1)
    softmax = np.exp(logits64 - log_z[:, None])
    return softmax * (g * (1 + 2 * z_loss * log_z))[:, None] - hit * g[:, None], log_z, target_logit


# Vocabularies past, inside and short of the kernel's 64- and 16-float blocks; targets
# outside [0, V) (no one-hot, target logit 0) and rows of weight 0.
@pytest.mark.parametrize("n,v", [(5, 300), (3, 16), (7, 37), (2, 8192)])
def test_softmax_grad_is_the_loss_gradient(n, v):
    rng = np.random.default_rng(v)
    logits = (rng.standard_normal((n, v)) * 4).astype(np.float32)
    targets = rng.integers(-2, v + 2, n).astype(np.int32)
    targets[0] = v - 1
    g = rng.random(n).astype(np.float32)
    g[-1] = 0.0
    got = jax.jit(lambda *a: cpu_kernels.softmax_grad(*a, 1e-3))(logits, targets, g)
    want = _softmax_grad_reference(logits, targets, g, 1e-3)
    for name, a, b in zip(("d_logits", "log_z", "target_logit"), got, want):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=name)
    assert not np.any(got[0][-1])


def test_softmax_grad_refuses_bad_shapes_and_a_sharded_mesh():
    logits = jnp.zeros((4, 10), jnp.float32)
    with pytest.raises(ValueError, match=r"must be \[N, V\], \[N\] and \[N\]"):
        cpu_kernels.softmax_grad(logits, jnp.zeros((3,), jnp.int32), jnp.ones((4,)), 0.0)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="loss_impl='cpu'.*one CPU device"):
        cpu_kernels.softmax_grad(logits, jnp.zeros((4,), jnp.int32), jnp.ones((4,)), 0.0)


# Rows of every kind: flat and peaked, -inf entries, tied scores, all equal; p below 1 (at
# p = 1 the threshold hangs on how the total of the probabilities rounds, in either order;
# TopP keeps every token there without asking it).
@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0, 30.0])
def test_nucleus_threshold_is_the_bisections(scale):
    rng = np.random.default_rng(int(scale * 100))
    scores = rng.normal(0, scale, (2, 3, 1000)).astype(np.float32)
    scores[0, 0, :50] = -np.inf
    scores[0, 1, 7] = scores[0, 1, 8]
    scores[1, 2] = 0.5
    scores = jnp.asarray(scores)
    keys, probs = proc._order_keys(scores), jax.nn.softmax(scores, axis=-1)
    for p in (0.05, 0.5, 0.9):
        want = jax.jit(proc.nucleus_threshold)(keys, probs, p)
        got = jax.jit(cpu_kernels.nucleus_threshold)(keys, probs, p)
        assert got.shape == (2, 3, 1) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)
    # TopP through it, p traced: the same kept set as through XLA's bisection.
    top_p = jax.jit(lambda s, p, kernel: proc.TopP(p, cpu_kernel=kernel)(s, None),
                    static_argnums=2)
    np.testing.assert_array_equal(top_p(scores, 0.9, True), top_p(scores, 0.9, False))
    np.testing.assert_array_equal(top_p(scores, 1.0, True), scores)


def test_nucleus_threshold_refuses_bad_shapes_and_a_sharded_mesh():
    keys, probs = jnp.zeros((2, 8), jnp.int32), jnp.full((2, 8), 0.125)
    with pytest.raises(ValueError, match=r"keys \(2, 8\) and probs \(2, 7\)"):
        cpu_kernels.nucleus_threshold(keys, probs[:, :7], 0.9)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="TopP.cpu_kernel=True.*one CPU"):
        cpu_kernels.nucleus_threshold(keys, probs, 0.9)

