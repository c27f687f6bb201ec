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


def _axes(config):
    from cm3leon_jax.train import state as state_lib
    return state_lib.param_axes(config)


def _dims_by_name(config) -> dict[str, tuple | None]:
    dims = optimizer.muon_dimensions(_axes(config))
    flat = jax.tree_util.tree_leaves_with_path(
        dims, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))
    return {"/".join(k.key for k in path): d if d is None else (d.reduction_axis, d.output_axis)
            for path, d in flat}


def test_muon_takes_the_layers_projection_matrices_and_leaves_the_rest_to_adamw():
    from train_testlib import tiny_config

    cm3leon = _dims_by_name(tiny_config())
    assert cm3leon == {
        "layers/attention/query/kernel": (1, (2, 3)),  # [layers, embed, heads, kv]
        "layers/attention/key/kernel": (1, (2, 3)),
        "layers/attention/value/kernel": (1, (2, 3)),
        "layers/attention/out/kernel": ((1, 2), 3),  # [layers, heads, kv, embed]
        "layers/mlp/wi/kernel": (1, (2,)),  # [layers, embed, mlp]
        "layers/mlp/wo/kernel": ((1,), 2),  # [layers, mlp, embed]
        "token_embed/embedding": None, "position_embed/embedding": None}
    chameleon = _dims_by_name(tiny_config(
        norm="rmsnorm", norm_params=True, gated_mlp=True, mlp_activation="silu",
        position_embedding="rope", qk_norm=True, num_kv_heads=2, tie_embeddings=False))
    matrices = {k for k, d in chameleon.items() if d is not None}
    assert matrices == {f"layers/attention/{p}/kernel" for p in ("query", "key", "value", "out")} \
        | {f"layers/mlp/{p}/kernel" for p in ("wi_gate", "wi_up", "wo")}
    assert chameleon["lm_head/kernel"] is None  # [embed, vocab]: an output head, AdamW's.
    assert chameleon["layers/attention/query_norm/scale"] is None


def _newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """float64 reference of the quintic iteration Muon uses (coefficients of Jordan 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(np.linalg.norm(x), 1e-8)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_muon_first_update_matches_pytorch_and_reference_per_layer_and_adamw_elsewhere():
    """One update of `make_optimizer(kind='muon')` on a decoder-shaped tree: each layer's
    [embed, heads * kv] query matrix moves as torch.optim.Muon (AdamW's RMS) and a float64
    Newton-Schulz say, independently of the other layer; the embedding moves as AdamW."""
    from train_testlib import tiny_config

    config = tiny_config(num_layers=2)
    axes = _axes(config)
    rng = np.random.default_rng(0)
    from flax import linen as nn

    from cm3leon_jax.model.decoder import abstract_variables
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1,
                          nn.unbox(abstract_variables(config)["params"]))
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    lr, wd = 0.01, 0.1
    tx = optimizer.make_optimizer(optax.constant_schedule(lr), kind="muon", weight_decay=wd,
                                  eps=1e-5, clip_norm=0, param_axes=axes)
    updates, _ = tx.update(grads, tx.init(params), params)
    query = np.asarray(updates["layers"]["attention"]["query"]["kernel"])  # [L, E, H, K]
    layers, embed = query.shape[:2]
    for layer in range(layers):
        w = params["layers"]["attention"]["query"]["kernel"][layer].reshape(embed, -1)
        g = grads["layers"]["attention"]["query"]["kernel"][layer].reshape(embed, -1)
        ours = query[layer].reshape(embed, -1)
        expected = -lr * (0.2 * np.sqrt(max(g.shape)) * _newton_schulz(g.astype(np.float64))
                          + wd * w)
        np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=1e-6)
        tw = torch.tensor(w.T.copy(), requires_grad=True)  # torch's [out, in] layout
        muon = torch.optim.Muon([tw], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
        tw.grad = torch.tensor(g.T.copy())
        muon.step()
        # torch runs the iteration in bfloat16: agreement to its precision.
        delta = tw.detach().numpy().T - w
        assert np.abs(delta - ours).max() < 0.02 * np.abs(ours).max()
    # Layer 0's update does not see layer 1's gradient.
    grads2 = jax.tree.map(lambda g: g.copy(), grads)
    grads2["layers"]["attention"]["query"]["kernel"][1] *= -3.0
    updates2, _ = tx.update(grads2, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates2["layers"]["attention"]["query"]["kernel"][0]),
                                  query[0])
    # The embedding: AdamW's update (to float rounding: the partition's program differs).
    adam = optimizer.adamw(optax.constant_schedule(lr), eps=1e-5, weight_decay=wd, clip_norm=0)
    embed_only = {"token_embed": params["token_embed"]}
    expected, _ = adam.update({"token_embed": grads["token_embed"]}, adam.init(embed_only),
                              embed_only)
    np.testing.assert_allclose(np.asarray(updates["token_embed"]["embedding"]),
                               np.asarray(expected["token_embed"]["embedding"]), rtol=1e-6)


def test_muon_mistakes_are_clear_errors():
    schedule = optax.constant_schedule(1e-3)
    with pytest.raises(ValueError, match="kind='sgd'; choose one of"):
        optimizer.make_optimizer(schedule, kind="sgd")
    with pytest.raises(ValueError, match="needs the parameters' logical axes"):
        optimizer.make_optimizer(schedule, kind="muon")
    spec = jax.sharding.PartitionSpec
    with pytest.raises(ValueError, match="no parameter is a matrix for Muon"):
        optimizer.make_optimizer(schedule, kind="muon",
                                 param_axes={"token_embed": {"embedding": spec("vocab", "embed")}})
    with pytest.raises(ValueError, match="momentum < 1"):
        optimizer.make_optimizer(schedule, kind="muon", muon_momentum=1.0,
                                 param_axes={"w": {"kernel": spec("embed", "mlp")}})
