"""Bad inputs to FID, CLIP score and the Inception weights reader: one clear error each."""

import numpy as np
import pytest

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import fid, inception, inception_weights


def test_unreadable_inception_weights_name_the_file_and_the_fix(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_text('<html><body>You are being <a href="x">redirected'
                                       "</a>.</body></html>")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])  # An interrupted download.
    (tmp_path / "junk.npz").write_bytes(b"junk")
    for name, why in (("empty.pth", "the file is empty"),
                      ("page.pth", "it is an HTML page, not the weights"),
                      ("junk.pth", "not a torch state dict"),
                      ("cut.pth", "RuntimeError: PytorchStreamReader failed"),
                      ("junk.npz", "not an .npz of arrays")):
        path = str(tmp_path / name)
        with pytest.raises(UserInputError, match=rf"Inception weights '{path}' are unreadable "
                                                 rf"\({why}.*again \(curl -L -o "):
            inception_weights.load(path)


def test_frechet_distance_of_other_sizes_or_non_finite_statistics_is_refused(tmp_path):
    a = fid.Statistics(np.zeros(3), np.eye(3))
    with pytest.raises(UserInputError, match=r"mu \(3,\) vs \(3,\), sigma \(3, 3\) vs "
                                             r"\(2, 2\)"):
        fid.frechet_distance(a, fid.Statistics(np.zeros(3), np.eye(2)))
    with pytest.raises(UserInputError, match="the second statistics hold NaN or inf"):
        fid.frechet_distance(a, fid.Statistics(np.array([0.0, np.nan, 0.0]), np.eye(3)))
    features = np.random.default_rng(0).normal(size=(6, 3))
    features[4, 1] = np.inf
    with pytest.raises(UserInputError, match="generated images: 1 of 6 rows hold NaN or inf "
                                             r"\(first: row 4\)"):
        fid.fid(features, a)
    with pytest.raises(UserInputError, match="reference features: 1 of 6 rows"):
        fid.reference_statistics(None, lambda: features, lambda x: x)
    path = str(tmp_path / "ref.npz")
    fid.save_statistics(path, fid.Statistics(np.full(3, np.nan), np.eye(3)))
    with pytest.raises(UserInputError, match=f"statistics '{path}' hold NaN or inf; delete"):
        fid.load_statistics(path)


def test_inception_features_of_no_images_or_mixed_sizes_are_refused():
    extract = fid.InceptionFeatures({})
    with pytest.raises(UserInputError, match=r"no images \(uint8\[0, 32, 32, 3\]\)"):
        extract(np.zeros((0, 32, 32, 3), np.uint8))
    mixed = [np.zeros((32, 32, 3), np.uint8), np.zeros((24, 32, 3), np.uint8)]
    with pytest.raises(UserInputError, match=r"images: a list of images of 2 sizes "
                                             r"\[\(24, 32, 3\), \(32, 32, 3\)\]; resize"):
        extract(mixed)
    assert inception.check_images([np.zeros((8, 8, 3), np.uint8)] * 2).shape == (2, 8, 8, 3)
    with pytest.raises(UserInputError, match=r"expected uint8\[n, h, w, 3\] RGB images, got "
                                             r"float32\[2, 8, 8, 3\]"):
        inception.check_images(np.zeros((2, 8, 8, 3), np.float32))


def test_clip_score_of_no_pairs_is_an_error():
    from cm3leon_jax.evaluation.clip_score import ClipScorer
    from cm3leon_jax.retrieval import clip, clip_tokenizer
    from cm3leon_jax.retrieval.encoder import DocumentEncoder
    cfg = clip.clip_config("tiny")
    scorer = ClipScorer(DocumentEncoder(cfg, clip.init_params(cfg, 0),
                                        clip_tokenizer.WordTokenizer(4096)))
    with pytest.raises(UserInputError, match="no image-caption pairs"):
        scorer.score(np.zeros((0, 32, 32, 3), np.uint8), [])
