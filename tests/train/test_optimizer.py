"""The optimizer: the schedule's shape, the decay mask, and AdamW + clipping against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cm3leon_jax.train import optimizer


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    lr = optimizer.learning_rate_schedule(peak_lr=1e-3, warmup_steps=10, decay="cosine",
                                          decay_steps=110, final_lr_fraction=0.1)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(60), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose([lr(110), lr(500)], [1e-4, 1e-4], rtol=1e-5)


def test_linear_and_constant_decay_and_the_trainers_length():
    linear = optimizer.learning_rate_schedule(peak_lr=2.0, warmup_steps=0, decay="linear",
                                              final_lr_fraction=0.0, total_steps=100)
    np.testing.assert_allclose([linear(0), linear(50), linear(100)], [2.0, 1.0, 0.0], atol=1e-6)
    constant = optimizer.learning_rate_schedule(peak_lr=2.0, warmup_steps=4, decay="constant")
    np.testing.assert_allclose([constant(2), constant(1000)], [1.0, 2.0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay="exp", total_steps=10), "decay='exp'"),
    (dict(decay="cosine"), "bind decay_steps"),
    (dict(final_lr_fraction=2.0, total_steps=10), "final_lr_fraction"),
])
def test_schedule_mistakes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizer.learning_rate_schedule(peak_lr=1e-3, **kwargs)


def test_decay_mask_spares_norm_scales_and_biases():
    params = {"layers": {"attention": {"query": {"kernel": 1.0},
                                       "query_norm": {"scale": 1.0, "bias": 0.0}},
                         "mlp_norm": {"scale": 1.0}},
              "token_embed": {"embedding": 1.0}}
    mask = optimizer.decay_mask(params)
    assert mask["layers"]["attention"]["query"]["kernel"] and mask["token_embed"]["embedding"]
    assert not mask["layers"]["attention"]["query_norm"]["scale"]
    assert not mask["layers"]["attention"]["query_norm"]["bias"]
    assert not mask["layers"]["mlp_norm"]["scale"]


def _torch_adamw(w0, grads, hp, clip: bool):
    tw = {k: torch.tensor(v["kernel"], requires_grad=True) for k, v in w0.items()}
    opt = torch.optim.AdamW(tw.values(), lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                            weight_decay=hp["wd"])
    for g in grads:
        for k, t in tw.items():
            t.grad = torch.tensor(g[k]["kernel"])
        if clip:
            torch.nn.utils.clip_grad_norm_(tw.values(), hp["clip"])
        opt.step()
    return {k: t.detach().numpy() for k, t in tw.items()}


def test_adamw_with_clipping_matches_pytorch():
    """Three updates of clip_grad_norm_ + torch.optim.AdamW equal ours to float32 precision."""
    rng = np.random.default_rng(0)
    w0 = {"a": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)},
          "b": {"kernel": rng.standard_normal((5,)).astype(np.float32)}}
    grads = [{k: {"kernel": 3.0 * rng.standard_normal(v["kernel"].shape).astype(np.float32)}
              for k, v in w0.items()} for _ in range(3)]
    hp = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-5, wd=0.1, clip=1.0)

    tx = optimizer.make_optimizer(optax.constant_schedule(hp["lr"]), b1=hp["b1"], b2=hp["b2"],
                                  eps=hp["eps"], weight_decay=hp["wd"], clip_norm=hp["clip"])
    params = jax.tree.map(jnp.asarray, w0)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)

    clipped, unclipped = _torch_adamw(w0, grads, hp, True), _torch_adamw(w0, grads, hp, False)
    for k in w0:
        ours = np.asarray(params[k]["kernel"])
        np.testing.assert_allclose(ours, clipped[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(ours, unclipped[k], rtol=1e-5, atol=1e-6)  # Clipping acted.
