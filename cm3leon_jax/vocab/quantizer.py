"""Vector quantizer: the discrete bottleneck of the image tokenizer.

A latent vector `z` is replaced by its nearest codebook entry `e_k` and the
image is then described by the indices `k`. Training needs three things beyond
the lookup, all here:

- the straight-through estimator: the forward pass uses `e_k`, the backward pass
  copies the decoder's gradient onto `z` unchanged (`z + stop_gradient(e_k - z)`);
- the codebook and commitment losses of VQ-VAE:
  `codebook = |sg(z) - e_k|^2` pulls entries towards the encoder outputs,
  `commitment = |z - sg(e_k)|^2` (weighted by `beta`) keeps the encoder near them;
- dead-code restarts: entries that no latent picks for a while get no gradient
  and stay dead forever, so `restart_dead_codes` moves them onto random encoder
  outputs of the current batch (the usual remedy, e.g. Jukebox / Zeghidour et al.).

Two lookups: plain Euclidean (taming / Chameleon, needed for the released
weights) and l2-normalized (ViT-VQGAN: cosine distance, codes on the unit
sphere), which keeps usage high for large codebooks without restarts.

The module holds only the codebook; usage statistics and restarts are pure
functions on arrays so that the trainer owns all state.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class QuantizerOutput(NamedTuple):
    """What one quantization produces.

    Attributes:
      quantized: f32[..., dim]; the codebook entries with straight-through gradients
        to the input (already in the l2-normalized space when that lookup is on).
      codes: int32[...]; index of the chosen entry for every latent vector.
      codebook_loss: scalar; mean |sg(z) - e|^2, trains the codebook only.
      commitment_loss: scalar; mean |z - sg(e)|^2, trains the encoder only (unweighted).
      latents: f32[..., dim]; the input as the lookup saw it (normalized if l2).
    """

    quantized: jax.Array
    codes: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    latents: jax.Array


def nearest_codes(latents: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row for every latent vector.

    Args:
      latents: f32[..., dim].
      codebook: f32[codebook_size, dim].
    Returns:
      int32[...]. The [n, codebook_size] distance matrix is materialized: 8 images
      of 32x32 latents against 8192 codes is 256 MiB, fine on every target.
    """
    z = latents.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    # |z|^2 + |e|^2 - 2 z.e, the same expansion (and so the same rounding and
    # ties) as the reference implementations; HIGHEST keeps the dot product in
    # full f32 on TPU/GPU, where the default would round the inputs to bf16.
    d = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(codebook * codebook, axis=-1)
         - 2.0 * jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
    """Nearest-neighbor codebook lookup with a straight-through gradient.

    Attributes:
      codebook_size: number of entries K.
      codebook_dim: size D of every entry (the latent channels it quantizes).
      l2_normalize: look up by cosine distance among unit vectors (ViT-VQGAN)
        instead of plain Euclidean distance (taming / Chameleon).
    The parameter is `embedding: f32[K, D]`, named as in the released checkpoints.
    """

    codebook_size: int
    codebook_dim: int
    l2_normalize: bool = False

    def setup(self):
        k = self.codebook_size
        # taming's init: uniform(-1/K, 1/K). Tiny entries, but dead-code restarts
        # (or the l2 lookup) put them where the encoder outputs are within steps.
        self.embedding = self.param(
            "embedding",
            lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -1.0 / k, 1.0 / k),
            (self.codebook_size, self.codebook_dim))

    def codebook(self) -> jax.Array:
        """f32[K, D], normalized when the l2 lookup is on."""
        e = self.embedding
        return _l2_normalize(e) if self.l2_normalize else e

    def __call__(self, latents: jax.Array) -> QuantizerOutput:
        """Quantize `latents: f32[..., D]`."""
        if latents.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"latents have {latents.shape[-1]} channels but the codebook has dimension "
                f"{self.codebook_dim}; check VQGANConfig.embed_dim")
        z = latents.astype(jnp.float32)
        if self.l2_normalize:
            z = _l2_normalize(z)
        codebook = self.codebook()
        codes = nearest_codes(jax.lax.stop_gradient(z), jax.lax.stop_gradient(codebook))
        e = jnp.take(codebook, codes, axis=0)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
        commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        quantized = z + jax.lax.stop_gradient(e - z)
        return QuantizerOutput(quantized, codes, codebook_loss, commitment_loss, z)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codebook entries for `codes: int[...]` -> f32[..., D]."""
        return jnp.take(self.codebook(), codes, axis=0)


# ---------------------------------------------------------------------------
# Usage statistics and dead-code restarts: pure functions, state kept by the trainer.


def code_histogram(codes: jax.Array, codebook_size: int) -> jax.Array:
    """How often each code occurs in `codes: int[...]` -> f32[codebook_size]."""
    return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def update_usage(usage: jax.Array, codes: jax.Array, decay: float) -> jax.Array:
    """Exponential moving average of the fraction of latents that pick each code.

    Args:
      usage: f32[K], the running average (sums to about 1 once warmed up).
      codes: int[...], this step's codes.
      decay: weight of the past, e.g. 0.99.
    """
    counts = code_histogram(codes, usage.shape[0])
    return decay * usage + (1.0 - decay) * counts / jnp.maximum(counts.sum(), 1.0)


def codebook_stats(counts: jax.Array | np.ndarray) -> dict[str, jax.Array | np.ndarray]:
    """Usage of a codebook from code counts f32[K] (numpy in, numpy out: host-side
    logging compiles nothing).

    Returns:
      used_fraction: share of the K codes that occur at least once.
      perplexity: exp(entropy) of the code distribution; K when all codes are
        equally likely, 1 when one code takes everything.
    """
    xp = np if isinstance(counts, np.ndarray) else jnp
    p = counts / xp.maximum(counts.sum(), 1e-9)
    safe = xp.where(p > 0, p, 1.0)
    entropy = -xp.sum(xp.where(p > 0, p * xp.log(safe), 0.0))
    return {"used_fraction": xp.mean((counts > 0).astype(xp.float32)),
            "perplexity": xp.exp(entropy)}


def restart_dead_codes(
    embedding: jax.Array,
    usage: jax.Array,
    candidates: jax.Array,
    rng: jax.Array,
    threshold: float,
    noise: float = 0.01,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moves every dead codebook entry onto a random encoder output.

    A code is dead when its running usage is below `threshold / K` (i.e. it is
    picked `threshold` times less often than under uniform use). Its entry is
    replaced by a randomly chosen latent from `candidates` plus a little noise
    (so that two restarts on the same latent split apart), and its usage is reset
    to the uniform share so that it has time to be picked before it can die again.

    Args:
      embedding: f32[K, D], the raw codebook parameter.
      usage: f32[K], from `update_usage`.
      candidates: f32[N, D], encoder outputs of the current batch (pre-quantization,
        in the space the codebook lives in).
      rng: PRNG key.
      threshold: usage, in units of 1/K, under which a code counts as dead.
      noise: std of the perturbation, relative to the candidates' std.
    Returns:
      (new embedding, new usage, number of codes restarted: int32 scalar).
    """
    k = embedding.shape[0]
    dead = usage < (threshold / k)
    pick_rng, noise_rng = jax.random.split(rng)
    idx = jax.random.randint(pick_rng, (k,), 0, candidates.shape[0])
    picked = jnp.take(candidates.astype(embedding.dtype), idx, axis=0)
    scale = noise * jnp.std(candidates) + 1e-6
    picked = picked + scale * jax.random.normal(noise_rng, picked.shape, embedding.dtype)
    new_embedding = jnp.where(dead[:, None], picked, embedding)
    new_usage = jnp.where(dead, 1.0 / k, usage)
    return new_embedding, new_usage, jnp.sum(dead.astype(jnp.int32))
