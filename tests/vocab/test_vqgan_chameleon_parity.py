"""The import of the released checkpoint layout, checked against PyTorch.

Encoder: against `transformers`' ChameleonVQVAE (the reference implementation of
the released model) on a tiny random config: identical codes, latents within
1e-5 relative error. Decoder: transformers ships no decoder, so the test
assembles the released decoder layout (`decoder.up.{i}.block.{j}`,
`up.{i}.upsample.conv`, ...) from transformers' own ResNet and attention blocks
plus nearest-neighbor up-sampling, and checks our decoder against it.
"""

import gin
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers.models.chameleon import modeling_chameleon as hf  # noqa: E402

from cm3leon_jax.vocab import chameleon_vqgan_weights as w  # noqa: E402
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer  # noqa: E402
from cm3leon_jax.vocab.vqgan import VQGAN  # noqa: E402

RES = 32


def _hf_config():
    return transformers.ChameleonVQVAEConfig(
        embed_dim=16, num_embeddings=64, latent_channels=32, resolution=RES, in_channels=3,
        base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
        attn_resolutions=[RES // 2])  # attention at level 1 as well as in the middle


class _Upsample(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ReferenceDecoder(torch.nn.Module):
    """The released decoder's layout, built from transformers' blocks."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_multiplier, cfg.num_res_blocks
        block_in = ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = torch.nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = torch.nn.Module()
        self.mid.block_1 = hf.ChameleonVQVAEEncoderResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = hf.ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = hf.ChameleonVQVAEEncoderResnetBlock(cfg, block_in, block_in)
        self.up = torch.nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = torch.nn.Module()
            level.block, level.attn = torch.nn.ModuleList(), torch.nn.ModuleList()
            for _ in range(n + 1):
                level.block.append(hf.ChameleonVQVAEEncoderResnetBlock(cfg, block_in, ch * mult[i]))
                block_in = ch * mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(hf.ChameleonVQVAEEncoderAttnBlock(block_in))
            if i != 0:
                level.upsample = _Upsample(block_in)
                res *= 2
            self.up.insert(0, level)
        self.norm_out = torch.nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = torch.nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            for j, block in enumerate(self.up[i].block):
                h = block(h)
                if len(self.up[i].attn):
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


def _randomize(module, seed):
    # Fresh inits leave GroupNorm at identity and biases at 0, which would hide
    # a swapped scale/bias or a missing transpose; draw every tensor instead.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # weights: unit-variance outputs
                p.copy_(r / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            else:
                p.copy_(0.3 * r)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    cfg = _hf_config()
    vq = transformers.ChameleonVQVAE(cfg).eval()
    dec = _ReferenceDecoder(cfg).eval()
    _randomize(vq, 1)
    _randomize(dec, 2)
    sd = {**{k: v for k, v in vq.state_dict().items()},
          **{f"decoder.{k}": v for k, v in dec.state_dict().items()}}
    return cfg, vq, dec, sd


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def test_config_is_read_off_the_shapes(reference):
    _, _, _, sd = reference
    cfg = w.config_from_state_dict(sd, image_size=RES)
    assert cfg.base_channels == 32 and cfg.channel_multipliers == (1, 2, 2)
    assert cfg.num_res_blocks == 1 and cfg.attn_levels == (1,) and cfg.mid_attention
    assert (cfg.codebook_size, cfg.embed_dim, cfg.latent_channels) == (64, 16, 32)
    # What the shapes cannot say is taming's, whatever a gin file binds for our own tokenizers.
    with gin.unlock_config():
        gin.bind_parameter("VQGANConfig.norm", "layer")
        gin.bind_parameter("VQGANConfig.num_groups", 8)
    try:
        cfg = w.config_from_state_dict(sd, image_size=RES)
    finally:
        gin.clear_config()
    assert (cfg.norm, cfg.num_groups, cfg.l2_normalize) == ("group", 32, False)


def test_encoder_matches_transformers(reference):
    hf_cfg, vq, _, sd = reference
    # transformers' own naming, as inside a Chameleon model, must load too.
    prefixed = {f"model.vqmodel.{k}": v for k, v in sd.items()}
    params, cfg = w.params_from_state_dict(prefixed)
    x = np.random.default_rng(0).uniform(-1, 1, (3, RES, RES, 3)).astype(np.float32)
    with torch.no_grad():
        out = vq.encode(torch.from_numpy(x.transpose(0, 3, 1, 2)), return_dict=True)
    enc = jax.jit(lambda p, x: VQGAN(cfg).apply({"params": p}, x, method=VQGAN.encode))(params, x)
    ref_hidden = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    ref_quant = out.quantized_last_hidden_state.numpy().transpose(0, 2, 3, 1)
    ref_codes = out.image_tokens.numpy().reshape(enc.quant.codes.shape)
    assert len(np.unique(ref_codes)) > 8, "degenerate fixture: too few distinct codes"
    np.testing.assert_array_equal(np.asarray(enc.quant.codes), ref_codes)
    assert _rel_err(np.asarray(enc.hidden), ref_hidden) < 1e-5
    assert _rel_err(np.asarray(enc.quant.quantized), ref_quant) < 1e-5
    # The encoder-only model's quantizer loss (legacy beta placement) for completeness.
    assert np.isfinite(float(out.embedding_loss))


def test_decoder_matches_reference_layout(reference):
    hf_cfg, vq, dec, sd = reference
    params, cfg = w.params_from_state_dict(sd)
    codes = np.random.default_rng(1).integers(0, cfg.codebook_size, (2, 8, 8))
    with torch.no_grad():
        e = vq.quantize.embedding.weight[torch.from_numpy(codes)].permute(0, 3, 1, 2)
        ref = dec(vq.post_quant_conv(e)).numpy().transpose(0, 2, 3, 1)
    ours = jax.jit(lambda p, c: VQGAN(cfg).apply({"params": p}, c, method=VQGAN.decode_codes))(
        params, jnp.asarray(codes))
    assert ours.shape == (2, RES, RES, 3)
    assert _rel_err(np.asarray(ours), ref) < 1e-5


def test_export_round_trips_and_mismatch_is_explained(reference):
    _, _, _, sd = reference
    params, cfg = w.params_from_state_dict(sd)
    back = w.state_dict_from_params(params)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].numpy())
    wrong = cfg.__class__.from_dict({**cfg.to_dict(), "codebook_size": 128})
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        w.params_from_state_dict(sd, wrong)
    encoder_only = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    with pytest.raises(ValueError, match="missing"):
        w.params_from_state_dict(encoder_only, cfg)


def test_files_load(reference, tmp_path):
    _, _, _, sd = reference
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vq.safetensors"))
    torch.save({"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.zeros(2)}},
               str(tmp_path / "vqgan.ckpt"))
    a, cfg_a = w.load_chameleon_vqgan(str(tmp_path / "vq.safetensors"), image_size=RES)
    b, cfg_b = w.load_chameleon_vqgan(str(tmp_path / "vqgan.ckpt"), image_size=RES)
    assert cfg_a == cfg_b
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_user_facing_tokenizer_gives_the_reference_codes(reference, tmp_path):
    _, vq, _, sd = reference
    torch.save({"state_dict": sd}, str(tmp_path / "vqgan.ckpt"))
    tok = ImageTokenizer.from_chameleon(str(tmp_path / "vqgan.ckpt"), image_size=RES)
    images = np.random.default_rng(2).integers(0, 256, (2, RES, RES, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        ref = vq.encode(pixels, return_dict=True).image_tokens.numpy().reshape(2, -1)
    np.testing.assert_array_equal(tok.encode(images), ref)
    assert tok.decode(ref).shape == (2, RES, RES, 3)
