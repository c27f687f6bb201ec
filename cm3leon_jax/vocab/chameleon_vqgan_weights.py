"""Import (and export) of the released VQGAN checkpoint layout.

Chameleon's image tokenizer (`tokenizer/vqgan.ckpt` + `vqgan.yaml` in the
release) is a taming-transformers `VQModel` saved by PyTorch Lightning: a dict
whose "state_dict" holds torch tensors named like::

    encoder.conv_in.weight                 [128, 3, 3, 3]      (out, in, kh, kw)
    encoder.down.0.block.1.norm1.weight    [128]
    encoder.down.0.downsample.conv.weight  [128, 128, 3, 3]
    encoder.mid.attn_1.q.weight            [512, 512, 1, 1]
    quant_conv.weight, quantize.embedding.weight [8192, 256], post_quant_conv.weight
    decoder.up.3.block.2.conv2.weight, decoder.up.4.upsample.conv.weight, ...
    loss.discriminator.*, loss.perceptual_loss.*   (training only; ignored)

`transformers`' `ChameleonVQVAE` keeps the same names for its encoder half, under
`model.vqmodel.` inside a Chameleon model. Every one of these spellings loads
here: the prefix is found from the keys, the architecture is read off the
shapes (no yaml needed), and each tensor is renamed and transposed into
`VQGAN`'s Flax parameters (convs OIHW -> HWIO, 1x1 attention convs -> Dense).

The mapping is written once, from the Flax side (`torch_key`), and used in both
directions: `params_from_state_dict` (import) and `state_dict_from_params`
(export, for the export stage and for round-trip tests).
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.errors import MissingInputError, UserInputError, brief
from cm3leon_jax.vocab.vqgan import VQGAN, VQGANConfig

_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
_ANCHOR = "quantize.embedding.weight"


def load_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into {name: float32 numpy array}.

    Args:
      path: a `.safetensors` file, or a torch file (`.ckpt` / `.pt` / `.pth` /
        `.bin`, a Lightning checkpoint with a "state_dict" entry or a bare state dict).
      allow_pickle: torch files are read with `weights_only=True`, which refuses
        arbitrary pickled objects; a Lightning checkpoint that stores other objects
        (optimizer, callbacks) needs `allow_pickle=True`. Only do that for files
        you trust: unpickling runs code.
    """
    if not fs.exists(path):
        raise MissingInputError(f"no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        return {k: np.asarray(v, np.float32) for k, v in fs.read_safetensors(path).items()}
    try:
        import torch
    except ImportError as e:  # torch is only in the `ref` extra
        raise ImportError(
            f"reading the torch checkpoint {path!r} needs PyTorch: pip install -e '.[ref]' "
            "(or convert it to .safetensors elsewhere)") from e
    try:
        with fs.local_copy(path) as local:  # torch reads local files only (gs:// too).
            obj = torch.load(local, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:  # What weights_only refuses (and a damaged pickle).
        if allow_pickle:
            raise UserInputError(f"{path!r}: not a readable torch checkpoint ({brief(e)}); "
                                 "write or download it again.") from None
        raise UserInputError(
            f"{path!r} holds more than tensors and was not unpickled for safety; if you trust "
            f"the file, call with allow_pickle=True (torch: {brief(e, 120)})") from None
    except Exception as e:  # A damaged file: torch raises several kinds.
        raise UserInputError(f"{path!r}: not a readable torch checkpoint ({brief(e)}); write "
                             "or download it again.") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k: v.detach().float().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def strip_to_vqgan(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The VQGAN's own tensors, named from `encoder.` / `quantize.` etc.

    Finds the prefix (none, `vqmodel.`, `model.vqmodel.`, ...) from the codebook's
    key and drops everything else (the discriminator and LPIPS of `loss.*`, the
    language model of a full Chameleon checkpoint).
    """
    anchors = [k for k in state_dict if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(
            f"expected exactly one '*{_ANCHOR}' in the state dict (the codebook), found "
            f"{anchors or 'none'}; is this a VQGAN checkpoint?")
    prefix = anchors[0][: -len(_ANCHOR)]
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix) and k[len(prefix):].startswith(_ROOTS):
            out[k[len(prefix):]] = np.asarray(v, np.float32)
    return out


def config_from_state_dict(state_dict: Mapping[str, Any], image_size: int | None = None,
                           **overrides: Any) -> VQGANConfig:
    """The VQGANConfig that a (stripped or not) state dict was saved from.

    Args:
      state_dict: names -> arrays, any prefix.
      image_size: the images the tokenizer should read; weights do not fix it
        (the network is convolutional). Default: 32 codes per side, the grid of
        both CM3Leon (256 px, f8) and Chameleon (512 px, f16).
      overrides: further VQGANConfig fields (e.g. dtype).
    """
    sd = strip_to_vqgan(state_dict)
    side = "encoder" if "encoder.conv_in.weight" in sd else "decoder"
    levels = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(rf"{side}\.(?:down|up)\.(\d+)\.", k)))
    prefix = "down" if side == "encoder" else "up"
    base = sd["encoder.conv_in.weight"].shape[0] if side == "encoder" else None
    widths = [sd[f"{side}.{prefix}.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    if base is None:
        base = widths[0]
    blocks = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(rf"{side}\.{prefix}\.0\.block\.(\d+)\.", k)))
    if side == "decoder":
        blocks -= 1  # the decoder has one block more per level
    codebook_size, embed_dim = sd[_ANCHOR].shape
    if side == "encoder":
        latent = sd["encoder.conv_out.weight"].shape[0]
        if sd["quant_conv.weight"].shape[1] != latent:
            raise ValueError("encoder.conv_out emits twice quant_conv's input (double_z=True); "
                             "only double_z=False VQGANs are supported")
        in_channels = sd["encoder.conv_in.weight"].shape[1]
    else:
        latent = sd["decoder.conv_in.weight"].shape[1]
        in_channels = sd["decoder.conv_out.weight"].shape[0]
    factor = 2 ** (levels - 1)
    fields = dict(
        image_size=image_size or 32 * factor,
        base_channels=base,
        channel_multipliers=tuple(w // base for w in widths),
        num_res_blocks=blocks,
        attn_levels=tuple(i for i in range(levels) if f"{side}.{prefix}.{i}.attn.0.q.weight" in sd),
        mid_attention=f"{side}.mid.attn_1.q.weight" in sd,
        latent_channels=latent,
        embed_dim=embed_dim,
        codebook_size=codebook_size,
        in_channels=in_channels,
        # taming's normalization and lookup, whatever gin binds for our own tokenizers
        norm="group", num_groups=32, l2_normalize=False,
    )
    fields.update(overrides)
    return VQGANConfig(**fields)


# ---------------------------------------------------------------------------
# The one mapping, Flax path -> torch name.

_MODULE_RULES = (
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$"), r"\1.\2.\3.conv"),
    (re.compile(r"^mid_(block_1|block_2|attn_1)$"), r"mid.\1"),
)
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "embedding": "embedding.weight",
}


def torch_key(path: tuple[str, ...]) -> str:
    """Flax parameter path, e.g. ('encoder', 'down_0_block_1', 'conv1', 'kernel'),
    -> its name in the released checkpoint, 'encoder.down.0.block.1.conv1.weight'."""
    parts = []
    for name in path[:-1]:
        for pattern, repl in _MODULE_RULES:
            if pattern.match(name):
                name = pattern.sub(repl, name)
                break
        parts.append(name)
    parts.append(_LEAF_NAMES[path[-1]])
    return ".".join(parts)


def _to_flax(value: np.ndarray, target_shape: tuple[int, ...], key: str) -> np.ndarray:
    if len(target_shape) == 4:  # conv: OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    elif len(target_shape) == 2 and value.ndim == 4:  # 1x1 conv as Dense: [O, I, 1, 1] -> [I, O]
        value = value[:, :, 0, 0].T
    if value.shape != tuple(target_shape):
        raise ValueError(f"{key}: checkpoint shape {value.shape} does not fit the model's "
                         f"{tuple(target_shape)}; the checkpoint was saved from another config")
    return value


def _to_torch(value: np.ndarray, key: str) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and not key.endswith("embedding.weight"):
        return value.T[:, :, None, None]
    return value


def _flat_paths(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_paths(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def abstract_params(cfg: VQGANConfig) -> dict[str, Any]:
    """Shapes of VQGAN(cfg)'s parameters, without computing them."""
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: VQGAN(cfg).init(jax.random.key(0), x), x)["params"]


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    cfg: VQGANConfig | None = None,
    base_params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], VQGANConfig]:
    """Converts a checkpoint in the released layout into `VQGAN` parameters.

    Args:
      state_dict: names -> arrays (torch tensors or numpy), any prefix.
      cfg: the config to load into; inferred from the shapes when None.
      base_params: parameters to take what the checkpoint lacks from; without
        them every parameter must be present. `transformers`' ChameleonVQVAE, for
        instance, has no decoder: pass freshly initialized params to get an
        encoder-only import (decoding with it is then meaningless).
    Returns:
      (params as a nested dict of float32 numpy arrays, the config).
    """
    sd = strip_to_vqgan({k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else v)
                         for k, v in state_dict.items()})
    cfg = cfg or config_from_state_dict(sd)
    targets = _flat_paths(abstract_params(cfg))
    base = _flat_paths(base_params) if base_params is not None else {}
    out, missing = {}, []
    for path, target in targets.items():
        key = torch_key(path)
        if key in sd:
            out[path] = _to_flax(sd[key], target.shape, key)
        elif path in base:
            out[path] = np.asarray(base[path], np.float32)
        else:
            missing.append(key)
    used = {torch_key(p) for p in targets}
    unexpected = sorted(set(sd) - used)
    if missing or unexpected:
        raise ValueError(
            "the checkpoint does not match VQGAN(cfg): "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)}). "
            "Let the config be inferred (cfg=None), or pass base_params for a partial checkpoint."
        )
    return _unflatten(out), cfg


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """VQGAN parameters -> the released layout (no prefix), float32 numpy arrays."""
    out = {}
    for path, v in _flat_paths(params).items():
        key = torch_key(path)
        out[key] = np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), key))
    return out


def load_chameleon_vqgan(path: str, image_size: int | None = None, allow_pickle: bool = False,
                         **overrides: Any) -> tuple[dict[str, Any], VQGANConfig]:
    """Reads a released VQGAN checkpoint file -> (params, config).

    For Chameleon's `tokenizer/vqgan.ckpt` this gives the layout of
    `gin_configs/image_tokenizer/chameleon_512.gin` (512 px, 32x32 codes of 8192).
    """
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    cfg = config_from_state_dict(sd, image_size=image_size, **overrides)
    return params_from_state_dict(sd, cfg)
