"""FID Inception parity with pytorch-fid's own network (random weights) and its Frechet distance."""

import numpy as np
import pytest

from cm3leon_jax.evaluation import fid, inception, inception_weights

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _random_state_dict(seed: int) -> dict:
    """A state dict in pt_inception-2015-12-05's layout with random values: the FID
    blocks only change forward(), so torchvision's Inception3 has the same names/shapes.
    Conv weights are He-scaled and batch-norm statistics random, so that features stay
    O(1) through the 94 layers and every tensor of the file matters."""
    base = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in base.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            value = 0.5 + torch.rand(value.shape, generator=gen)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=gen)
        state[name] = value
    return state


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict(0)


@pytest.fixture(scope="module")
def reference_net(state_dict):
    """pytorch-fid's InceptionV3 (FID blocks, resize, normalization) built by its own code;
    the weights download is replaced by the random state dict."""
    real = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *a, **k: state_dict
    try:
        net = pytorch_fid_inception.InceptionV3([3])
    finally:
        pytorch_fid_inception.load_state_dict_from_url = real
    return net.eval()


def test_features_match_pytorch_fid(state_dict, reference_net):
    rng = np.random.default_rng(0)
    # One image smaller than 299 (upsampled), one larger (downsampled without anti-aliasing).
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)]
    extract = fid.InceptionFeatures(inception_weights.convert(
        {k: v.numpy() for k, v in state_dict.items()}), batch_size=1)
    for image in images:
        x = torch.from_numpy(image[None].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        with torch.no_grad():
            want = reference_net(x)[0].reshape(1, 2048).numpy()
        got = extract(image[None])
        assert got.shape == (1, 2048) and np.abs(want).mean() > 1e-2
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_importer_refuses_other_files(state_dict):
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    with pytest.raises(ValueError, match="lacks 2 weights"):
        inception_weights.convert({k: v for k, v in arrays.items()
                                   if not k.startswith("Mixed_7c.branch_pool.bn.running")})
    bad = dict(arrays, **{"Mixed_5b.branch1x1.conv.weight": np.zeros((3, 3, 1, 1))})
    with pytest.raises(ValueError, match="Mixed_5b.branch1x1.conv.weight.*shape"):
        inception_weights.convert(bad)
    with pytest.raises(ValueError, match="'head.weight' is not a weight"):
        inception_weights.convert(dict(arrays, **{"head.weight": np.zeros(3)}))


def test_frechet_distance_matches_pytorch_fid(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 8))
    b = rng.normal(0.3, 1.2, size=(50, 8)) @ rng.normal(size=(8, 8))
    sa, sb = fid.statistics(a), fid.statistics(b)
    want = fid_score.calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert fid.frechet_distance(sa, sb) == pytest.approx(want, rel=1e-6)
    assert fid.frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-6)
    # Fewer samples than dimensions: singular covariances, the eps retry path.
    sc, sd = fid.statistics(a[:4]), fid.statistics(b[:5])
    want = fid_score.calculate_frechet_distance(sc.mu, sc.sigma, sd.mu, sd.sigma)
    assert fid.frechet_distance(sc, sd) == pytest.approx(want, rel=1e-4)
    # Cached reference statistics: computed once, then read back from the .npz.
    path, calls = str(tmp_path / "ref.npz"), []

    def images():
        calls.append(1)
        return a

    for _ in range(2):
        stats = fid.reference_statistics(path, images, lambda x: x)
        np.testing.assert_allclose(stats.sigma, sa.sigma)
    assert calls == [1] and sorted(np.load(path).files) == ["mu", "sigma"]


def test_clean_resize_is_pil_bicubic_per_channel():
    image = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    out = inception.resize_clean(image[None], 50)
    from PIL import Image
    red = Image.fromarray(image[..., 0].astype(np.float32), mode="F").resize((50, 50),
                                                                             Image.BICUBIC)
    np.testing.assert_allclose(out[0, ..., 0], np.clip(np.asarray(red), 0, 255))
    with pytest.raises(ValueError, match="resize='nearest'"):
        fid.InceptionFeatures({}, resize="nearest")
    with pytest.raises(ValueError, match=r"uint8\[n, h, w, 3\]"):
        inception.preprocess(np.zeros((2, 8, 8), np.uint8))
