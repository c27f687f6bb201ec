"""CLIP weights in the Hugging Face layout (safetensors) <-> this package's Flax params.

    cfg, params = load_hf_checkpoint("clip-vit-base-patch32/")  # config.json + *.safetensors
    save_hf_checkpoint("runs/clip_tiny/encoder", cfg, params)  # the same layout back

A checkpoint directory is what `CLIPModel.save_pretrained` writes: `config.json`
and one or more `*.safetensors` files. The tiny encoder trained here is saved in
that layout as well, so one loader serves both and `transformers` can open ours.
Nothing is downloaded: point the loader at a directory you already have. The folder
may be on any file system `fs.py` knows (`gs://...`): files are read and written as
bytes through it, never by local path.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np
from flax import traverse_util

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError
from cm3leon_jax.retrieval.clip import ClipConfig

# Each entry: (HF name, flax path, HF -> flax array transform). Linear weights are
# [out, in] in torch and [in, out] in flax; the patch conv is OIHW vs HWIO.
_T = lambda a: a.T
_ID = lambda a: a
_CONV = lambda a: a.transpose(2, 3, 1, 0)
_INVERSE = {id(_T): _T, id(_ID): _ID, id(_CONV): lambda a: a.transpose(3, 2, 0, 1)}


def _layer_entries(hf: str, flax: str) -> Iterator[tuple[str, str, Callable]]:
    for hf_name, ours in (("self_attn.q_proj", "attn/q"), ("self_attn.k_proj", "attn/k"),
                          ("self_attn.v_proj", "attn/v"), ("self_attn.out_proj", "attn/out"),
                          ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
        yield f"{hf}.{hf_name}.weight", f"{flax}/{ours}/kernel", _T
        yield f"{hf}.{hf_name}.bias", f"{flax}/{ours}/bias", _ID
    for hf_name, ours in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
        yield f"{hf}.{hf_name}.weight", f"{flax}/{ours}/scale", _ID
        yield f"{hf}.{hf_name}.bias", f"{flax}/{ours}/bias", _ID


def _norm(hf: str, flax: str):
    return [(f"{hf}.weight", f"{flax}/scale", _ID), (f"{hf}.bias", f"{flax}/bias", _ID)]


def name_map(cfg: ClipConfig) -> list[tuple[str, str, Callable]]:
    """Every parameter of `cfg` as (HF name, flax path, HF -> flax transform)."""
    v, t = "vision_model", "text_model"
    entries = [
        (f"{v}.embeddings.class_embedding", "vision/class_embedding", _ID),
        (f"{v}.embeddings.patch_embedding.weight", "vision/patch_embed/kernel", _CONV),
        (f"{v}.embeddings.position_embedding.weight", "vision/position_embedding", _ID),
        *_norm(f"{v}.pre_layrnorm", "vision/pre_ln"),
        *_norm(f"{v}.post_layernorm", "vision/post_ln"),
        (f"{t}.embeddings.token_embedding.weight", "text/token_embedding/embedding", _ID),
        (f"{t}.embeddings.position_embedding.weight", "text/position_embedding", _ID),
        *_norm(f"{t}.final_layer_norm", "text/final_ln"),
        ("visual_projection.weight", "visual_projection/kernel", _T),
        ("text_projection.weight", "text_projection/kernel", _T),
        ("logit_scale", "logit_scale", _ID),
    ]
    for i in range(cfg.vision_layers):
        entries += _layer_entries(f"{v}.encoder.layers.{i}", f"vision/layer_{i}")
    for i in range(cfg.text_layers):
        entries += _layer_entries(f"{t}.encoder.layers.{i}", f"text/layer_{i}")
    return entries


def config_from_hf(hf: dict) -> ClipConfig:
    """`CLIPConfig.to_dict()` (config.json) -> ClipConfig; missing keys take HF's defaults."""
    if "vision_config" not in hf and "text_config" not in hf:
        raise ValueError("config.json has no vision_config/text_config: this is not a "
                         "CLIPModel checkpoint (a CLIPVisionModel or CLIPTextModel alone "
                         "cannot be imported).")
    d = ClipConfig()
    vc, tc = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if tc.get("hidden_act", "quick_gelu") != vc.get("hidden_act", "quick_gelu"):
        raise ValueError("the text and vision towers use different activations "
                         f"({tc.get('hidden_act')} vs {vc.get('hidden_act')}); not supported.")
    vocab = tc.get("vocab_size", d.vocab_size)
    eos = tc.get("eos_token_id", d.eos_token_id)
    if eos == 2:  # configs before transformers#24773 stored 2; the real eos is the last id
        eos = vocab - 1
    return ClipConfig(
        image_size=vc.get("image_size", d.image_size),
        patch_size=vc.get("patch_size", d.patch_size),
        vision_width=vc.get("hidden_size", d.vision_width),
        vision_layers=vc.get("num_hidden_layers", d.vision_layers),
        vision_heads=vc.get("num_attention_heads", d.vision_heads),
        vision_mlp=vc.get("intermediate_size", d.vision_mlp),
        vocab_size=vocab,
        context_length=tc.get("max_position_embeddings", d.context_length),
        text_width=tc.get("hidden_size", d.text_width),
        text_layers=tc.get("num_hidden_layers", d.text_layers),
        text_heads=tc.get("num_attention_heads", d.text_heads),
        text_mlp=tc.get("intermediate_size", d.text_mlp),
        eos_token_id=eos,
        projection_dim=hf.get("projection_dim", d.projection_dim),
        activation=tc.get("hidden_act", d.activation),
        layer_norm_eps=tc.get("layer_norm_eps", d.layer_norm_eps),
        logit_scale_init=hf.get("logit_scale_init_value", d.logit_scale_init),
    )


def config_to_hf(cfg: ClipConfig) -> dict:
    """ClipConfig -> a config.json that `transformers.CLIPModel` reads."""
    common = {"hidden_act": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps,
              "projection_dim": cfg.projection_dim}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip",
        "projection_dim": cfg.projection_dim, "logit_scale_init_value": cfg.logit_scale_init,
        "text_config": {**common, "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width,
                        "intermediate_size": cfg.text_mlp, "num_hidden_layers": cfg.text_layers,
                        "num_attention_heads": cfg.text_heads,
                        "max_position_embeddings": cfg.context_length,
                        "eos_token_id": cfg.eos_token_id,
                        "bos_token_id": max(cfg.eos_token_id - 1, 0), "pad_token_id": 0},
        "vision_config": {**common, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                          "hidden_size": cfg.vision_width, "intermediate_size": cfg.vision_mlp,
                          "num_hidden_layers": cfg.vision_layers,
                          "num_attention_heads": cfg.vision_heads, "num_channels": 3},
    }


def params_from_state_dict(cfg: ClipConfig, tensors: dict[str, np.ndarray]) -> dict:
    """HF tensors (name -> array) -> nested flax params; errors name what is missing."""
    expected = name_map(cfg)
    missing = [hf for hf, _, _ in expected if hf not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. "
                         f"{missing[:3]}; is config.json from the same model?")
    flat = {}
    for hf, path, fn in expected:
        flat[tuple(path.split("/"))] = np.asarray(fn(np.asarray(tensors[hf], np.float32)))
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(cfg: ClipConfig, params: dict) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(params, sep="/")
    return {hf: np.array(_INVERSE[id(fn)](np.asarray(flat[path], np.float32)), order="C")
            for hf, path, fn in name_map(cfg)}


def load_hf_checkpoint(directory: str) -> tuple[ClipConfig, dict]:
    """config.json + *.safetensors in `directory` -> (ClipConfig, flax params)."""
    config_path = os.path.join(directory, "config.json")
    if not fs.exists(config_path):
        raise MissingInputError(f"no config.json in {directory!r}; give the folder that "
                                "CLIPModel.save_pretrained wrote (config.json + *.safetensors).")
    files = sorted(fs.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise MissingInputError(
            f"no *.safetensors in {directory!r}; convert a PyTorch "
            "checkpoint with CLIPModel.save_pretrained(d, safe_serialization=True)."
        )
    with fs.open(config_path) as f:
        cfg = config_from_hf(json.load(f))
    tensors = {}
    for path in files:
        tensors.update(fs.read_safetensors(path))
    return cfg, params_from_state_dict(cfg, tensors)


def save_hf_checkpoint(directory: str, cfg: ClipConfig, params: dict) -> None:
    """(ClipConfig, flax params) -> config.json + model.safetensors in `directory`."""
    from safetensors.numpy import save
    fs.makedirs(directory)
    fs.write_bytes(os.path.join(directory, "model.safetensors"),
                   save(state_dict_from_params(cfg, params), metadata={"format": "pt"}))
    with fs.open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
