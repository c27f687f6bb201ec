"""ImageTokenizer: shapes, dtypes, jit + batching, input conversion and its errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import image_inputs
from cm3leon_jax.vocab.image_tokenizer import (
    ImageTokenizer,
    encode_images,
    images_to_model,
    load_image_tokenizer,
)
from cm3leon_jax.vocab.vqgan import VQGAN, VQGANConfig

CFG = VQGANConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                  attn_levels=(1,), latent_channels=8, embed_dim=8, codebook_size=32, num_groups=4)


@pytest.fixture(scope="module")
def tok():
    return ImageTokenizer.random_init(CFG, seed=0, batch_size=4)


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_config_shape_and_validation():
    assert (CFG.downsample_factor, CFG.grid_size, CFG.codes_per_image) == (2, 8, 64)
    f8 = VQGANConfig()
    assert (f8.downsample_factor, f8.codes_per_image, f8.codebook_size) == (8, 1024, 8192)
    with pytest.raises(ValueError, match="not divisible"):
        VQGANConfig(image_size=20, channel_multipliers=(1, 1, 2, 4))
    with pytest.raises(ValueError, match="num_groups"):
        VQGANConfig(base_channels=24)
    with pytest.raises(ValueError, match="attn_levels"):
        VQGANConfig(attn_levels=(4,))
    assert VQGANConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown"):
        VQGANConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="norm must be 'group' or 'layer'"):
        VQGANConfig(norm="batch")
    # A checkpoint written before `norm` existed reads back as the GroupNorm it was.
    old = {k: v for k, v in CFG.to_dict().items() if k != "norm"}
    assert VQGANConfig.from_dict(old).norm == "group"


def test_a_config_of_other_than_three_input_channels_is_refused():
    # Every input path converts images to RGB: a 1-channel model could never be fed.
    with pytest.raises(UserInputError, match="in_channels=1"):
        dataclasses.replace(CFG, in_channels=1)


@pytest.mark.parametrize("norm, local", [("group", False), ("layer", True)])
def test_layer_norm_without_attention_keeps_a_change_out_of_far_codes(norm, local):
    """What an edit needs of its tokenizer: pixels changed in one corner move the latents
    only within the encoder's receptive field with per-position LayerNorm; GroupNorm's
    whole-map statistics carry the change to every position."""
    cfg = VQGANConfig(image_size=96, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                      attn_levels=(), mid_attention=False, latent_channels=8, embed_dim=8,
                      codebook_size=32, num_groups=4, norm=norm)
    tok = ImageTokenizer.random_init(cfg, seed=0)
    a = _images(1, size=96, seed=3)
    b = a.copy()
    b[:, :8, :8] = 255 - b[:, :8, :8]                  # the top-left 4 x 4 latent cells
    net = VQGAN(cfg)
    za, zb = (np.asarray(net.apply({"params": tok.params}, images_to_model(x),
                                   method=VQGAN.encode).quant.latents) for x in (a, b))
    near, far = np.abs(za - zb)[0, :4, :4], np.abs(za - zb)[0, 24:, 24:]
    assert near.max() > 1e-3
    if local:
        assert far.max() == 0.0   # 24+ cells away: beyond the receptive field
    else:
        assert far.max() > 1e-6


def test_encode_decode_shapes_dtypes(tok):
    codes = tok.encode(_images(3))
    assert codes.shape == (3, 64) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < CFG.codebook_size
    images = tok.decode(codes)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(tok.decode(codes.reshape(3, 8, 8)), images)
    np.testing.assert_array_equal(tok.decode(codes[0]), images[:1])  # one image's codes


def test_batching_is_invisible_and_compiles_once(tok):
    x = _images(7, seed=1)  # 2 chunks of batch 4, the last one padded
    codes = tok.encode(x)
    one_by_one = np.concatenate([tok.encode(x[i:i + 1]) for i in range(7)])
    np.testing.assert_array_equal(codes, one_by_one)
    # Same as the pure function, unbatched and unjitted.
    np.testing.assert_array_equal(codes, np.asarray(encode_images(CFG, tok.params, x)))
    images = tok.decode(codes)
    np.testing.assert_array_equal(images[5], tok.decode(codes[5:6])[0])
    assert tok._encode._cache_size() == 1 and tok._decode._cache_size() == 1  # one batch shape


def test_gin_factory(tok):
    t = load_image_tokenizer(config=CFG, seed=0, batch_size=4)
    np.testing.assert_array_equal(t.encode(_images(2)), tok.encode(_images(2)))
    with pytest.raises(ValueError, match="checkpoint"):
        load_image_tokenizer()
    with pytest.raises(ValueError, match="not both"):
        load_image_tokenizer(checkpoint="a", chameleon_checkpoint="b")


# ------------------------------------------------------------------ input conversion


def test_conversions_that_are_unambiguous():
    rgb = _images(1, 16, seed=2)[0]
    conv = lambda x, **kw: image_inputs.to_rgb_uint8(x, 16, **kw)  # noqa: E731
    np.testing.assert_array_equal(conv(rgb), rgb[None])
    gray = rgb[..., 0]
    expect_gray = np.repeat(gray[None, ..., None], 3, -1)
    np.testing.assert_array_equal(conv(gray), expect_gray)  # [h, w]
    np.testing.assert_array_equal(conv(gray[..., None]), expect_gray)  # [h, w, 1]
    np.testing.assert_array_equal(conv(gray[None, ..., None]), expect_gray)  # [b, h, w, 1]
    # RGBA: opaque pixels keep their color, transparent ones become white.
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], -1)
    rgba[:8, :, 3] = 0
    out = conv(rgba)[0]
    np.testing.assert_array_equal(out[8:], rgb[8:])
    assert (out[:8] == 255).all()
    # Channels-first batches, floats in [0, 1], small integer types, PIL images.
    np.testing.assert_array_equal(conv(rgb[None].transpose(0, 3, 1, 2)), rgb[None])
    np.testing.assert_array_equal(conv(rgb.astype(np.float32) / 255.0), rgb[None])
    # bfloat16 (what a jax array in [0, 1] may hold): a float like any other.
    half = jnp.asarray(rgb / 255.0, jnp.bfloat16)
    expect = np.round(np.asarray(half, np.float32) * 255).astype(np.uint8)[None]
    np.testing.assert_array_equal(conv(half), expect)
    np.testing.assert_array_equal(conv(np.asarray(half)), expect)
    np.testing.assert_array_equal(conv(rgb.astype(np.int64)), rgb[None])
    np.testing.assert_array_equal(conv(Image.fromarray(rgb)), rgb[None])
    np.testing.assert_array_equal(conv(Image.fromarray(gray)), expect_gray)
    assert conv(Image.fromarray(rgba)).shape == (1, 16, 16, 3)
    # Sizes: square resized, non-square center-cropped, lists of mixed sizes stacked.
    assert conv(_images(2, 40)).shape == (2, 16, 16, 3)
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, 16:32] = 200  # the center third
    np.testing.assert_array_equal(conv(wide)[0], wide[:, 16:32])
    assert conv([rgb, _images(1, 64)[0], wide]).shape == (3, 16, 16, 3)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 16, 16), np.uint8), "batch of grayscale"),
    (np.zeros((16, 16, 2), np.uint8), "must be one image"),
    (np.zeros((1, 16, 16, 2), np.uint8), r"expected \[b, h, w, c\]"),
    (np.zeros((16,), np.uint8), "1 dimensions"),
    (np.zeros((16, 16, 3), bool), "boolean"),
    (np.full((16, 16, 3), 300, np.int32), "0..255"),
    (np.full((16, 16, 3), 1000, np.uint16), "16-bit"),
    (np.full((16, 16, 3), -0.5, np.float32), r"\[-1, 1\]"),
    (np.full((16, 16, 3), 128.0, np.float32), r"\[0, 1\]"),
    (np.full((16, 16, 3), np.nan, np.float32), "NaN"),
    (np.zeros((16, 16, 3), np.complex64), "dtype complex64"),
    (np.zeros((0, 16, 3), np.uint8), "empty"),
    ([], "no images"),
])
def test_refused_inputs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        image_inputs.to_rgb_uint8(bad, 16)


def test_non_square_can_be_refused(tok):
    strict = ImageTokenizer(CFG, tok.params, batch_size=4, crop_non_square=False)
    with pytest.raises(ValueError, match="not square"):
        strict.encode(np.zeros((16, 24, 3), np.uint8))


@pytest.mark.parametrize("codes, message", [
    (np.full((1, 64), 32), r"0\.\.31"),
    (np.full((1, 64), -1), "values in"),
    (np.zeros((1, 63), np.int32), r"\[batch, 64\]"),
    (np.zeros((1, 64), np.float32), "integers"),
    (np.zeros((0, 64), np.int32), r"no codes given \(batch of size 0\)"),
    (np.zeros((0, 8, 8), np.int32), r"no codes given \(batch of size 0\)"),
])
def test_bad_codes_are_refused(tok, codes, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(codes)


def test_encode_under_jit_inside_other_code(tok):
    # The pure function composes with other jitted code (e.g. a sampler on device).
    f = jax.jit(lambda p, x: encode_images(CFG, p, x) + 1)
    x = _images(2, seed=3)
    np.testing.assert_array_equal(np.asarray(f(tok.params, x)) - 1, tok.encode(x))


def test_the_local_tiny_config_is_tiny_with_codes_that_see_only_their_neighborhood():
    import gin

    from cm3leon_jax import main
    gin.clear_config()
    try:
        main.configure(["gin_configs/image_tokenizer/tiny_local.gin"], [], finalize=False)
        local = VQGANConfig()
        gin.clear_config()
        main.configure(["gin_configs/image_tokenizer/tiny.gin"], [], finalize=False)
        tiny = VQGANConfig()
    finally:
        gin.clear_config()
    assert (local.norm, local.mid_attention, local.attn_levels) == ("layer", False, ())
    assert dataclasses.replace(local, norm="group", mid_attention=True) == tiny


@pytest.mark.parametrize("hgt,wid", [(4, 4), (3, 5)])
def test_upsample_is_the_conv_over_the_doubled_map(hgt, wid):
    """`Upsample` folds the 3x3 conv over the nearest-neighbor doubled map into 2x2 windows
    of the input: the same values and gradients as computing it the plain way, the
    same parameters."""
    import jax.numpy as jnp

    from cm3leon_jax.vocab.vqgan import Upsample

    x = jax.random.normal(jax.random.PRNGKey(1), (2, hgt, wid, 8))
    module = Upsample(CFG)
    params = module.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias too

    def plain(params, x):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        out = jax.lax.conv_general_dilated(
            up, params["params"]["kernel"], (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        return out + params["params"]["bias"]

    assert jax.tree_util.tree_map(jnp.shape, params["params"]) == {
        "kernel": (3, 3, 8, 8), "bias": (8,)}
    np.testing.assert_allclose(module.apply(params, x), plain(params, x), atol=2e-5)
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
    got = jax.grad(loss(module.apply), argnums=(0, 1))(params, x)
    want = jax.grad(loss(plain), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-5)
