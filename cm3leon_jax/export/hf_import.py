"""A Hugging Face folder (OPT or Chameleon, safetensors) -> our params and config.

    config, params, extras = read_hf("out/hf")

Reads what `hf_export.write_hf` writes, and any `transformers` folder of those two
architectures whose weights are safetensors (one `model.safetensors`, or shards listed
in `model.safetensors.index.json`). When the folder carries our own files
(`cm3leon_export.json`, `cm3leon_vocab/`, `vqgan.safetensors`) the import is exact:
the same DecoderConfig, vocabulary and image tokenizer (decoder included) come back.
Without them the DecoderConfig is derived from config.json (`hf_weights` decides
what is expressible); a Chameleon folder in Chameleon's own ids (transformers'
conversion of the release: `tokenizer.json` with IMGIMG tokens) has its token rows
permuted onto our layout and its vocabulary written (`chameleon_vocab.py`). Its VQ
model is the encoder only (transformers drops the decoder), so no image tokenizer
comes with it: import the release itself (`chameleon_release.py`) to draw images.
"""

from __future__ import annotations

import json
from typing import Any

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.export import hf_export
from cm3leon_jax.model import hf_weights
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.vocab import chameleon_vqgan_weights as vq_weights
from cm3leon_jax.vocab.vqgan import VQGANConfig

INDEX = "model.safetensors.index.json"
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_json(path: str) -> dict[str, Any]:
    if not fs.exists(path):
        raise MissingInputError(f"{path}: missing.")
    with fs.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}: not valid JSON ({e}).") from None


def is_hf_folder(path: str) -> bool:
    """Whether `path` holds a transformers config.json of a model this reads, or one that is
    not JSON at all (cut short: `read_hf` then names it, rather than the folder being taken
    for no layout)."""
    cfg = f"{path}/{hf_export.CONFIG}"
    if not fs.exists(cfg):
        return False
    try:
        with fs.open(cfg) as f:
            found = json.load(f)
    except ValueError:  # Not JSON (cut short, or not text).
        return True
    return isinstance(found, dict) and found.get("model_type") in ("opt", "chameleon")


def _family(hf: dict[str, Any], where: str) -> str:
    family = hf.get("model_type")
    if family not in ("opt", "chameleon"):
        raise UserInputError(f"{where}: model_type {family!r}; only 'opt' (CM3Leon) and "
                             "'chameleon' folders can be imported.")
    return family


def config_from_hf(hf: dict[str, Any], where: str) -> DecoderConfig:
    """The DecoderConfig that a transformers config.json describes."""
    family = _family(hf, where)
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "ffn_dim" if family == "opt" else "intermediate_size"]
    missing = [k for k in need if not isinstance(hf.get(k), int) or hf[k] < 1]
    if missing:
        raise UserInputError(f"{where}: {missing} missing or not a positive integer; a "
                             f"transformers {family!r} config.json names them all.")
    dtype = _DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "float32")
    common = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                  num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                  max_length=hf.get("max_position_embeddings", 4096),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", family == "opt")),
                  param_dtype=dtype)
    if family == "opt":
        bad = {k: hf.get(k) for k, ok in (("enable_bias", False), ("do_layer_norm_before", True))
               if hf.get(k, ok) != ok}
        if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
            bad["word_embed_proj_dim"] = hf["word_embed_proj_dim"]
        act = hf.get("activation_function", "relu")
        if act not in _ACTIVATIONS:
            bad["activation_function"] = act
        if bad:
            raise UserInputError(f"{where}: this OPT model has {bad}; the CM3Leon decoder is "
                                 "pre-norm with no biases, a projection-free embedding and "
                                 "GELU/ReLU.")
        return DecoderConfig(**common, mlp_dim=hf["ffn_dim"], norm="layernorm",
                             norm_params=bool(hf.get("layer_norm_elementwise_affine", True)),
                             mlp_activation=_ACTIVATIONS[act])
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    got = {"rope_parameters.rope_type": rope.get("rope_type", "default"),
           "rope_scaling": scaling.get("rope_type", scaling.get("type", "default")),
           "hidden_act": hf.get("hidden_act", "silu")}
    bad = {k: v for k, v in got.items() if v != ("silu" if k == "hidden_act" else "default")}
    if bad:
        raise UserInputError(f"{where}: this Chameleon model has {bad}; the decoder computes "
                             "plain (unscaled) rotary positions and a SiLU-gated MLP, so it "
                             "would load with other logits.")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return DecoderConfig(**common, mlp_dim=hf["intermediate_size"],
                         num_kv_heads=hf.get("num_key_value_heads"), norm="rmsnorm",
                         norm_params=True, norm_eps=hf.get("rms_norm_eps", 1e-5),
                         mlp_activation="silu", gated_mlp=True, position_embedding="rope",
                         rope_theta=float(theta), qk_norm=True,
                         block_order="swin" if hf.get("swin_norm") else "pre")


def read_weights(path: str) -> dict[str, Any]:
    """Every tensor of the folder's safetensors file(s), by name."""
    single, index = f"{path}/{hf_export.WEIGHTS}", f"{path}/{INDEX}"
    if fs.exists(single):
        return fs.read_safetensors(single)
    if not fs.exists(index):
        raise MissingInputError(f"{path}: neither {hf_export.WEIGHTS} nor {INDEX}; only "
                                "safetensors weights are read (convert .bin files first).")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserInputError(f"{path}/{INDEX}: no \"weight_map\" of tensor names to shard "
                             "files; write or download the folder again.")
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update(fs.read_safetensors(f"{path}/{shard}"))  # Names a missing shard.
    return out


def read_image_tokenizer(path: str) -> tuple[VQGANConfig, Any] | None:
    """The whole VQGAN saved beside the model (`vqgan.safetensors`), or None."""
    weights = f"{path}/{hf_export.VQGAN}"
    if not fs.exists(weights):
        return None
    cfg = VQGANConfig.from_dict(read_json(f"{path}/{hf_export.VQGAN_CONFIG}"))
    state = fs.read_safetensors(weights)  # A damaged file: its own error names it.
    try:
        params, cfg = vq_weights.params_from_state_dict(state, cfg)
    except ValueError as e:
        raise UserInputError(f"{weights}: {e}") from None
    return cfg, params


def _chameleon_ids_vocab(path: str, hf: dict[str, Any]):
    """For a transformers Chameleon folder in Chameleon's own ids (facebook/chameleon-7b's
    layout: tokenizer.json with IMGIMG tokens, no cm3leon_vocab/): the vocabulary mapping
    onto our layout (`chameleon_vocab.py`), or None for a folder of ours."""
    tokenizer = f"{path}/tokenizer.json"
    if hf.get("model_type") != "chameleon":
        return None
    if not fs.exists(tokenizer):
        # transformers' record of Chameleon's own ids maps text pieces too; the one our
        # exports write names only image codes (IMGIMG...Z) and <image>.
        names = hf.get("vocabulary_map") or {}
        if any(not (k == "<image>" or k.startswith("IMGIMG")) for k in names):
            raise UserInputError(
                f"{path} is a Chameleon folder in Chameleon's own token ids (config.json has "
                "a vocabulary_map) without its tokenizer.json, which says how those ids map "
                "onto ours: put the tokenizer.json it was released with beside the weights.")
        return None
    from cm3leon_jax.export import chameleon_vocab
    model = read_json(tokenizer).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        # Chameleon's own is a BPE file (a vocab mapping, IMGIMG image tokens); ours, the
        # SentencePiece model's, is not.
        raise UserInputError(
            f"{path} is a Chameleon folder whose tokenizer.json is not Chameleon's own (no "
            f"BPE vocab mapping) and that has no {hf_export.VOCAB}/ or {hf_export.OURS}: a "
            "cm3leon-jax export with its side files dropped? Keep them beside the weights "
            "(they say how its ids are laid out), or import the folder they came with.")
    vq = hf.get("vq_config") or {}
    side = vq.get("resolution", 512) // 2 ** (len(vq.get("channel_multiplier", [1] * 5)) - 1)
    with fs.open(tokenizer, "rb") as f:
        return chameleon_vocab.build(f.read(), side * side, tokenizer)


# config.json's sizes that our record (cm3leon_export.json) decides too.
_SIZES = {"vocab_size": "vocab_size", "hidden_size": "d_model",
          "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
          "num_key_value_heads": "kv_heads", "ffn_dim": "mlp_dim",
          "intermediate_size": "mlp_dim", "max_position_embeddings": "max_length"}


def _check_sizes_agree(hf: dict[str, Any], config: DecoderConfig, hf_path: str,
                       ours: str) -> None:
    """A folder whose config.json and our record disagree on a size (one edited, or weights
    of another model put beside the record) is refused naming both: transformers reads the
    one, this import the other."""
    for key, field in _SIZES.items():
        if key in hf and hf[key] != getattr(config, field):
            raise UserInputError(
                f"{hf_path} says {key}={hf[key]!r} and {ours} says {field}="
                f"{getattr(config, field)!r}: the two records of one model disagree; export "
                "the model again, or remove the one that is not the weights'.")


def read_hf(path: str) -> tuple[DecoderConfig, Any, dict[str, Any]]:
    """(config, params, extras) of a HF folder; extras: vocab_dir, image_tokenizer, step."""
    path = path.rstrip("/")
    hf = read_json(f"{path}/{hf_export.CONFIG}")
    family = _family(hf, f"{path}/{hf_export.CONFIG}")
    ours = f"{path}/{hf_export.OURS}"
    meta = read_json(ours) if fs.exists(ours) else {}
    vocab = None
    if meta:
        if not isinstance(meta, dict) or "decoder_config" not in meta:
            raise UserInputError(f"{ours} holds no decoder_config: not a cm3leon-jax export's "
                                 "record (cut short?); export the model again.")
        config = pc.config_from_dict(meta["decoder_config"], ours)
        _check_sizes_agree(hf, config, f"{path}/{hf_export.CONFIG}", ours)
    else:
        config = config_from_hf(hf, f"{path}/{hf_export.CONFIG}")
        if not fs.isdir(f"{path}/{hf_export.VOCAB}"):
            vocab = _chameleon_ids_vocab(path, hf)
    state_dict = read_weights(path)
    if vocab is not None:  # Permute its token rows onto our layout.
        from cm3leon_jax.export import chameleon_vocab
        config = config.replace(vocab_size=vocab.layout.vocab_size)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in state_dict:
                state_dict[key] = chameleon_vocab.take_rows(state_dict[key], vocab.source_ids,
                                                            f"{path}: {key}")
    try:
        params = hf_weights.from_hf(state_dict, config, family)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise UserInputError(f"{path}: {msg}") from None
    vocab_dir = f"{path}/{hf_export.VOCAB}"
    extras = {"vocab_dir": vocab_dir if fs.isdir(vocab_dir) else None,
              "write_vocab": vocab.write if vocab is not None else None,
              "image_tokenizer": read_image_tokenizer(path), "step": meta.get("step"),
              "family": family}
    return config, params, extras
