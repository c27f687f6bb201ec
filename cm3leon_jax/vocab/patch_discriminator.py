"""PatchGAN discriminator and hinge losses for VQGAN training.

The discriminator (pix2pix's N-layer PatchGAN, as in taming-transformers) scores
overlapping patches as real or reconstructed; its adversarial term makes the
decoder produce texture instead of the blur that L1/L2 alone settle for. GroupNorm
replaces taming's BatchNorm so that there are no batch statistics to carry or
synchronize across devices.
"""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp


@gin.configurable
class PatchDiscriminator(nn.Module):
    """images f32[b, h, w, 3] in [-1, 1] -> logits f32[b, h', w'] (one per patch).

    Attributes:
      channels: width of the first layer; doubled per layer up to 8x.
      num_layers: stride-2 layers; the receptive field grows with it
        (3 layers: 70x70 patches).
      num_groups: GroupNorm groups.
    """

    channels: int = 64
    num_layers: int = 3
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(features, stride, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           name=name)

        def norm(features, name):
            return nn.GroupNorm(num_groups=min(self.num_groups, features), name=name)

        h = nn.leaky_relu(conv(self.channels, 2, "conv_0")(x), 0.2)
        for i in range(1, self.num_layers + 1):
            features = self.channels * min(2 ** i, 8)
            stride = 2 if i < self.num_layers else 1
            h = conv(features, stride, f"conv_{i}")(h)
            h = nn.leaky_relu(norm(features, f"norm_{i}")(h), 0.2)
        return conv(1, 1, "logits")(h)[..., 0]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss: push real logits above +1 and fake below -1."""
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator side of the hinge GAN: raise the discriminator's score of fakes."""
    return -jnp.mean(logits_fake)
