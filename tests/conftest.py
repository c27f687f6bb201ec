"""Test-wide setup: eight fake CPU devices, so sharding tests need no hardware; LLVM at
-O0; one persistent compilation cache per session.

XLA reads the flag once, when the backend starts, so it is set here before any
test imports jax.

Tests build many identical programs (a tiny model's init, train step and sampler in
several tests, and in the subprocesses the CLI tests start); JAX's persistent
compilation cache compiles each once per session. It lives in a temporary folder
removed at exit, so every session starts cold and measures the same.

Property tests (hypothesis) run derandomized (the same examples every run: a failure
reproduces) and without a wall-clock deadline (a loaded 2-core machine is slow, not
wrong). `HYPOTHESIS_PROFILE=explore` searches with fresh random examples instead.
"""

import atexit
import os
import shutil
import sys
import tempfile
import traceback

import pytest
from hypothesis import HealthCheck, settings

# Eight fake devices; LLVM at -O0: the suite's tiny programs spend far more time compiling
# than running, and -O0 cut the CPU time of compile-bound and training test files alike by a
# third (tests/model/test_custom_grads.py 81 -> 53 s, test_vqgan_train + test_step 412 ->
# 263 s, one process each). XLA's graph-level passes (fusion, layout) still run.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (used by the data layer) must never take the accelerator from JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests run on CPU devices only, even where libtpu or CUDA is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cm3leon_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # Subprocesses inherit it.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# CPython 3.11 keeps the AST builder's recursion counter in interpreter-wide state, so ASTs
# built on two threads at once can corrupt it for the rest of the process: every later
# ast.parse fails ("AST constructor recursion depth mismatch", python/cpython#106905). That
# breaks TF autograph, which parses the functions it converts (a converted pipeline function
# then runs unconverted and fails on a symbolic tensor), and pytest's own failure report (one
# suite run ended in an INTERNALERROR so). Python 3.11's traceback formatting parses each
# source line to place its ^^^ carets, on whatever thread formats it (tf.data's, orbax's,
# asyncio's) while the main thread may be tracing: without the carets it parses nothing.
if sys.version_info[:2] == (3, 11):
    traceback._extract_caret_anchors_from_line_segment = lambda segment: None

# The longest files first, longest first: `make test` hands out whole files to its two workers
# in collection order (--dist loadfile --no-loadscope-reorder), and a long file that starts
# last keeps one worker busy alone at the end. Wall seconds per file in one full run.
RUN_FIRST = (
    "tests/cli/test_demo_run.py",  # 530
    "tests/train/test_trainer.py",  # 345
    "tests/train/test_multihost.py",  # 235
    "tests/vocab/test_vqgan_train.py",  # 245
    "tests/train/test_sft_run.py",  # 200
    "tests/evaluation/test_eval_run.py",  # 200
    "tests/model/test_sharding.py",  # 135
    "tests/tasks/test_pretrain_tasks.py",  # 135
    "tests/decode/test_sft_generation.py",  # 130
    "tests/model/test_custom_grads.py",  # 120
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# One random image tokenizer and one random retrieval encoder (CLIP) for the whole session,
# shared by the data, retrieval, evaluation and decode tests: building and compiling them
# once instead of per file (identical programs also hit the compilation cache above).
# 32 px -> 4x4 = 16 codes of a 64-entry codebook (the decode tests' vocabulary).
def shared_vq_config():
    """The VQGANConfig of the `random_image_tokenizer` fixture."""
    from cm3leon_jax.vocab.vqgan import VQGANConfig

    return VQGANConfig(image_size=32, base_channels=8, channel_multipliers=(1, 2, 2, 2),
                       num_res_blocks=1, attn_levels=(), latent_channels=8, embed_dim=8,
                       codebook_size=64, num_groups=4)


@pytest.fixture(scope="session")
def random_image_tokenizer():
    """ImageTokenizer: random weights (seed 0), shared_vq_config(), batch size 8."""
    from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer

    return ImageTokenizer.random_init(shared_vq_config(), seed=0, batch_size=8)


@pytest.fixture(scope="session")
def random_clip_encoder():
    """DocumentEncoder: the tiny CLIP config, random weights (seed 0), a 4096-word tokenizer."""
    from cm3leon_jax.retrieval import clip, clip_tokenizer
    from cm3leon_jax.retrieval.encoder import DocumentEncoder

    cfg = clip.clip_config("tiny")
    return DocumentEncoder(cfg, clip.init_params(cfg, 0), clip_tokenizer.WordTokenizer(4096))
