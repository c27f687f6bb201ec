"""Shared pieces of the decoder tests: configs from the gin files, random params, batches.

Freshly initialized params are a poor test input: output projections start at zero,
so attention and MLP would not influence the logits at all. `random_params` gives
every weight a random value of a reasonable scale instead.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import Decoder, abstract_variables

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN_MODELS = os.path.join(REPO, "gin_configs", "models")

# The successor's switches, applied to any size.
CHAMELEON_SWITCHES = dict(norm="rmsnorm", norm_params=True, mlp_activation="silu",
                          gated_mlp=True, position_embedding="rope", qk_norm=True,
                          tie_embeddings=False)


def config_from_gin(name: str) -> DecoderConfig:
    """`DecoderConfig()` as bound by gin_configs/models/<name>.gin (gin state restored)."""
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(GIN_MODELS, f"{name}.gin"))
        return DecoderConfig()
    finally:
        gin.clear_config()


@functools.lru_cache(maxsize=None)
def tiny_config(**changes) -> DecoderConfig:
    """The tiny.gin config, with `changes` applied."""
    return config_from_gin("tiny").replace(**changes)


def tiny_chameleon(**changes) -> DecoderConfig:
    """tiny.gin with the successor's switches (and GQA: 2 kv heads for 4 query heads)."""
    return tiny_config(**dict(CHAMELEON_SWITCHES, num_kv_heads=2, **changes))


def random_params(config: DecoderConfig, seed: int = 0) -> dict:
    """Every parameter random: matrices ~ N(0, 1/fan_in-ish), norm scales ~ 1 + N(0, 0.1)."""
    shapes = nn.unbox(abstract_variables(config)["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name.endswith("['bias']"):
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) / np.sqrt(config.d_model)
        out.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0,
                 segments_per_row: int = 3) -> dict[str, jax.Array]:
    """Random tokens packed into several segments per row, with trailing padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, length))
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, length - 2), segments_per_row, replace=False))
        start = 0
        for s, end in enumerate(cuts, start=1):
            seg[b, start:end] = s
            pos[b, start:end] = np.arange(end - start)
            start = end
        tokens[b, start:] = 0  # The tail is padding: segment 0.
    targets = np.roll(tokens, -1, axis=1)
    weights = (seg > 0).astype(np.float32)
    return {"decoder_input_tokens": jnp.asarray(tokens, jnp.int32),
            "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
            "decoder_loss_weights": jnp.asarray(weights),
            "decoder_segment_ids": jnp.asarray(seg),
            "decoder_positions": jnp.asarray(pos)}


@functools.lru_cache(maxsize=None)
def forward(config: DecoderConfig):
    """A jitted `Decoder(config).apply({"params": p}, tokens, segment_ids, positions)`."""
    model = Decoder(config)
    return jax.jit(lambda p, t, s=None, pos=None: model.apply({"params": p}, t, s, pos))


class DataPosition:
    """The trainer saves its data iterator beside the state; readers of params never look."""

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "position.txt"), "w") as f:
            f.write("0")

    def restore(self, directory):
        pass


def write_run_config(model_dir: str, config: DecoderConfig) -> None:
    """MODEL_DIR/config.gin binding `config`, in the form the command line writes for a run
    (the sizes generate / eval / export runs read back: cm3leon_jax/train/run_config.py).
    Written as text: a fixture must not disturb the session's gin state."""
    os.makedirs(model_dir, exist_ok=True)
    lines = [f"DecoderConfig.{k} = {v!r}" for k, v in dataclasses.asdict(config).items()]
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write("# Parameters for DecoderConfig:\n" + "\n".join(lines) + "\n")


def write_train_checkpoints(checkpoint_dir: str, config: DecoderConfig,
                            steps: tuple[int, ...]) -> dict:
    """A training run's checkpoints, written by the trainer's own Checkpointer: at each
    step, random params (seed = step) with a fresh Adam state. Returns {step: TrainState}."""
    from cm3leon_jax.train import checkpoints, optimizer
    from cm3leon_jax.train import state as state_lib

    tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 1, decay_steps=4))
    ckpt = checkpoints.Checkpointer(checkpoint_dir, save_every=1, async_save=False)
    states = {}
    for step in steps:
        params = random_params(config, seed=step)
        states[step] = state_lib.TrainState(step=jnp.int32(step), params=params,
                                            opt_state=tx.init(params))
        ckpt.save(step, states[step], DataPosition())
    ckpt.close()
    return states
