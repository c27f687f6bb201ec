"""The Hugging Face layout: a folder `transformers.AutoModelForCausalLM.from_pretrained` loads.

    write_hf("out/hf", config, params, vocab_dir=..., image_tokenizer=(vq_config, vq_params))

    out/hf/config.json         OPTConfig (CM3Leon: bias-free, affine-free LayerNorm) or
                               ChameleonConfig (+ vq_config and the vocabulary_map that
                               tells it which ids are image codes)
    out/hf/model.safetensors   the decoder (`model/hf_weights.py` names and layouts);
                               Chameleon's also holds the VQ encoder as `model.vqmodel.*`
    out/hf/vqgan.safetensors   the whole image tokenizer, decoder included (transformers
                               keeps only the encoder, so images could not be drawn
                               back), in the released `vqgan.ckpt` names; vqgan.json: its
                               VQGANConfig
    out/hf/tokenizer.json, tokenizer_config.json   the vocabulary for transformers'
                               PreTrainedTokenizerFast, in our ids (`hf_tokenizer.py`)
    out/hf/cm3leon_vocab/      our vocabulary folder (ids are ours: `layout.json`)
    out/hf/cm3leon_export.json the DecoderConfig and the step, so importing back is exact

The files `transformers` does not know are ignored by it; `hf_import.py` reads them.
Written through `cm3leon_jax/fs.py` (gs:// works) and staged: complete or absent.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import numpy as st_numpy

from cm3leon_jax import fs
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.model import hf_weights
from cm3leon_jax.model.config import DecoderConfig
from cm3leon_jax.train import params_checkpoint as pc
from cm3leon_jax.train import staging
from cm3leon_jax.vocab import chameleon_vqgan_weights as vq_weights
from cm3leon_jax.vocab.vqgan import VQGANConfig

WEIGHTS, CONFIG, VQGAN, VQGAN_CONFIG = ("model.safetensors", "config.json", "vqgan.safetensors",
                                        "vqgan.json")
VOCAB, OURS = "cm3leon_vocab", "cm3leon_export.json"
_ARCHITECTURES = {"opt": ("OPTForCausalLM", "opt"),
                  "chameleon": ("ChameleonForConditionalGeneration", "chameleon")}
_DIGITS = "ABCDEFGHIJ"  # Chameleon spells image code 123 as "IMGIMGBCDZ".
log = logging.getLogger(__name__)


def family_of(config: DecoderConfig) -> str:
    """"opt" for the CM3Leon variant (LayerNorm), "chameleon" for the successor."""
    return "opt" if config.norm == "layernorm" else "chameleon"


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(_DIGITS[int(d)] for d in str(code)) + "Z"


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    data = st_numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                         metadata={"format": "pt", **(metadata or {})})
    with fs.open(path, "wb") as f:
        f.write(data)


def vq_config_problem(vq: VQGANConfig) -> str | None:
    """Why transformers' ChameleonVQVAEConfig cannot describe our VQGAN (its encoder has 32
    GroupNorm groups and a middle attention block, and looks codes up unnormalized), or
    None when it can."""
    bad = [f"{k}={getattr(vq, k)!r} (transformers': {v!r})" for k, v in
           (("num_groups", 32), ("mid_attention", True), ("l2_normalize", False))
           if getattr(vq, k) != v]
    return ", ".join(bad) or None


def check_vq(config: DecoderConfig, vq: VQGANConfig | None, without_vq: bool) -> None:
    """Refuses a Chameleon export whose image tokenizer config.json cannot describe (without
    `vq_config` transformers builds a random VQ model), unless `without_vq` asks for that."""
    problem = vq_config_problem(vq) if vq is not None else None
    if family_of(config) == "chameleon" and problem and not without_vq:
        raise UserInputError(
            f"the image tokenizer has {problem}: transformers' Chameleon VQ model cannot hold "
            "it, and without it from_pretrained builds a random one. Export without it "
            "(export.image_tokenizer_dir=None), in the params layout (export.layout='params'), "
            "or set export.hf_without_vq=True to write config.json without its VQ model "
            "(vqgan.safetensors keeps the whole tokenizer for our import).")


def vq_config_dict(vq: VQGANConfig) -> dict[str, Any] | None:
    """transformers' ChameleonVQVAEConfig for our VQGAN, or None if it cannot express it
    (`vq_config_problem`)."""
    if vq_config_problem(vq):
        return None
    return dict(embed_dim=vq.embed_dim, num_embeddings=vq.codebook_size, double_latent=False,
                latent_channels=vq.latent_channels, resolution=vq.image_size,
                in_channels=vq.in_channels, base_channels=vq.base_channels,
                channel_multiplier=list(vq.channel_multipliers), num_res_blocks=vq.num_res_blocks,
                attn_resolutions=[vq.image_size // 2 ** i for i in vq.attn_levels],
                dropout=0.0, attn_type="vanilla")


def _vocabulary_map(vocab_dir: str | None, vocab_size: int) -> dict[str, int]:
    """Chameleon's `vocabulary_map`: image code names -> our ids (what marks them as image
    tokens in transformers), and `<image>` -> our `<unk>` slot (a token never produced)."""
    if not vocab_dir:
        return {}
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    layout = MultimodalVocabulary(vocab_dir).layout
    if layout.vocab_size > vocab_size:
        raise UserInputError(f"the vocabulary {vocab_dir!r} has {layout.vocab_size} ids, the "
                             f"model {vocab_size}: not the model's vocabulary.")
    out = {image_token_name(c): layout.image_start + c for c in range(layout.image_codes)}
    out["<image>"] = 4  # layout.UNK_ID
    return out


def _bos_id(vocab_dir: str | None) -> int:
    """config.json's `bos_token_id`: the token the model's sequences open with
    (`MultimodalVocabulary.prompt_start_id`: our `<eos>`, id 1, or an imported Chameleon's
    `<s>`); our `<eos>` without a vocabulary."""
    if not vocab_dir:
        return 1  # layout.EOS_ID
    from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
    return MultimodalVocabulary(vocab_dir).prompt_start_id


def hf_config(config: DecoderConfig, vocab_dir: str | None,
              vq: VQGANConfig | None) -> dict[str, Any]:
    family = family_of(config)
    arch, model_type = _ARCHITECTURES[family]
    out = dict(hf_weights.hf_config_kwargs(config, family), architectures=[arch],
               model_type=model_type, torch_dtype=config.param_dtype,
               pad_token_id=0, eos_token_id=1, bos_token_id=_bos_id(vocab_dir))
    if family == "chameleon":
        out["vocabulary_map"] = _vocabulary_map(vocab_dir, config.vocab_size)
        vq_dict = vq_config_dict(vq) if vq is not None else None
        if vq_dict is not None:
            out["vq_config"] = vq_dict
    return out


def _vqmodel_tensors(vq_params: Any) -> dict[str, np.ndarray]:
    """The VQ encoder half under `model.vqmodel.` (what ChameleonVQVAE holds)."""
    sd = vq_weights.state_dict_from_params(vq_params)
    return {f"model.vqmodel.{k}": v for k, v in sd.items() if not k.startswith("decoder.")}


def write_hf(output_dir: str, config: DecoderConfig, params: Any, *, vocab_dir: str | None = None,
             image_tokenizer: tuple[VQGANConfig, Any] | None = None, overwrite: bool = False,
             source: str = "", step: int | None = None,
             without_vq: bool = False) -> dict[str, Any]:
    """Writes the folder described in the module docstring; returns its config.json.

    A Chameleon model's image tokenizer that config.json cannot describe (`check_vq`) is
    refused, or with `without_vq` left out of config.json and the model (a warning, and
    `vq_config_omitted` in cm3leon_export.json say so)."""
    vq = image_tokenizer[0] if image_tokenizer else None
    check_vq(config, vq, without_vq)
    if family_of(config) == "chameleon" and vq is not None and vq_config_problem(vq):
        log.warning("%s: config.json gets no vq_config (the image tokenizer has %s), so "
                    "transformers builds a random VQ model; vqgan.safetensors holds ours.",
                    output_dir, vq_config_problem(vq))
    # Parameters sharded over several hosts are gathered first (every process takes part).
    params = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)
                          if isinstance(x, jax.Array) and not x.is_fully_addressable else x,
                          params)
    with staging.staged(output_dir, overwrite) as tmp:
        if staging.is_primary():
            cfg = _write_files(tmp, config, params, vocab_dir, image_tokenizer, source, step)
    return cfg if staging.is_primary() else {}


def _write_files(tmp: str, config: DecoderConfig, params: Any, vocab_dir: str | None,
                 image_tokenizer: tuple[VQGANConfig, Any] | None, source: str,
                 step: int | None) -> dict[str, Any]:
    family = family_of(config)
    tensors = hf_weights.to_hf(params, config, family)
    if config.tie_embeddings:
        del tensors["lm_head.weight"]  # transformers ties it; a saved copy would be a 2nd one.
    vq_config, vq_params = image_tokenizer or (None, None)
    cfg = hf_config(config, vocab_dir, vq_config)
    if family == "chameleon" and "vq_config" in cfg:
        tensors.update({k: v.astype(next(iter(tensors.values())).dtype)
                        for k, v in _vqmodel_tensors(vq_params).items()})
    write_safetensors(f"{tmp}/{WEIGHTS}", tensors)
    with fs.open(f"{tmp}/{CONFIG}", "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
    if vq_config is not None:
        write_safetensors(f"{tmp}/{VQGAN}", vq_weights.state_dict_from_params(vq_params))
        with fs.open(f"{tmp}/{VQGAN_CONFIG}", "w") as f:
            json.dump(vq_config.to_dict(), f, indent=1)
    if vocab_dir:
        fs.copy_tree(vocab_dir.rstrip("/"), f"{tmp}/{VOCAB}")
        from cm3leon_jax.export import hf_tokenizer  # It imports this module.
        hf_tokenizer.write_tokenizer_files(tmp, vocab_dir)
    ours = {"decoder_config": pc.config_to_dict(config), "step": step, "source": source,
            "family": family}
    if family == "chameleon" and vq_config is not None and "vq_config" not in cfg:
        ours["vq_config_omitted"] = vq_config_problem(vq_config)  # export.hf_without_vq
    with fs.open(f"{tmp}/{OURS}", "w") as f:
        json.dump(ours, f, indent=1)
    return cfg
