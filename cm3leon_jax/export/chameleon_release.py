"""Import of the original Chameleon release, the one layout that can still draw images.

    config, params, extras = read_release("/data/chameleon")       # then write_export

The release (facebookresearch/chameleon, `download_data.py`) looks like::

    ROOT/models/7b/params.json              {"model": {dim, n_layers, n_heads, n_kv_heads,
                                            ffn_dim_multiplier, multiple_of, norm_eps,
                                            rope_theta, qk_normalization, swin_norm, ...}}
    ROOT/models/7b/consolidate_params.json  {"model_parallel_size": N} (optional)
    ROOT/models/7b/consolidated.pth         or consolidated.00.pth .. (N-1): one per rank
    ROOT/tokenizer/text_tokenizer.json      BPE text pieces, specials, IMGIMG image tokens
    ROOT/tokenizer/vqgan.ckpt, vqgan.yaml   the VQGAN (taming layout), encoder AND decoder

How its tensors map (per layer `layers.{i}.`; torch Linear weights are [out, in]):

    attention.wq/wk/wv.weight   rank r holds heads r*H/N..: concatenated on axis 0.
        The rotary embedding rotates interleaved pairs (2j, 2j+1) of each head; ours
        rotates (j, j + d/2) ("rotate half"), so each head's rows are reordered
        [0, 2, 4, .., 1, 3, 5, ..] in q and k (v is not rotated).
    attention.wo.weight         [dim, local heads * d]: concatenated on axis 1
    attention.q/k_normalization.weight/bias  [d]: ONE LayerNorm per rank, shared by
        that rank's heads: repeated to our per-head [heads, d], reordered like q/k
        (the norm is applied before the rotation, in the interleaved basis)
    feed_forward.w1 (gate), w3 (up): axis 0; w2 (down): axis 1
    attention_norm, ffn_norm, norm: replicated (the ranks' mean is taken)
    tok_embeddings.weight       [vocab, dim / N]: concatenated on axis 1 (!)
    output.weight               [vocab / N, dim]: axis 0
    rope.freqs                  a buffer; ignored

The merged tensors get `transformers`' Chameleon names, so `model/hf_weights.py` (tested
against transformers) does the last step; the vocabulary is permuted onto our layout
by `chameleon_vocab.py`. `transformers`' own conversion drops the VQGAN's decoder, so
its folders cannot draw images: this import keeps it.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import ml_dtypes
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError, brief
from cm3leon_jax.export import chameleon_vocab
from cm3leon_jax.model import hf_weights
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.vocab import chameleon_vqgan_weights as vq_weights
from cm3leon_jax.vocab.vqgan import VQGANConfig

PARAMS, CONSOLIDATE = "params.json", "consolidate_params.json"
TEXT_TOKENIZER, VQGAN_CKPT, VQGAN_YAML = "text_tokenizer.json", "vqgan.ckpt", "vqgan.yaml"
_SHARD = re.compile(r"consolidated(?:\.(\d+))?\.pth")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ReleaseError(UserInputError):
    """The release folder is incomplete or does not fit itself; names the file and tensor."""


# -- finding the files -------------------------------------------------------------------

def find_model_dir(root: str, model_size: str | None = None, required: bool = True
                   ) -> str | None:
    """The folder with params.json: `root` itself or `root/models/<size>`."""
    root = root.rstrip("/")
    if fs.exists(f"{root}/{PARAMS}"):
        return root
    models = f"{root}/models"
    sizes = sorted(d.rstrip("/") for d in fs.listdir(models)
                   if fs.exists(f"{models}/{d.rstrip('/')}/{PARAMS}")) \
        if fs.isdir(models) else []
    if model_size is not None:
        if model_size not in sizes:
            raise ReleaseError(f"{models}/{model_size}/{PARAMS}: missing (models there: "
                               f"{sizes}).")
        return f"{models}/{model_size}"
    if len(sizes) == 1:
        return f"{models}/{sizes[0]}"
    if not required:
        return None if not sizes else f"{models}/{sizes[0]}"
    if not sizes:
        raise ReleaseError(f"{root}: no {PARAMS} here nor under models/<size>/.")
    raise ReleaseError(f"{models} holds several models {sizes}; choose one with "
                       "import_weights.model_size.")


def find_tokenizer_dir(root: str, model_dir: str) -> str:
    """tokenizer/ beside models/ (ROOT/tokenizer) or beside params.json."""
    for candidate in (f"{root.rstrip('/')}/tokenizer",
                      posixpath.join(posixpath.dirname(posixpath.dirname(model_dir)), "tokenizer"),
                      f"{model_dir}/tokenizer"):
        if fs.exists(f"{candidate}/{TEXT_TOKENIZER}"):
            return candidate
    raise ReleaseError(f"{root}: no tokenizer/{TEXT_TOKENIZER} (looked in ROOT/tokenizer and "
                       "beside the model folder); the release's tokenizer/ folder is needed.")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with fs.open(path) as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise ReleaseError(f"{path}: a JSON {type(out).__name__}, not an object of settings.")
    return out


def read_params(model_dir: str) -> dict[str, Any]:
    """params.json (its "model" section lifted) + consolidate_params.json."""
    params = _read_json(f"{model_dir}/{PARAMS}")
    merged = {**params, **(params.get("model") or {})}
    if fs.exists(f"{model_dir}/{CONSOLIDATE}"):
        merged.update(_read_json(f"{model_dir}/{CONSOLIDATE}"))
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in merged]
    if missing:
        raise ReleaseError(f"{model_dir}/{PARAMS}: lacks {missing}.")
    bad = {k: merged[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")
           if k in merged and merged[k] is not None
           and (not isinstance(merged[k], int) or merged[k] < 1)}
    if bad:
        raise ReleaseError(f"{model_dir}/{PARAMS}: {bad} must be positive integers.")
    return merged


def shard_files(model_dir: str, parallel: int) -> list[str]:
    """consolidated.pth, or consolidated.00.pth .. (parallel-1); names a missing one."""
    names = set(fs.listdir(model_dir))
    if parallel == 1 and "consolidated.pth" in names:
        return [f"{model_dir}/consolidated.pth"]
    want = [f"consolidated.{r:02d}.pth" for r in range(parallel)]
    missing = [n for n in want if n not in names]
    if missing:
        found = sorted(n for n in names if _SHARD.fullmatch(n))
        raise ReleaseError(f"{model_dir}/{missing[0]}: missing; model_parallel_size={parallel} "
                           f"needs {want} (found {found}).")
    return [f"{model_dir}/{n}" for n in want]


def load_torch(path: str) -> dict[str, np.ndarray]:
    """A torch state dict file -> numpy (weights only: nothing is unpickled but tensors)."""
    import torch  # The `ref` extra.
    with fs.open(path, "rb") as f:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several kinds for a damaged file
            raise ReleaseError(f"{path}: not a readable torch checkpoint "
                               f"({brief(e)}).") from None
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach()
            # numpy has no bfloat16: keep the bits, as ml_dtypes' bfloat16.
            out[k] = (v.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                      if v.dtype == torch.bfloat16 else v.numpy())
    return out


# -- the config ------------------------------------------------------------------------

def mlp_dim(p: dict[str, Any]) -> int:
    """SwiGLU width as the release computes it: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple = p.get("multiple_of", 256)
    return multiple * -(-hidden // multiple)


def decoder_config(p: dict[str, Any], vocab_size: int, dtype: str, where: str) -> DecoderConfig:
    if not p.get("qk_normalization", True):
        raise ReleaseError(f"{where}: qk_normalization is false; every Chameleon release has "
                           "QK-norm, and the import maps it.")
    return DecoderConfig(
        vocab_size=vocab_size, num_layers=p["n_layers"], d_model=p["dim"], num_heads=p["n_heads"],
        num_kv_heads=p.get("n_kv_heads"), mlp_dim=mlp_dim(p), max_length=p.get("max_seq_len", 4096),
        norm="rmsnorm", norm_params=True, norm_eps=p.get("norm_eps", 1e-5),
        block_order="swin" if p.get("swin_norm") else "pre", mlp_activation="silu",
        gated_mlp=True, position_embedding="rope", rope_theta=float(p.get("rope_theta", 1e4)),
        qk_norm=True, tie_embeddings=False, param_dtype=dtype)


# -- merging the model-parallel shards -------------------------------------------------

def rotate_half_order(head_dim: int) -> np.ndarray:
    """Row order that turns a head's interleaved rotary pairs into rotate-half halves."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


class _Shards:
    """The ranks' state dicts, read tensor by tensor with errors naming file and tensor."""

    def __init__(self, files: list[str], dicts: list[dict[str, np.ndarray]]):
        self.files, self.dicts = files, dicts

    def get(self, name: str, shape: tuple[int, ...]) -> list[np.ndarray]:
        out = []
        for path, sd in zip(self.files, self.dicts):
            if name not in sd:
                raise ReleaseError(f"{path}: lacks the tensor {name!r}.")
            if tuple(sd[name].shape) != shape:
                raise ReleaseError(f"{path}: tensor {name!r} has shape {tuple(sd[name].shape)}; "
                                   f"params.json implies {shape} per shard.")
            out.append(sd[name])
        return out

    def unused(self, used: set[str]) -> list[str]:
        return sorted({k for sd in self.dicts for k in sd} - used - {"rope.freqs"})


def _mean(parts: list[np.ndarray]) -> np.ndarray:
    """Of replicated tensors (identical in a healthy release), in float32, kept in dtype."""
    return np.mean(np.stack(parts).astype(np.float32), 0).astype(parts[0].dtype)


def _heads_rows(w: np.ndarray, heads: int, head_dim: int, rotary: bool) -> np.ndarray:
    """[heads*d, dim] with each head's rows in rotate-half order when `rotary`."""
    w = w.reshape(heads, head_dim, -1)
    if rotary:
        w = w[:, rotate_half_order(head_dim)]
    return w.reshape(heads * head_dim, -1)


def merge_layer(shards: _Shards, i: int, p: dict[str, Any], n: int, used: set[str]
                ) -> dict[str, np.ndarray]:
    """One layer of the N ranks -> transformers Chameleon names, full size."""
    dim, heads = p["dim"], p["n_heads"]
    kv_heads, hd = p.get("n_kv_heads") or heads, dim // heads
    ffn = mlp_dim(p)
    pre, hf = f"layers.{i}.", f"model.layers.{i}."
    out = {}

    def take(name, shape):
        used.add(pre + name)
        return shards.get(pre + name, shape)

    for ours, theirs, h in (("q_proj", "wq", heads), ("k_proj", "wk", kv_heads),
                            ("v_proj", "wv", kv_heads)):
        parts = take(f"attention.{theirs}.weight", (h // n * hd, dim))
        out[f"{hf}self_attn.{ours}.weight"] = _heads_rows(np.concatenate(parts, 0), h, hd,
                                                          rotary=ours != "v_proj")
    out[f"{hf}self_attn.o_proj.weight"] = np.concatenate(
        take("attention.wo.weight", (dim, heads // n * hd)), 1)
    order = rotate_half_order(hd)
    for ours, theirs, h in (("q_norm", "q_normalization", heads), ("k_norm", "k_normalization",
                                                                   kv_heads)):
        for param in ("weight", "bias"):
            per_rank = take(f"attention.{theirs}.{param}", (hd,))
            out[f"{hf}self_attn.{ours}.{param}"] = np.repeat(
                np.stack(per_rank)[:, order], h // n, axis=0)  # [heads, d], rank-major.
    for ours, theirs, axis, shape in (("gate_proj", "w1", 0, (ffn // n, dim)),
                                      ("up_proj", "w3", 0, (ffn // n, dim)),
                                      ("down_proj", "w2", 1, (dim, ffn // n))):
        out[f"{hf}mlp.{ours}.weight"] = np.concatenate(
            take(f"feed_forward.{theirs}.weight", shape), axis)
    for ours, theirs in (("input_layernorm", "attention_norm"),
                         ("post_attention_layernorm", "ffn_norm")):
        out[f"{hf}{ours}.weight"] = _mean(take(f"{theirs}.weight", (dim,)))
    return out


def merge_shards(shards: _Shards, p: dict[str, Any], vocab: chameleon_vocab.ChameleonVocab
                 ) -> dict[str, np.ndarray]:
    """The whole model in transformers' Chameleon names, its vocabulary permuted to ours."""
    n, dim = len(shards.files), p["dim"]
    heads, kv_heads = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    if dim % n or heads % n or kv_heads % n:
        raise ReleaseError(f"{shards.files[0]}: {n} shards do not divide dim={dim}, "
                           f"n_heads={heads}, n_kv_heads={kv_heads}.")
    rows = shards.dicts[0].get("output.weight")
    vocab_rows = (rows.shape[0] if rows is not None else 0) * n
    used = {"tok_embeddings.weight", "output.weight", "norm.weight"}
    embed = np.concatenate(shards.get("tok_embeddings.weight", (vocab_rows, dim // n)), 1)
    output = np.concatenate(shards.get("output.weight", (vocab_rows // n, dim)), 0)
    out = {"model.embed_tokens.weight": chameleon_vocab.take_rows(embed, vocab.source_ids,
                                                                  "tok_embeddings.weight"),
           "lm_head.weight": chameleon_vocab.take_rows(output, vocab.source_ids, "output.weight"),
           "model.norm.weight": _mean(shards.get("norm.weight", (dim,)))}
    for i in range(p["n_layers"]):
        out.update(merge_layer(shards, i, p, n, used))
    unused = shards.unused(used)
    if unused:
        raise ReleaseError(f"{shards.files[0]}: tensors params.json has no place for: "
                           f"{unused[:6]}{' ...' if len(unused) > 6 else ''} (n_layers="
                           f"{p['n_layers']}?).")
    return out


# -- the image tokenizer ---------------------------------------------------------------

def read_vqgan(tokenizer_dir: str) -> tuple[VQGANConfig, Any]:
    """vqgan.ckpt (weights only) checked against vqgan.yaml -> (config, params)."""
    import yaml
    ckpt, cfg_path = f"{tokenizer_dir}/{VQGAN_CKPT}", f"{tokenizer_dir}/{VQGAN_YAML}"
    for path in (ckpt, cfg_path):
        if not fs.exists(path):
            raise ReleaseError(f"{path}: missing; the release's tokenizer/ folder holds both "
                               f"{VQGAN_CKPT} and {VQGAN_YAML}.")
    with fs.open(cfg_path) as f:
        try:
            model = yaml.safe_load(f)["model"]["params"]
            dd = model["ddconfig"]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise ReleaseError(f"{cfg_path}: not a taming VQModel config ({e!r}).") from None
    import torch
    with fs.open(ckpt, "rb") as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # several kinds
            raise ReleaseError(f"{ckpt}: not a readable weights-only checkpoint "
                               f"({brief(e)}).") from None
    sd = obj.get("state_dict", obj)
    try:
        cfg = vq_weights.config_from_state_dict(sd, image_size=dd["resolution"])
        params, cfg = vq_weights.params_from_state_dict(sd, cfg)
    except (ValueError, KeyError) as e:
        raise ReleaseError(f"{ckpt}: {e}") from None
    want = {"codebook_size": model.get("n_embed"), "embed_dim": model.get("embed_dim"),
            "latent_channels": dd.get("z_channels"), "base_channels": dd.get("ch"),
            "channel_multipliers": tuple(dd.get("ch_mult", ())),
            "num_res_blocks": dd.get("num_res_blocks")}
    bad = {k: (v, getattr(cfg, k)) for k, v in want.items()
           if v is not None and v != getattr(cfg, k)}
    if bad:
        raise ReleaseError(f"{ckpt} does not fit {cfg_path}: (yaml, checkpoint) = {bad}.")
    return cfg, params


# -- all of it ---------------------------------------------------------------------------

def read_release(root: str, model_size: str | None = None
                 ) -> tuple[DecoderConfig, Any, dict[str, Any]]:
    """(config, params, extras) of a release folder; extras: write_vocab, image_tokenizer."""
    root = root.rstrip("/")
    model_dir = find_model_dir(root, model_size)
    tokenizer_dir = find_tokenizer_dir(root, model_dir)
    p = read_params(model_dir)
    vq_config, vq_params = read_vqgan(tokenizer_dir)
    with fs.open(f"{tokenizer_dir}/{TEXT_TOKENIZER}", "rb") as f:
        vocab = chameleon_vocab.build(f.read(), vq_config.codes_per_image,
                                      f"{tokenizer_dir}/{TEXT_TOKENIZER}")
    if vocab.layout.image_codes != vq_config.codebook_size:
        raise ReleaseError(f"{tokenizer_dir}/{TEXT_TOKENIZER} has {vocab.layout.image_codes} "
                           f"image tokens, {VQGAN_CKPT} {vq_config.codebook_size} codes.")
    files = shard_files(model_dir, int(p.get("model_parallel_size", 1)))
    shards = _Shards(files, [load_torch(f) for f in files])
    state_dict = merge_shards(shards, p, vocab)
    dtype = _DTYPES.get(str(state_dict["model.norm.weight"].dtype), "float32")
    config = decoder_config(p, vocab.layout.vocab_size, dtype, f"{model_dir}/{PARAMS}")
    try:
        params = hf_weights.from_hf(state_dict, config, "chameleon")
    except (KeyError, ValueError) as e:
        raise ReleaseError(f"{model_dir}: {e.args[0] if e.args else e}") from None
    return config, params, {"write_vocab": vocab.write, "image_tokenizer": (vq_config, vq_params),
                            "step": None, "vocab_dir": None}
