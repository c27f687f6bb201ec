"""Clustered unit vectors that look like real embeddings, for tests and benchmarks.

Uniform noise on the sphere is a poor stand-in for CLIP vectors: in 512-d every
pair is nearly orthogonal, so no index can beat brute force and recall numbers
mean little. Real embeddings crowd into topics of very different sizes, and
within a topic they vary along few directions (their intrinsic dimension is a
few dozen, not 512). Here each vector is a topic center plus a variation in that
topic's own low-dimensional subspace plus a little isotropic noise, renormalized;
topic sizes follow a Zipf law. Queries come from the same distribution.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, dim: int, seed: int = 0, num_topics: int | None = None,
                      intrinsic_dim: int = 24, spread: float = 0.6, noise: float = 0.1,
                      chunk: int = 100_000, topic_seed: int = 1234) -> np.ndarray:
    """f32[n, dim] unit vectors; deterministic in (n, dim, seed, the shape knobs).

    The topics (centers and subspaces) depend on `topic_seed`, `num_topics`, `dim`
    and `intrinsic_dim` only, not on `seed`: queries drawn with another `seed` and
    the bank's `num_topics` come from the bank's topics.
    spread: norm of the within-topic variation relative to the unit center;
    noise: norm of the isotropic noise.
    """
    num_topics = num_topics or max(1, int(np.sqrt(n)))
    trng = np.random.default_rng([topic_seed, num_topics, dim, intrinsic_dim])
    centers = trng.standard_normal((num_topics, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = trng.standard_normal((num_topics, intrinsic_dim, dim)).astype(np.float32)
    bases *= spread / np.sqrt(dim * intrinsic_dim)
    weights = 1.0 / np.arange(1, num_topics + 1) ** 0.8
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        topic = rng.choice(num_topics, size=m, p=weights)
        z = rng.standard_normal((m, intrinsic_dim)).astype(np.float32)
        v = centers[topic]
        order = np.argsort(topic, kind="stable")
        bounds = np.flatnonzero(np.diff(topic[order])) + 1
        for rows in np.split(order, bounds):  # one matmul per topic present
            v[rows] += z[rows] @ bases[topic[rows[0]]]
        v += rng.standard_normal((m, dim)).astype(np.float32) * (noise / np.sqrt(dim))
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true top-k ids present in the found ids."""
    k = truth.shape[1]
    hits = [len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)
