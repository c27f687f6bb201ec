"""Decoder weights <-> `transformers` state dicts (OPT for CM3Leon, Chameleon for the successor).

    sd = to_hf(params, config, "opt")              # {"model.decoder.layers.0.fc1.weight": ...}
    params = from_hf(sd, config, "chameleon")      # the nested tree `Decoder` reads
    kwargs = hf_config_kwargs(config, "opt")       # transformers.OPTConfig(**kwargs)

The same tables serve the parity tests and the export/import of checkpoints. Arrays
are numpy (no torch or transformers import here); `from_hf` accepts anything
`np.asarray` reads, torch CPU tensors included.

Layouts. Ours: matrices are `[in..., out...]` with heads as their own axis
(`query.kernel [embed, heads, head_dim]`) and layers stacked on a leading axis.
`transformers`: one `[out, in]` matrix per layer with heads flattened. OPT's position
table has 2 extra leading rows (its `padding_idx` offset), exported as zeros.

Families:
    "opt": `OPTForCausalLM` with `enable_bias=False` and
        `layer_norm_elementwise_affine=False` (CM3Leon: LayerNorm without parameters,
        pre-norm, GELU, learned positions; norm_params=True maps to affine norms).
    "chameleon": `ChameleonForConditionalGeneration`'s text decoder (RMSNorm,
        SwiGLU, RoPE, QK-norm, optional swin-norm and GQA). Its `vqmodel.*` weights
        are not the decoder's and are ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.model.decoder import abstract_variables

FAMILIES = ("opt", "chameleon")
_OPT_POSITION_OFFSET = 2
_IGNORED_PREFIXES = {"opt": (), "chameleon": ("model.vqmodel.",)}


@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_key: str            # May contain "{i}" for the layer index.
    path: tuple[str, ...]  # Into our params tree.
    kind: str              # "copy", "linear" or "opt_positions".
    in_ndim: int = 1       # For "linear": how many leading axes of our kernel are inputs.

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key


def check_expressible(config: DecoderConfig, family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"hf_weights: family={family!r}; choose one of {FAMILIES}.")
    want = {
        "opt": dict(norm="layernorm", block_order="pre", gated_mlp=False,
                    position_embedding="learned", qk_norm=False),
        "chameleon": dict(norm="rmsnorm", norm_params=True, gated_mlp=True,
                          mlp_activation="silu", position_embedding="rope", qk_norm=True),
    }[family]
    bad = {k: getattr(config, k) for k, v in want.items() if getattr(config, k) != v}
    if family == "opt" and (config.kv_heads != config.num_heads):
        bad["num_kv_heads"] = config.num_kv_heads
    if config.dims_per_head * config.num_heads != config.d_model:
        bad["head_dim"] = config.head_dim  # Both HF models derive it as d_model // heads.
    if config.image_grid:
        bad["image_grid"] = config.image_grid  # Neither HF model has image place embeddings.
    if bad:
        raise UserInputError(f"this DecoderConfig cannot be expressed as a transformers "
                             f"{family!r} model; it needs {want} (and head_dim = d_model / "
                             f"num_heads, image_grid = 0), but has {bad}: export it in the "
                             "params layout (export.layout='params') instead.")


def _entries(config: DecoderConfig, family: str) -> list[_Entry]:
    check_expressible(config, family)
    lin, cp = "linear", "copy"
    if family == "opt":
        p, layer = "model.decoder.", "model.decoder.layers.{i}."
        out = [_Entry(p + "embed_tokens.weight", ("token_embed", "embedding"), cp),
               _Entry(p + "embed_positions.weight", ("position_embed", "embedding"),
                      "opt_positions")]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out.append(_Entry(layer + f"self_attn.{theirs}.weight",
                              ("layers", "attention", ours, "kernel"), lin, 1))
        out += [
            _Entry(
                layer + "self_attn.out_proj.weight",
                ("layers", "attention", "out", "kernel"),
                lin,
                2,
            ),
            _Entry(layer + "fc1.weight", ("layers", "mlp", "wi", "kernel"), lin, 1),
            _Entry(layer + "fc2.weight", ("layers", "mlp", "wo", "kernel"), lin, 1),
        ]
        norms = [(layer + "self_attn_layer_norm", ("layers", "attention_norm")),
                 (layer + "final_layer_norm", ("layers", "mlp_norm")),
                 (p + "final_layer_norm", ("final_norm",))]
        if config.norm_params:
            for theirs, ours in norms:
                out += [_Entry(theirs + ".weight", ours + ("scale",), cp),
                        _Entry(theirs + ".bias", ours + ("bias",), cp)]
    else:
        p, layer = "model.", "model.layers.{i}."
        out = [_Entry(p + "embed_tokens.weight", ("token_embed", "embedding"), cp),
               _Entry(p + "norm.weight", ("final_norm", "scale"), cp)]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out.append(_Entry(layer + f"self_attn.{theirs}.weight",
                              ("layers", "attention", ours, "kernel"), lin, 1))
        out.append(
            _Entry(
                layer + "self_attn.o_proj.weight", ("layers", "attention", "out", "kernel"), lin, 2
            )
        )
        for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
            for param, hf_param in (("scale", "weight"), ("bias", "bias")):
                out.append(_Entry(layer + f"self_attn.{theirs}.{hf_param}",
                                  ("layers", "attention", ours, param), cp))
        out += [
            _Entry(layer + "mlp.gate_proj.weight", ("layers", "mlp", "wi_gate", "kernel"), lin, 1),
            _Entry(layer + "mlp.up_proj.weight", ("layers", "mlp", "wi_up", "kernel"), lin, 1),
            _Entry(layer + "mlp.down_proj.weight", ("layers", "mlp", "wo", "kernel"), lin, 1),
            _Entry(layer + "input_layernorm.weight", ("layers", "attention_norm", "scale"), cp),
            _Entry(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), cp),
        ]
    if not config.tie_embeddings:
        out.append(_Entry("lm_head.weight", ("lm_head", "kernel"), lin, 1))
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _to_hf_one(x: np.ndarray, e: _Entry) -> np.ndarray:
    if e.kind == "linear":  # [in..., out...] -> [out, in]
        return x.reshape(math.prod(x.shape[:e.in_ndim]), -1).T
    if e.kind == "opt_positions":
        return np.concatenate([np.zeros((_OPT_POSITION_OFFSET, x.shape[1]), x.dtype), x])
    return x


def _from_hf_one(w: np.ndarray, e: _Entry, shape: tuple[int, ...]) -> np.ndarray:
    if e.kind == "linear":
        return w.T.reshape(shape)
    if e.kind == "opt_positions":
        return w[_OPT_POSITION_OFFSET:_OPT_POSITION_OFFSET + shape[0]]
    return w.reshape(shape)


def to_hf(params: Any, config: DecoderConfig, family: str) -> dict[str, np.ndarray]:
    """Our params (boxed or not, jax or numpy) -> a `transformers` state dict of numpy arrays.

    A tied model also gets `lm_head.weight` (= the token embedding), as the HF
    state dict of a tied model lists it.
    """
    params = nn.unbox(params)
    params = params.get("params", params)
    out = {}
    for e in _entries(config, family):
        value = np.asarray(_get(params, e.path))
        if e.per_layer:
            for i in range(config.num_layers):
                out[e.hf_key.format(i=i)] = _to_hf_one(value[i], e)
        else:
            out[e.hf_key] = _to_hf_one(value, e)
    if config.tie_embeddings:
        out["lm_head.weight"] = out[_entries(config, family)[0].hf_key]
    return out


def from_hf(state_dict: Mapping[str, Any], config: DecoderConfig, family: str) -> dict:
    """A `transformers` state dict -> our (unboxed) params tree of numpy arrays.

    Raises on missing keys, unexpected keys (other than the family's ignored ones,
    e.g. Chameleon's `vqmodel.*`) and shape mismatches, naming the key.
    """
    shapes = nn.unbox(abstract_variables(config)["params"])
    entries = _entries(config, family)
    used, params = set(), {}
    if config.tie_embeddings:
        used.add("lm_head.weight")  # Tied: the embedding is read from embed_tokens.
    for e in entries:
        shape = tuple(_get(shapes, e.path).shape)
        layer_shape = shape[1:] if e.per_layer else shape
        keys = (
            [e.hf_key.format(i=i) for i in range(config.num_layers)] if e.per_layer else [e.hf_key]
        )
        values = []
        for key in keys:
            if key not in state_dict:
                raise KeyError(
                    f"from_hf({family}): state dict lacks {key!r} (for {'/'.join(e.path)})."
                )
            w = np.asarray(state_dict[key].detach().float().numpy()
                           if hasattr(state_dict[key], "detach") else state_dict[key])
            want = _to_hf_one(np.zeros(layer_shape, np.float32), e).shape
            if e.kind == "opt_positions":
                ok = w.shape[1:] == want[1:] and w.shape[0] >= want[0]
            else:
                ok = w.shape == want
            if not ok:
                raise ValueError(f"from_hf({family}): {key!r} has shape {w.shape}; this "
                                 f"DecoderConfig expects {want}.")
            values.append(_from_hf_one(w, e, layer_shape))
            used.add(key)
        _set(params, e.path, np.stack(values) if e.per_layer else values[0])
    unexpected = [k for k in state_dict if k not in used
                  and not k.startswith(_IGNORED_PREFIXES[family])]
    if unexpected:
        raise ValueError(f"from_hf({family}): keys with no place in this DecoderConfig: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}.")
    return params


def hf_config_kwargs(config: DecoderConfig, family: str) -> dict[str, Any]:
    """Keyword arguments of `transformers.OPTConfig` / `ChameleonConfig` for this config."""
    check_expressible(config, family)
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  max_position_embeddings=config.max_length,
                  tie_word_embeddings=config.tie_embeddings)
    if family == "opt":
        if config.norm_eps != 1e-5:
            raise ValueError("hf_weights: OPT's LayerNorm eps is fixed at 1e-5; "
                             f"DecoderConfig.norm_eps={config.norm_eps}.")
        return dict(common, ffn_dim=config.mlp_dim, do_layer_norm_before=True,
                    enable_bias=False, layer_norm_elementwise_affine=config.norm_params,
                    activation_function=config.mlp_activation.replace("gelu_tanh", "gelu_new"),
                    word_embed_proj_dim=config.d_model, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0)
    return dict(common, intermediate_size=config.mlp_dim, num_key_value_heads=config.kv_heads,
                rms_norm_eps=config.norm_eps, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                swin_norm=config.block_order == "swin", attention_bias=False, mlp_bias=False,
                vocabulary_map={})
