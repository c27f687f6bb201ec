"""Frechet distance between feature distributions (FID), with cached reference statistics.

    extract = InceptionFeatures(inception_weights.load(path))     # the standard FID
    stats = reference_statistics("coco_val2014_30k.npz", lambda: coco_images, extract)
    score = fid(extract(generated), stats)

FID (Heusel et al. 2017) fits a Gaussian to each set's features and returns
`|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`. Statistics are stored as `.npz` with
keys `mu` and `sigma`, as pytorch-fid's `--save-stats` writes them, so files from either
tool are interchangeable (when made with the same network and resize mode).

With random Inception weights the number means nothing, so on the built-in corpus FID
is also computed on the project's own trained retrieval image encoder
(`EncoderFeatures`): comparable between runs of this project only, and reported as
"FID (retrieval-encoder features)".
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import linalg

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.evaluation import inception
from cm3leon_jax.train import params_checkpoint

log = logging.getLogger(__name__)


class Statistics(NamedTuple):
    """mu: f64[d] feature mean; sigma: f64[d, d] covariance (unbiased, rows are samples)."""

    mu: np.ndarray
    sigma: np.ndarray


def statistics(features: np.ndarray, what: str = "features") -> Statistics:
    """f32[n, d] features (n >= 2, finite) -> their mean and covariance; `what` names them
    in errors."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID statistics need features [n >= 2, d], got {features.shape}.")
    broken = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if broken.size:
        raise UserInputError(f"FID {what}: {broken.size} of {len(features)} rows hold NaN or "
                             f"inf (first: row {broken[0]}); check the images and the feature "
                             "extractor's weights.")
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
    """The Frechet distance of two Gaussians; the matrix square root is retried with
    `eps` on the diagonals when the product is singular (few samples, as pytorch-fid)."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise UserInputError(f"statistics of different feature sizes: mu {a.mu.shape} vs "
                             f"{b.mu.shape}, sigma {a.sigma.shape} vs {b.sigma.shape}; were "
                             "they made with the same network?")
    for name, stats in (("first", a), ("second", b)):
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise UserInputError(f"FID: the {name} statistics hold NaN or inf (mu or sigma); "
                                 "compute them again from finite features.")
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(a.mu)) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has an imaginary part of "
                             f"{np.abs(covmean.imag).max():.3g}; use more samples.")
        covmean = covmean.real
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def save_statistics(path: str, stats: Statistics, key: dict | None = None) -> None:
    """`mu`, `sigma` (pytorch-fid's --save-stats layout) and, when given, `key` (what they
    were computed from, as JSON), written whole or not at all."""
    fs.makedirs(os.path.dirname(fs.abspath(path)))
    buffer = io.BytesIO()
    extra = {"key": np.asarray(json.dumps(key, sort_keys=True))} if key is not None else {}
    np.savez(buffer, mu=stats.mu, sigma=stats.sigma, **extra)
    fs.write_bytes(path, buffer.getvalue())


def load_statistics(path: str, key: dict | None = None) -> Statistics:
    """An `.npz` with `mu` and `sigma` (pytorch-fid's --save-stats layout). With `key`, one
    saved with another key (another reference set, size or feature extractor) is refused;
    one saved without a key (e.g. by pytorch-fid) is used as is, with a warning."""
    try:
        z = fs.np_load(path)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise UserInputError(f"FID reference statistics {path!r} are unreadable ({e}); delete "
                             "the file to compute them again.") from None
    with z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path!r} has {z.files}, not FID statistics (mu, sigma).")
        if key is not None:
            saved = json.loads(str(z["key"])) if "key" in z.files else None
            if saved is None:
                log.warning("FID reference statistics %s do not say what they were computed "
                            "from; using them as given for %s.", path, key)
            elif saved != json.loads(json.dumps(key, sort_keys=True)):
                raise UserInputError(
                    f"FID reference statistics {path!r} were computed from {saved}, not this "
                    f"run's {key}: give evaluate.fid_reference another file (or delete it).")
        stats = Statistics(z["mu"], z["sigma"])
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        raise UserInputError(f"FID reference statistics {path!r} hold NaN or inf; delete the "
                             "file to compute them again.")
    return stats


def content_digest(images: np.ndarray) -> str:
    """16 hex digits of sha256 over the images' shape and bytes: the reference set itself,
    so that cached statistics of other images (the same count and size) are refused."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{images.dtype} {images.shape}\n".encode())
    h.update(memoryview(images).cast("B"))
    return h.hexdigest()[:16]


def reference_statistics(cache_path: str | None, images: Callable[[], Any],
                         extract: Callable[[np.ndarray], np.ndarray],
                         key: dict | None = None) -> Statistics:
    """Statistics of a reference set, read from `cache_path` if it exists (and was computed
    from what `key` describes: the images' digest, size and count, and the feature
    extractor's weights), else
    computed from `images()` (called only then) and written there with `key`."""
    if cache_path and fs.exists(cache_path):
        return load_statistics(cache_path, key)
    stats = statistics(extract(images()), what="reference features")
    if cache_path:
        save_statistics(cache_path, stats, key)
    return stats


def fid(features: np.ndarray, reference: Statistics) -> float:
    """FID of f32[n, d] features against reference statistics."""
    return frechet_distance(statistics(features, what="features of the generated images"),
                            reference)


class InceptionFeatures:
    """uint8[n, h, w, 3] -> f32[n, 2048]: the FID Inception's pool features, in fixed
    batches (one compile). resize: "pytorch_fid" (default) or "clean" (clean-fid's)."""

    def __init__(self, variables: dict, batch_size: int = 50, resize: str = "pytorch_fid"):
        if resize not in inception.RESIZE_MODES:
            raise ValueError(f"resize={resize!r}; use one of {inception.RESIZE_MODES}.")
        self.variables, self.batch_size, self.resize = variables, batch_size, resize
        net = inception.FIDInception()
        self._fn = jax.jit(lambda v, x: net.apply(v, x))

    @functools.cached_property
    def fingerprint(self) -> str:
        """The weights' digest and the resize: what decides the features (cached statistics
        of other weights are not these)."""
        return params_checkpoint.fingerprint({"features": "fid_inception",
                                              "resize": self.resize}, self.variables)

    def __call__(self, images: Any) -> np.ndarray:
        images = inception.check_images(images)
        if not len(images):
            raise UserInputError(f"InceptionFeatures got no images ({images.dtype}"
                                 f"{list(images.shape)}); FID needs at least 2.")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pad = self.batch_size - len(chunk) if len(images) > self.batch_size else 0
            if pad:  # Same shape as the other batches: no second compile.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            x = inception.preprocess(chunk, self.resize)
            out.append(np.asarray(self._fn(self.variables, x))[:len(chunk) - pad])
        return np.concatenate(out)


class EncoderFeatures:
    """uint8[n, h, w, 3] -> f32[n, d]: a retrieval `DocumentEncoder`'s unit image vectors.
    FID on these is this project's own measure, not comparable with published FID."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    @property
    def fingerprint(self) -> str | None:
        return getattr(self.encoder, "fingerprint", None)

    def __call__(self, images: Any) -> np.ndarray:
        return self.encoder.embed_images(list(inception.check_images(images)))
