"""A tiny Chameleon release written in exactly the released layout, and a reference
forward pass of the released architecture (torch, written from the release's model
code's semantics, not from our decoder): N model-parallel ranks, each with its slice of
heads, its own q/k LayerNorm and interleaved-pair rotary embedding; the embedding is
split along its width and the output along the vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon_jax.export.chameleon_release import mlp_dim
from cm3leon_jax.export.hf_export import image_token_name
from cm3leon_jax.vocab import chameleon_vqgan_weights as vq_weights

PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None,
              multiple_of=32, norm_eps=1e-5, rope_theta=10000.0, qk_normalization=True,
              swin_norm=False)


def write_text_tokenizer(path: str, texts: list[str], n_codes: int, seed: int = 0) -> int:
    """A byte-level BPE file with Chameleon's specials and IMGIMG tokens (in a shuffled
    code order, as the name is what says the code); returns its size."""
    codes = np.random.default_rng(seed).permutation(n_codes)
    specials = (["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(int(c)) for c in codes]
                + ["<eoss>", "<racm3:break>"] + [f"<reserved{i:05d}>" for i in range(4)])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=len(specials) + 300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(path)
    return tok.get_vocab_size()


def random_shards(vocab_rows: int, n: int, seed: int = 0, p=PARAMS) -> list[dict]:
    """The n ranks' state dicts (bfloat16, as released)."""
    rng = np.random.default_rng(seed)
    dim, heads, kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    hd, ffn = dim // heads, mlp_dim(p)
    t = lambda *shape, scale=None: torch.from_numpy(  # noqa: E731
        (rng.standard_normal(shape) * (scale or 1 / np.sqrt(dim))).astype(np.float32)
    ).to(torch.bfloat16)
    norm = lambda size: torch.from_numpy(  # noqa: E731
        (1 + 0.1 * rng.standard_normal(size)).astype(np.float32)).to(torch.bfloat16)
    shared = {f"layers.{i}.{k}.weight": norm(dim) for i in range(p["n_layers"])
              for k in ("attention_norm", "ffn_norm")}
    shared["norm.weight"] = norm(dim)
    out = []
    for _ in range(n):
        sd = dict(shared, **{"tok_embeddings.weight": t(vocab_rows, dim // n, scale=1.0),
                             "output.weight": t(vocab_rows // n, dim),
                             "rope.freqs": torch.ones(hd // 2)})
        for i in range(p["n_layers"]):
            pre = f"layers.{i}."
            sd.update({pre + "attention.wq.weight": t(heads // n * hd, dim),
                       pre + "attention.wk.weight": t(kv // n * hd, dim),
                       pre + "attention.wv.weight": t(kv // n * hd, dim),
                       pre + "attention.wo.weight": t(dim, heads // n * hd),
                       pre + "feed_forward.w1.weight": t(ffn // n, dim),
                       pre + "feed_forward.w3.weight": t(ffn // n, dim),
                       pre + "feed_forward.w2.weight": t(dim, ffn // n)})
            for which in ("q", "k"):
                sd[pre + f"attention.{which}_normalization.weight"] = norm(hd)
                sd[pre + f"attention.{which}_normalization.bias"] = t(hd, scale=0.1)
        out.append(sd)
    return out


def write_vqgan(tokenizer_dir: str, cfg, params) -> None:
    sd = {k: torch.from_numpy(np.array(v))
          for k, v in vq_weights.state_dict_from_params(params).items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)  # Training-only weights.
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 3},
               os.path.join(tokenizer_dir, "vqgan.ckpt"))
    levels = len(cfg.channel_multipliers)
    yaml_cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.codebook_size, "ddconfig": {
            "double_z": False, "z_channels": cfg.latent_channels, "resolution": cfg.image_size,
            "in_channels": 3, "out_ch": 3, "ch": cfg.base_channels,
            "ch_mult": list(cfg.channel_multipliers), "num_res_blocks": cfg.num_res_blocks,
            "attn_resolutions": [cfg.image_size // 2 ** i for i in cfg.attn_levels
                                 if i < levels], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}
    with open(os.path.join(tokenizer_dir, "vqgan.yaml"), "w") as f:
        yaml.safe_dump(yaml_cfg, f)


def write_release(root: str, texts: list[str], vq_cfg, vq_params, n: int = 2,
                  size: str = "7b", seed: int = 0) -> list[dict]:
    """ROOT/models/<size>/{params.json, consolidate_params.json, consolidated.0k.pth} and
    ROOT/tokenizer/{text_tokenizer.json, vqgan.ckpt, vqgan.yaml}; returns the shards."""
    model_dir, tok_dir = os.path.join(root, "models", size), os.path.join(root, "tokenizer")
    os.makedirs(model_dir)
    os.makedirs(tok_dir)
    size = write_text_tokenizer(os.path.join(tok_dir, "text_tokenizer.json"), texts,
                                vq_cfg.codebook_size, seed)
    vocab_rows = -(-size // n) * n
    with open(os.path.join(model_dir, "params.json"), "w") as f:
        json.dump({"model": dict(PARAMS, vocab_size=vocab_rows), "seed": 1}, f)
    with open(os.path.join(model_dir, "consolidate_params.json"), "w") as f:
        json.dump({"model_parallel_size": n}, f)
    shards = random_shards(vocab_rows, n, seed)
    for r, sd in enumerate(shards):
        torch.save(sd, os.path.join(model_dir, f"consolidated.{r:02d}.pth"))
    write_vqgan(tok_dir, vq_cfg, vq_params)
    return shards


def _rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [b, l, h, d]: rotate each adjacent pair (2j, 2j+1) by position * theta^(-2j/d)."""
    d, length = x.shape[-1], x.shape[1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * rot[None, :, None]).flatten(-2)


def reference_logits(shards: list[dict], tokens: np.ndarray, p=PARAMS) -> np.ndarray:
    """f32 logits [b, l, vocab_rows] of the released architecture over `tokens` (its ids)."""
    n, dim, heads, kv = len(shards), p["dim"], p["n_heads"], p["n_kv_heads"]
    hd, eps = dim // heads, p["norm_eps"]
    w = lambda sd, k: sd[k].float()  # noqa: E731
    rms = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g  # noqa: E731
    tok = torch.from_numpy(tokens)
    b, length = tokens.shape
    h = torch.cat([F.embedding(tok, w(sd, "tok_embeddings.weight")) for sd in shards], -1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        x, attn = rms(h, w(shards[0], pre + "attention_norm.weight")), 0
        for sd in shards:  # Each rank: its heads, its q/k norm; outputs summed (all-reduce).
            q = (x @ w(sd, pre + "attention.wq.weight").T).view(b, length, heads // n, hd)
            k = (x @ w(sd, pre + "attention.wk.weight").T).view(b, length, kv // n, hd)
            v = (x @ w(sd, pre + "attention.wv.weight").T).view(b, length, kv // n, hd)
            q = F.layer_norm(q, (hd,), w(sd, pre + "attention.q_normalization.weight"),
                             w(sd, pre + "attention.q_normalization.bias"), eps)
            k = F.layer_norm(k, (hd,), w(sd, pre + "attention.k_normalization.weight"),
                             w(sd, pre + "attention.k_normalization.bias"), eps)
            q, k = _rope_interleaved(q, p["rope_theta"]), _rope_interleaved(k, p["rope_theta"])
            k, v = (t.repeat_interleave(heads // kv, dim=2) for t in (k, v))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1)
            attn = attn + o @ w(sd, pre + "attention.wo.weight").T
        h = h + attn
        x, ffn = rms(h, w(shards[0], pre + "ffn_norm.weight")), 0
        for sd in shards:
            gate = F.silu(x @ w(sd, pre + "feed_forward.w1.weight").T)
            ffn = ffn + (gate * (x @ w(sd, pre + "feed_forward.w3.weight").T)) \
                @ w(sd, pre + "feed_forward.w2.weight").T
        h = h + ffn
    x = rms(h, w(shards[0], "norm.weight"))
    return torch.cat([x @ w(sd, "output.weight").T for sd in shards], -1).numpy()
