"""
SLVP: Self-supervised Language-Video Pre-training for Referring Video Object Segmentation.

The whole model in one file, in the paper's order:
  1. config
  2. text encoder (T5) and its Hugging Face loader            (Sec. 4.1, "T5-pretrained text encoder")
  3. vision encoder (ViT) and its open_clip / timm loader      (Sec. 4.1, "CoCa-pretrained visual encoder")
  4. decoder and the two fusion modes                          (Eq. (2) vision as query, Eq. (8) language as query)
  5. pre-training: flow head and photometric loss              (Eq. (3), Eq. (1))
  6. transfer: box and mask heads and their losses             (Eq. (4), Eqs. (5)-(7))
  7. tokenizer and checkpoint io

Conventions the paper leaves open (units, layouts, masks, initialization) are stated where they apply.
"""
import dataclasses
import hashlib
import json
import math
import numbers
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import flow_warp_triton

# CoCa / OpenAI CLIP pixel statistics: frames enter as RGB in [0, 1] and are normalized inside the model.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SLVPConfig:
    frame_size: tuple = (360, 648)   # (H, W) of every frame
    patch_size: int = 18             # p
    num_frames: int = 4              # T
    max_text_len: int = 64           # L
    # text encoder (T5)
    vocab_size: int = 32128
    t5_dim: int = 768
    t5_layers: int = 12
    t5_heads: int = 12
    t5_d_kv: int = 64
    t5_d_ff: int = 3072
    t5_gated: bool = False           # False: t5 (relu FFN); True: t5-v1_1 / flan-t5 (gated tanh-GELU FFN)
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    t5_eps: float = 1e-6
    # vision encoder (ViT)
    vit_dim: int = 768
    vit_layers: int = 12
    vit_heads: int = 12
    vit_mlp: int = 3072
    vit_eps: float = 1e-5            # CoCa / open_clip LayerNorm; timm ViTs use 1e-6
    vit_norm_pre: bool = True        # LayerNorm after adding the position embedding (open_clip ln_pre)
    vit_norm_final: bool = False     # LayerNorm after the last block (timm norm, CLIP ln_post; CoCa has none)
    # decoder
    dec_dim: int = 768               # d
    dec_layers: int = 8
    dec_heads: int = 12
    dec_mlp: int = 2048

    def __post_init__(self):
        self.frame_size = tuple(self.frame_size)
        H, W = self.frame_size
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"frame_size {self.frame_size} is not divisible by patch_size {self.patch_size}")
        if self.dec_dim % 4:  # sincos_2d: a sine and a cosine for the row and for the column
            raise ValueError(f"dec_dim {self.dec_dim} is not a multiple of 4 (E_pos starts as 2-D sin-cos codes)")
        for width, heads in (("dec_dim", "dec_heads"), ("vit_dim", "vit_heads")):  # Attention splits the width
            if getattr(self, heads) < 1:
                raise ValueError(f"{heads} {getattr(self, heads)}: expected at least 1 attention head")
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} {getattr(self, width)} is not divisible by {heads} {getattr(self, heads)}")

    @property
    def grid(self):
        return self.frame_size[0] // self.patch_size, self.frame_size[1] // self.patch_size

    @property
    def num_patches(self):  # N, tokens per frame
        return self.grid[0] * self.grid[1]

    @classmethod
    def paper(cls):
        """Sec. 4.1: T5-base text encoder, CoCa ViT-B vision encoder, 8-layer decoder, 360x648 frames, p=18, T=4, L=64."""
        return cls()

    @classmethod
    def tiny(cls):
        """A CPU-sized model for the default run and the tests: 32x48 frames, a 4-layer decoder of width 128 (8 heads),
        which learns the synthetic motion from Eq. (1) alone, its onset at step 750-2500 on each of 13 seeds (README,
        "The default run"). The text width differs from the decoder width so that the projection path is exercised;
        L = 32 pieces holds every synthetic caption whole (with the main job's tokenizer at most 26 pieces with </s>,
        three objects that stay still and a pan; the longest of 20,000 clips had 25)."""
        return cls(frame_size=(32, 48), patch_size=8, num_frames=4, max_text_len=32,
                   vocab_size=1000, t5_dim=48, t5_layers=2, t5_heads=4, t5_d_kv=12, t5_d_ff=96,
                   vit_dim=64, vit_layers=2, vit_heads=4, vit_mlp=128,
                   dec_dim=128, dec_layers=4, dec_heads=8, dec_mlp=256)

    @classmethod
    def small(cls):
        """tiny() at 64x96 frames (an 8x12 patch grid). Its pre-training finds the motion later than tiny()'s (step
        750-2500): at step 5500-8500 of a 12000-step schedule on seeds 0-6 (README, "How the miniature learns flow")."""
        return dataclasses.replace(cls.tiny(), frame_size=(64, 96))


# ----------------------------------------------------------------------------------------------------------
# Shared pieces: multi-head attention through F.scaled_dot_product_attention, and strict state-dict checks
# ----------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with biased projections (ViT blocks and the decoder). `key_mask` is Bool[B, S],
    True where a key may be attended to."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, context=None, key_mask=None):
        context = x if context is None else context
        B, Lq, D = x.shape
        h = self.heads
        q = self.q(x).view(B, Lq, h, D // h).transpose(1, 2)             # [B, h, Lq, D/h]
        k = self.k(context).view(B, -1, h, D // h).transpose(1, 2)       # [B, h, S, D/h]
        v = self.v(context).view(B, -1, h, D // h).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, Lq, D))


def check_state_dict(module, state, what):
    """Strict load: every missing, unexpected or mis-shaped tensor is named in one error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{what} does not match the model:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mis-shaped: {k}" for k in misshaped]
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)


def read_tensors(path):
    """A .safetensors file, a torch pickle (.bin/.pt/.pth, loaded with weights_only), or a Hugging Face sharded
    index (*.index.json). Unwraps {"state_dict": ...} and {"model": ...} and DDP's "module." prefix. A missing,
    truncated or other file fails naming it."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    expected = "expected a .safetensors file, a torch state dict (.bin/.pt/.pth) or a sharded index (.index.json)"
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a sharded checkpoint index ({type(e).__name__}: {e}); {expected}") from e
        state = {}
        for shard in shards:
            state.update(read_tensors(path.parent / shard))
        return state
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:                       # not a pickle, or one of more than tensors
        raise ValueError(f"{path}: not a pickle of tensors; {expected}") from e
    except Exception as e:  # a bad header, a truncated zip, an empty file (SafetensorError, RuntimeError, EOFError);
        # other bytes make the weights-only unpickler raise KeyError (a file starting with 'h' or 'j'), ValueError, ...
        raise ValueError(f"{path}: unreadable weights ({type(e).__name__}"
                         f"{': ' + str(e).splitlines()[0] if str(e) else ''}); {expected}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of tensors; {expected}")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------
# 2. Text encoder: T5 (Raffel et al.), encoder stack only
# ----------------------------------------------------------------------------------------------------------

class T5RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean subtraction, statistics in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def t5_relative_buckets(L, num_buckets, max_distance, device):
    """Bidirectional relative position buckets: half the buckets for keys after the query, half for before;
    within each half, exact offsets below num_buckets/4, then logarithmic bins up to max_distance."""
    pos = torch.arange(L, device=device)
    rel = pos[None, :] - pos[:, None]                                    # [Lq, Lk]: key - query
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    log_bin = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                       * (half - exact)).long()
    bucket += torch.where(n < exact, n, log_bin.clamp(max=half - 1))
    return bucket


class T5Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = cfg.t5_heads * cfg.t5_d_kv
        self.heads, self.d_kv = cfg.t5_heads, cfg.t5_d_kv
        self.norm1 = T5RMSNorm(cfg.t5_dim, cfg.t5_eps)
        self.q = nn.Linear(cfg.t5_dim, inner, bias=False)
        self.k = nn.Linear(cfg.t5_dim, inner, bias=False)
        self.v = nn.Linear(cfg.t5_dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.t5_dim, bias=False)
        self.norm2 = T5RMSNorm(cfg.t5_dim, cfg.t5_eps)
        self.gated = cfg.t5_gated
        if cfg.t5_gated:  # t5-v1_1 / flan-t5: wo(gelu_tanh(wi_0 x) * wi_1 x)
            self.wi_0 = nn.Linear(cfg.t5_dim, cfg.t5_d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.t5_dim, cfg.t5_d_ff, bias=False)
        else:             # original t5: wo(relu(wi x))
            self.wi = nn.Linear(cfg.t5_dim, cfg.t5_d_ff, bias=False)
        self.wo = nn.Linear(cfg.t5_d_ff, cfg.t5_dim, bias=False)

    def forward(self, x, bias):
        B, L, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(B, L, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d) scaling into its weights: attention is unscaled, position bias added to scores
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, h, L, d_kv]
        x = x + self.o(y.transpose(1, 2).reshape(B, L, -1))
        h = self.norm2(x)
        h = F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h) if self.gated else F.relu(self.wi(h))
        return x + self.wo(h)


class T5Encoder(nn.Module):
    """ids Long[B, L], mask Bool[B, L] -> f_r Float[B, L, t5_dim]. Padded query rows are computed, not zeroed."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.t5_dim)
        # one relative position bias table, computed once per forward and shared by all layers
        self.rel_bias = nn.Embedding(cfg.t5_num_buckets, cfg.t5_heads)
        self.layers = nn.ModuleList(T5Layer(cfg) for _ in range(cfg.t5_layers))
        self.norm = T5RMSNorm(cfg.t5_dim, cfg.t5_eps)

    def forward(self, ids, mask):
        L = ids.shape[1]
        buckets = t5_relative_buckets(L, self.cfg.t5_num_buckets, self.cfg.t5_max_distance, ids.device)
        bias = self.rel_bias(buckets).permute(2, 0, 1)[None]                 # [1, h, L, L]
        neg = torch.finfo(bias.dtype).min
        bias = bias + torch.zeros_like(mask, dtype=bias.dtype).masked_fill(~mask, neg)[:, None, None, :]  # keys off
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm(x)


def load_t5(path):
    """A Hugging Face T5 folder (config.json + model.safetensors, pytorch_model.bin or a sharded index) of
    t5, t5-v1_1 or flan-t5, saved as T5EncoderModel or as the full seq2seq model. The decoder is ignored."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected a Hugging Face T5 folder with config.json")
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: not JSON ({e}); expected a T5 config") from e
    if not isinstance(hf, dict) or any(k not in hf for k in keys):
        raise ValueError(f"{path / 'config.json'}: not a T5 config; expected JSON with {', '.join(keys)}")
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            state = read_tensors(path / name)
            break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their .index.json)")
    gated = any(".wi_0." in k for k in state)   # the FFN type, read off the weights, not the config string
    if gated and not hf.get("feed_forward_proj", "gated-gelu").endswith("gelu"):
        raise ValueError(f"{path}: gated FFN with activation {hf['feed_forward_proj']!r}; only gated-gelu is supported")
    if not gated and hf.get("feed_forward_proj", "relu") != "relu":
        raise ValueError(f"{path}: FFN with activation {hf['feed_forward_proj']!r}; only relu (t5) and gated-gelu "
                         f"(t5-v1_1, flan-t5) are supported")
    cfg = SLVPConfig(vocab_size=hf["vocab_size"], t5_dim=hf["d_model"], t5_layers=hf["num_layers"],
                     t5_heads=hf["num_heads"], t5_d_kv=hf["d_kv"], t5_d_ff=hf["d_ff"], t5_gated=gated,
                     t5_num_buckets=hf.get("relative_attention_num_buckets", 32),
                     t5_max_distance=hf.get("relative_attention_max_distance", 128),
                     t5_eps=hf.get("layer_norm_epsilon", 1e-6))
    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if embed is None:
        raise ValueError(f"{path}: neither shared.weight nor encoder.embed_tokens.weight in the checkpoint")
    ours = {"embed.weight": embed}
    for k, v in state.items():
        if not k.startswith("encoder.") or k == "encoder.embed_tokens.weight":
            continue  # decoder, lm_head, shared: not part of the encoder
        name = k[len("encoder."):]
        if name == "final_layer_norm.weight":
            ours["norm.weight"] = v
            continue
        if name == "block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            ours["rel_bias.weight"] = v
            continue
        parts = name.split(".")  # block.{i}.layer.{j}.{SelfAttention|DenseReluDense|layer_norm}...
        if len(parts) >= 5 and parts[0] == "block" and parts[2] == "layer":
            i, j, rest = parts[1], parts[3], ".".join(parts[4:])
            table = {("0", "layer_norm.weight"): "norm1.weight", ("1", "layer_norm.weight"): "norm2.weight",
                     **{("0", f"SelfAttention.{p}.weight"): f"{p}.weight" for p in "qkvo"},
                     **{("1", f"DenseReluDense.{p}.weight"): f"{p}.weight" for p in ("wi", "wi_0", "wi_1", "wo")}}
            if (j, rest) in table:
                ours[f"layers.{i}.{table[j, rest]}"] = v
                continue
        ours["(unconverted) encoder." + name] = v
    model = T5Encoder(cfg)
    check_state_dict(model, ours, f"T5 checkpoint {path}")
    return model


# ----------------------------------------------------------------------------------------------------------
# 3. Vision encoder: ViT, applied to each frame on its own
# ----------------------------------------------------------------------------------------------------------

class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vit_dim, eps=cfg.vit_eps)
        self.attn = Attention(cfg.vit_dim, cfg.vit_heads)
        self.norm2 = nn.LayerNorm(cfg.vit_dim, eps=cfg.vit_eps)
        self.fc1 = nn.Linear(cfg.vit_dim, cfg.vit_mlp)
        self.fc2 = nn.Linear(cfg.vit_mlp, cfg.vit_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # exact GELU, as CoCa


class ViTEncoder(nn.Module):
    """images Float[B, 3, H, W] (normalized) -> patch tokens Float[B, N, vit_dim] (no class token)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.vit_dim
        self.patch_embed = nn.Conv2d(3, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(D))
        self.pos_embed = nn.Parameter(torch.zeros(1 + cfg.num_patches, D))   # class token first, then the grid
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.vit_eps) if cfg.vit_norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.vit_eps) if cfg.vit_norm_final else nn.Identity()

    def forward(self, images):
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.cfg.frame_size:
            raise ValueError(f"images {tuple(images.shape)} do not match the config: expected [B, 3, H, W] with "
                             f"(H, W) = frame_size {self.cfg.frame_size} (the position embedding's grid)")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)              # [B, N, D]
        # the class token stays in the sequence (the pretrained blocks attend to it); only the N patch tokens leave
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)  # [B, 1+N, D]
        x = self.norm_pre(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]                                           # [B, N, D]


def resample_patch_embed(weight, new_size):
    """FlexiViT resize of a patch-embedding kernel [D, C, h, w] -> [D, C, *new_size]: the kernel w' that
    minimizes |<x, w> - <resize(x), w'>| for all x, i.e. w' = pinv(R^T) w with R the bicubic antialiased resize
    matrix. Same tensors as timm's resample_patch_embed (float32 matrix, float32 pseudo-inverse)."""
    old_size = tuple(weight.shape[-2:])
    if old_size == tuple(new_size):
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old).reshape(n_old, 1, *old_size)
    R = F.interpolate(basis, size=tuple(new_size), mode="bicubic", antialias=True, align_corners=False)
    R = R.reshape(n_old, -1).T                                               # [new_h*new_w, old_h*old_w]
    w = weight.float().flatten(2) @ torch.linalg.pinv(R)                     # [D, C, new_h*new_w]
    return w.reshape(*weight.shape[:2], *new_size).to(weight.dtype)


def resample_pos_embed(pos, new_grid):
    """Position embedding [1+n, D] (class token first, square old grid) -> [1+N, D] on new_grid: bicubic,
    antialiased, align_corners=False, in float32 (timm's resample_abs_pos_embed)."""
    n = pos.shape[0] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding of {n} grid tokens is not a square grid")
    if (side, side) == tuple(new_grid):
        return pos
    grid = pos[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)   # [1, D, side, side]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])


def load_vit(path, cfg):
    """An open_clip CLIP/CoCa checkpoint (keys visual.* or bare; conv1 without bias, stacked in_proj) or a timm
    ViT checkpoint. Width, depth and MLP size are read off the weights, heads = width / 64 (up to ViT-L's 1024; a
    wider ViT is refused, since its heads are not in the weights and vary: open_clip's ViT-H-14 has 16 of 80
    channels, timm's DINOv2 giant 24 of 64); patch size and grid
    come from cfg (patch embedding and position embedding resampled). Returns a ViTEncoder whose .cfg is cfg with
    the vision fields of the checkpoint. Two things it does not carry over: QuickGELU (this ViT uses exact GELU:
    OpenAI CLIP's weights and open_clip's other *-quickgelu ones, some LAION-400M, MetaCLIP and DFN, are not
    reproduced; use CoCa or GELU CLIP / timm weights), and a checkpoint's own pixel statistics: SLVP normalizes
    frames with CLIP's (PIXEL_MEAN, PIXEL_STD; CoCa's too), where many timm ViTs were trained with 0.5 / 0.5 or
    ImageNet's."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one .safetensors/.bin/.pt/.pth file, found {len(files)}")
        path = files[0]
    state = read_tensors(path)
    if any(k.startswith("visual.") for k in state):      # a whole open_clip model: keep the vision tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    ours, ignored = {}, ("proj", "head.", "fc_norm.")
    if "conv1.weight" in state:                          # ---- open_clip
        has_pool = any(k.startswith("attn_pool") for k in state)
        if has_pool:  # CoCa: ln_post normalizes the attentional pooler's output, which we drop with it
            ignored += ("attn_pool", "ln_post.")
        D = state["conv1.weight"].shape[0]
        eps, norm_pre, norm_final = 1e-5, "ln_pre.weight" in state, "ln_post.weight" in state and not has_pool
        ours["patch_embed.weight"] = state.pop("conv1.weight")
        ours["patch_embed.bias"] = torch.zeros(D)        # conv1 has no bias in open_clip
        ours["cls_token"] = state.pop("class_embedding")
        ours["pos_embed"] = state.pop("positional_embedding")
        rename = {"ln_pre.": "norm_pre.", "ln_1.": "norm1.", "ln_2.": "norm2.", "attn.out_proj.": "attn.o.",
                  "mlp.c_fc.": "fc1.", "mlp.c_proj.": "fc2.", "transformer.resblocks.": "blocks."}
        if norm_final:
            rename["ln_post."] = "norm."
        qkv = "attn.in_proj_"
    elif "patch_embed.proj.weight" in state:             # ---- timm
        D = state["patch_embed.proj.weight"].shape[0]
        norm_pre, norm_final = "norm_pre.weight" in state, "norm.weight" in state
        # timm's CLIP image towers (vit_*_clip_*: pre_norm=True) have a norm_pre, no patch-embedding bias and
        # LayerNorm eps 1e-5, as open_clip; its other ViTs 1e-6
        eps = 1e-5 if norm_pre else 1e-6
        ours["patch_embed.weight"] = state.pop("patch_embed.proj.weight")
        if "patch_embed.proj.bias" in state:
            ours["patch_embed.bias"] = state.pop("patch_embed.proj.bias")
        elif norm_pre:                                   # timm builds the CLIP towers' patch embedding without one
            ours["patch_embed.bias"] = torch.zeros(D)    # (other ViTs without it: "missing" in the strict check)
        if "cls_token" not in state:
            raise ValueError(f"{path}: timm ViT without a class token is not supported")
        ours["cls_token"] = state.pop("cls_token").reshape(D)
        ours["pos_embed"] = state.pop("pos_embed")[0]
        rename = {"attn.proj.": "attn.o.", "mlp.fc1.": "fc1.", "mlp.fc2.": "fc2."}
        qkv = "attn.qkv."
    else:
        raise ValueError(f"{path}: neither an open_clip (conv1.weight) nor a timm (patch_embed.proj.weight) ViT")
    if D > 1024:  # every ViT up to ViT-L in open_clip's configs and timm's has 64 channels a head; wider ones vary
        raise ValueError(f"{path}: a ViT of width {D}, whose number of attention heads the weights do not give (64 "
                         f"channels a head up to ViT-L's 1024; ViT-H-14's 1280 has 16 heads of 80): expected a ViT "
                         f"up to ViT-L")
    for k, v in state.items():
        if k.startswith(ignored):
            continue
        for old, new in rename.items():
            k = k.replace(old, new)
        if qkv in k:  # stacked [3D, D] / [3D] -> q, k, v
            kind = "weight" if k.endswith("weight") else "bias"
            prefix = k[:k.index(qkv)]
            for name, part in zip("qkv", v.chunk(3)):
                ours[f"{prefix}attn.{name}.{kind}"] = part
        else:
            ours[k] = v
    layers = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("blocks."))
    vcfg = dataclasses.replace(cfg, vit_dim=D, vit_layers=layers, vit_heads=D // 64,
                               vit_mlp=ours["blocks.0.fc1.weight"].shape[0], vit_eps=eps,
                               vit_norm_pre=norm_pre, vit_norm_final=norm_final)
    ours["patch_embed.weight"] = resample_patch_embed(ours["patch_embed.weight"], (cfg.patch_size, cfg.patch_size))
    ours["pos_embed"] = resample_pos_embed(ours["pos_embed"], cfg.grid)
    model = ViTEncoder(vcfg)
    check_state_dict(model, ours, f"ViT checkpoint {path}")
    return model


# ----------------------------------------------------------------------------------------------------------
# 4. Decoder 𝕋 of Eqs. (2) and (8): pre-norm self-attention, cross-attention, feed-forward
# ----------------------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dec_dim
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.dec_heads)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.dec_heads)
        self.norm3 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.dec_mlp)
        self.fc2 = nn.Linear(cfg.dec_mlp, d)

    def forward(self, x, memory, self_mask=None, memory_mask=None):
        x = x + self.self_attn(self.norm1(x), key_mask=self_mask)
        x = x + self.cross_attn(self.norm2(x), memory, key_mask=memory_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm3(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.dec_dim)

    def forward(self, query, memory, self_mask=None, memory_mask=None):
        for layer in self.layers:
            query = layer(query, memory, self_mask, memory_mask)
        return self.norm(query)


def sincos_1d(n, d):
    """[n, d] codes of the positions 0..n-1 (d even): sin(pos * w_k) then cos(pos * w_k), with d/2 frequencies w_k spread
    geometrically from 0.9 pi rad per step (just under the pi at which sin vanishes on a grid) down to pi / n (half a
    period over the n positions). The codes of Vaswani et al. and MAE (w_k = 10000^(-2k/d), 1 rad down to 1e-4) are
    flat over a few positions: on the tiny config's 4x6 grid two neighbouring patches' codes are 0.98 alike (here
    0.59 across columns, 0.50 across rows), and the decoder was slower to learn to read frame 1 at a token's own
    place, which the flow waits for (README, "How the miniature learns flow")."""
    w = 0.9 * math.pi * (1 / (0.9 * n)) ** torch.linspace(0, 1, d // 2, dtype=torch.float64)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * w[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_2d(gh, gw, d):
    """[gh*gw, d] for a gh x gw grid, row-major: half the channels encode the row, half the column (MAE); d a
    multiple of 4 (SLVPConfig checks dec_dim)."""
    rows = sincos_1d(gh, d // 2)[:, None, :].expand(gh, gw, d // 2)
    cols = sincos_1d(gw, d // 2)[None, :, :].expand(gh, gw, d // 2)
    return torch.cat([rows, cols], dim=-1).reshape(gh * gw, d)


def unpatchify(x, cfg, channels):
    """[B, T*N, p*p*C] -> [B, T, C, H, W], each token's p*p*C values laid out (p, p, C) as in MAE."""
    T, (gh, gw), p = cfg.num_frames, cfg.grid, cfg.patch_size
    B = x.shape[0]
    x = x.reshape(B, T, gh, gw, p, p, channels)
    x = torch.einsum("bthwpqc->btchpwq", x)
    return x.reshape(B, T, channels, gh * p, gw * p)


# ----------------------------------------------------------------------------------------------------------
# 5.-6. The SLVP model: pre-training (flow) and transfer (boxes and masks)
# ----------------------------------------------------------------------------------------------------------

def _frozen(part):
    """A property over an encoder's requires_grad: read, no parameter requires grad; set, all or none do."""
    return property(lambda self: not any(p.requires_grad for p in getattr(self, part).parameters()),
                    lambda self, frozen: getattr(self, part).requires_grad_(not frozen))


class SLVP(nn.Module):
    """fusion: "vision" (vision as query, Eq. (2)) or "language" (language as query, Eq. (8)).
    task: "pretrain" (flow head, Eq. (3)) or "rvos" (box and mask heads, Eq. (4); the paper's transfer learning,
    train.py --mode finetune).
    freeze_text / freeze_vision: None takes the paper's choice: pre-training freezes both encoders (Sec. 4.1);
    transfer freezes the text encoder only (Table 1 and Table 2's best row, Ref-DAVIS17; on VISOR the best
    vision-as-query row of Table 3 trains it, freeze_text=False)."""

    def __init__(self, cfg, fusion="vision", task="pretrain", freeze_text=None, freeze_vision=None):
        super().__init__()
        if fusion not in ("vision", "language"):
            raise ValueError(f"fusion must be 'vision' or 'language', got {fusion!r}")
        if task not in ("pretrain", "rvos"):
            raise ValueError(f"task must be 'pretrain' or 'rvos', got {task!r}")
        if task == "pretrain" and cfg.num_frames < 2:  # Eq. (1) pairs frames 2..T with frame 1: none at T = 1
            raise ValueError(f"num_frames {cfg.num_frames}: pre-training (Eq. (1)) needs at least 2 frames")
        self.cfg, self.fusion, self.task = cfg, fusion, task
        d, p = cfg.dec_dim, cfg.patch_size
        self.text = T5Encoder(cfg)
        self.vision = ViTEncoder(cfg)
        self.text_proj = nn.Linear(cfg.t5_dim, d) if cfg.t5_dim != d else nn.Identity()
        self.vision_proj = nn.Linear(cfg.vit_dim, d) if cfg.vit_dim != d else nn.Identity()
        # learnable (Eq. (2)); initialized as sin-cos of the patch row and column (E_pos) and of the frame index
        # (E_tem), at frequencies the grid can show (sincos_1d), so that attention can tell positions apart from
        # the first step (vision as query; language as query starts them otherwise, below)
        self.E_pos = nn.Parameter(sincos_2d(*cfg.grid, d))                  # N x d
        self.E_tem = nn.Parameter(sincos_1d(cfg.num_frames, d))             # T x d
        self.decoder = Decoder(cfg)
        if fusion == "language":
            self.q = nn.Parameter(torch.zeros(d))                           # shared learnable query token
            nn.init.trunc_normal_(self.q, std=0.02)
            # q^ holds no content: it finds its patch in f_v by position alone (Eq. (8)), which MAE's sin-cos
            # codes, nearly flat over a few patches, could not do by a dot product. So here E_pos and E_tem start
            # as Gaussian codes (nearly orthogonal) and the first cross-attention's key projection equal to its
            # query projection (W_k, b_k = W_q, b_q), both scaled 4x (the logits 16x), so that q^ + E_pos + E_tem
            # reads its own patch of f_v from the first step (README, "How the miniature learns flow": without it,
            # language as query learned no flow; from sincos_2d, a later and weaker one)
            nn.init.normal_(self.E_pos)
            nn.init.normal_(self.E_tem)
            read = self.decoder.layers[0].cross_attn
            with torch.no_grad():
                read.q.weight.mul_(4)
                read.q.bias.mul_(4)
                read.k.load_state_dict(read.q.state_dict())
        if task == "pretrain":
            self.flow_head = nn.Linear(d, p * p * 2)                        # Eq. (3)
            nn.init.zeros_(self.flow_head.weight)                           # start from the zero flow (identity warp)
            nn.init.zeros_(self.flow_head.bias)
        else:
            self.box_head = nn.Linear(d, 4)                                 # Eq. (4)
            self.mask_head = nn.Linear(d + 4, p * p)                        # token ++ its frame's box (Sec. 4.1)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze_text = True if freeze_text is None else freeze_text          # sets requires_grad (below)
        self.freeze_vision = (task == "pretrain") if freeze_vision is None else freeze_vision

    # freeze_text / freeze_vision are what the encoders' parameters say: `model.text.requires_grad_(True)` unfreezes
    # the text encoder as `freeze_text = False` does, and save_checkpoint records it
    freeze_text, freeze_vision = _frozen("text"), _frozen("vision")

    # -- encoders: f_v [B, T*N, d] and f_r [B, L, d] ---------------------------------------------------------
    def encode(self, frames, ids, mask):
        if (frames.dim() != 5 or len(frames) == 0 or tuple(frames.shape[1:3]) != (self.cfg.num_frames, 3)
                or tuple(frames.shape[-2:]) != self.cfg.frame_size):
            raise ValueError(f"frames {tuple(frames.shape)} do not match the config (T={self.cfg.num_frames}, "
                             f"frame_size={self.cfg.frame_size}): expected [B >= 1, T, 3 (RGB), H, W]")
        if not frames.is_floating_point():
            raise TypeError(f"frames are {frames.dtype}; expected floating-point RGB in [0, 1] (e.g. "
                            f"frames.float() / 255)")
        B, T = frames.shape[:2]
        if ids.dim() != 2 or ids.shape[0] != B or mask.shape != ids.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)}: expected [B, L] each, with the "
                             f"frames' B = {B}")
        if mask.dtype != torch.bool:   # (a Hugging Face attention_mask is int64 0/1: mask.bool())
            raise TypeError(f"mask is {mask.dtype}; expected bool, True at the text's tokens (as Tokenizer gives it)")
        x = (frames.flatten(0, 1).to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std   # [B*T, 3, H, W]
        # a frozen encoder's parameters do not require grad: autograd records nothing of it (the frames and ids do not)
        f_v = self.vision(x)                                                # [B*T, N, vit_dim], each frame alone
        f_r = self.text(ids, mask)                                          # [B, L, t5_dim]
        f_v = self.vision_proj(f_v).reshape(B, T * self.cfg.num_patches, -1)  # [B, T*N, d]
        return f_v, self.text_proj(f_r)

    def fuse(self, frames, ids, mask):
        """f_fused [B, T*N, d]: Eq. (2)'s output (vision as query), or the last T*N of Eq. (8)'s L + T*N output
        tokens (language as query), the ones the heads read."""
        f_v, f_r = self.encode(frames, ids, mask)
        B, TN, d = f_v.shape
        # E_pos repeated T times, E_tem repeated N times (Eq. (2))
        pos = (self.E_tem[:, None, :] + self.E_pos[None, :, :]).reshape(1, TN, d)
        if self.fusion == "vision":
            # Eq. (2): f_fused = 𝕋(f_v + E_pos + E_tem, f_r); padded text keys masked in cross-attention
            return self.decoder(f_v + pos, f_r, memory_mask=mask)
        # Eq. (8): f_fused = 𝕋(cat(f_r, q^ + E_pos + E_tem), f_v + E_pos + E_tem); padded text keys masked in
        # self-attention; only the last T*N outputs are kept
        q_hat = self.q.expand(B, TN, d)                                     # q repeated T*N times
        self_mask = torch.cat([mask, mask.new_ones(B, TN)], dim=1)          # [B, L + T*N]
        out = self.decoder(torch.cat([f_r, q_hat + pos], dim=1), f_v + pos, self_mask=self_mask)
        return out[:, -TN:]

    # -- pre-training ----------------------------------------------------------------------------------------
    def flow(self, frames, ids, mask):
        """o_(i,1) for every frame i: Float[B, T, 2, H, W] in pixels, channel 0 = x, 1 = y; frame i's pixel p
        takes its colour from frame 1 at p + o_(i,1)(p). Frame 1's own o_(1,1) is output but never trained (Eq. (1) is
        taken over i = 2..T, SPEC §3: for i = 1 it would compare frame 1 with itself); the evaluations leave it out."""
        if self.task != "pretrain":
            raise RuntimeError("flow() needs task='pretrain'; the transfer model has no flow head")
        f_fused = self.fuse(frames, ids, mask)
        with torch.autocast(frames.device.type, enabled=False):  # flow in float32: bf16 rounds 8 px to 1/16 px
            return unpatchify(self.flow_head(f_fused.to(self.flow_head.weight.dtype)), self.cfg, 2)  # Eq. (3)

    def pretrain_loss(self, frames, ids, mask):
        """Eq. (1) on this model's flow: (loss, flow). train.py applies photometric_objective to forward()'s flow
        itself (DDP syncs gradients only through forward()): a change of the objective goes there, not here."""
        flow = self.flow(frames, ids, mask)
        return photometric_objective(frames, flow), flow

    # -- transfer --------------------------------------------------------------------------------------------
    def forward(self, frames, ids, mask):
        """Transfer model, Eq. (4): {"boxes": Float[B, T, 4] normalized (x1, y1, x2, y2), "masks": Float[B, T, H, W]
        logits}. Pre-training model: the flow, as flow()."""
        if self.task == "pretrain":
            return self.flow(frames, ids, mask)
        f_fused = self.fuse(frames, ids, mask)                              # [B, T*N, d]
        B, TN, d = f_fused.shape
        T, N = self.cfg.num_frames, self.cfg.num_patches
        f_max = f_fused.view(B, T, N, d).amax(dim=2)                        # [B, T, d]: MaxPooling per frame
        with torch.autocast(frames.device.type, enabled=False):  # boxes in float32: bf16 rounds 0.5..1 to 1/256
            f_max = f_max.to(self.box_head.weight.dtype)                    # (a model cast to bf16: its own dtype)
            cx, cy, w, h = torch.sigmoid(self.box_head(f_max)).unbind(-1)  # normalized centre and size
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)  # [B, T, 4]
            # clamped to the frame, the gradient passed as if unclamped: an edge beyond the frame is still pulled
            # back by Eqs. (5), (6), where a plain clamp would leave it without a gradient
            boxes = boxes + (boxes.clamp(0, 1) - boxes).detach()
        box_per_token = boxes[:, :, None, :].expand(B, T, N, 4).reshape(B, TN, 4)
        logits = self.mask_head(torch.cat([f_fused, box_per_token.to(f_fused.dtype)], dim=-1))  # [B, T*N, p*p]
        return {"boxes": boxes, "masks": unpatchify(logits, self.cfg, 1)[:, :, 0]}

    def rvos_loss(self, out, boxes, masks, valid, num_valid=None):
        """Eqs. (5)-(7): 5 L1 + 1 GIoU on the boxes of frames where the object is present (valid), 5 Dice + 1 BCE
        on the masks of all frames. The box terms are averaged over num_valid frames: by default those present in
        this batch; under DDP train.py passes the mean count over the processes, so that the averaged gradient
        equals that of one process with the whole batch. Losses in float32, without host synchronization."""
        if masks.shape != out["masks"].shape:
            raise ValueError(f"masks {tuple(masks.shape)} do not match the predicted {tuple(out['masks'].shape)} "
                             f"[B, T, H, W]")
        B, T = out["boxes"].shape[:2]
        if boxes.shape != (B, T, 4) or valid.shape != (B, T):
            raise ValueError(f"boxes {tuple(boxes.shape)} and valid {tuple(valid.shape)}: expected [B, T, 4] and "
                             f"[B, T], B, T = {B}, {T} as predicted")
        v = valid.float().flatten()                                         # [B*T]
        n = v.sum().clamp(min=1) if num_valid is None else num_valid
        pb, gb = out["boxes"].float().flatten(0, 1), boxes.float().flatten(0, 1)   # [B*T, 4]
        l1 = ((pb - gb).abs().sum(-1) * v).sum() / n                        # Eq. (6), mean over present frames
        giou = ((1 - generalized_box_iou(pb, gb)) * v).sum() / n            # Eq. (5)
        # 0/1 or 0/255 (bool, integer or float): the object is non-zero, as the evaluator reads masks; float targets
        # in [0, 1] stay as they are (a float 0/255 mask was a BCE target of 255)
        g = (masks != 0).float() if not masks.is_floating_point() else masks.float().clamp(0, 1)
        logits = out["masks"].float()
        dice = dice_loss(logits.sigmoid(), g)                               # Eq. (7)
        bce = F.binary_cross_entropy_with_logits(logits, g)                 # Eq. (7), mean over pixels
        loss = 5 * l1 + 1 * giou + 5 * dice + 1 * bce
        return loss, {"l1": l1.detach(), "giou": giou.detach(), "dice": dice.detach(), "bce": bce.detach()}


def photometric_objective(frames, flow):
    """Eq. (1): I_i = Flow(o_(i,1), V_1); L = mean over clips, i = 2..T, channels and pixels of (I_i - V_i)^2, for
    frames Float[B, T, 3, H, W] in [0, 1] and flow Float[B, T, 2, H, W]. The frames are data: only the flow gets a
    gradient."""
    B, T, C, H, W = frames.shape
    if T < 2:  # the mean over no frame pair was NaN, and train.py then stopped on a "non-finite loss"
        raise ValueError(f"frames {tuple(frames.shape)}: Eq. (1) pairs frames 2..T with frame 1; expected T >= 2")
    frames = frames.detach()
    V_1 = frames[:, :1].expand(B, T - 1, C, H, W).reshape(-1, C, H, W)      # [B*(T-1), C, H, W]
    V_i = frames[:, 1:].reshape(-1, C, H, W)
    return flow_warp_triton.photometric_loss(V_1, flow[:, 1:].reshape(-1, 2, H, W), V_i)


def generalized_box_iou(a, b):
    """Eq. (5) for matching rows of a = B_p and b = B_g, boxes (x1, y1, x2, y2): IoU - |C \\ (B_p u B_g)| / |C|."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    cw = torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])
    ch = torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    enclosing = cw * ch
    eps = 1e-7
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def dice_loss(m, g, smooth=1.0):
    """Eq. (7): 1 - 2 sum(m g) / (sum m^2 + sum g^2), summed over all pixels of a clip's T frames, averaged over
    clips; `smooth` (added above and below) makes a clip with an empty target and an empty prediction cost 0."""
    m, g = m.flatten(1), g.flatten(1)                                       # [B, T*H*W]
    return (1 - (2 * (m * g).sum(1) + smooth) / ((m * m).sum(1) + (g * g).sum(1) + smooth)).mean()


# ----------------------------------------------------------------------------------------------------------
# 7. Tokenizer and checkpoints
# ----------------------------------------------------------------------------------------------------------

class Tokenizer:
    """T5 conventions on a sentencepiece model: pieces + </s>, padded with <pad> = 0, no BOS; texts longer than
    max_len (at least 1) are cut to max_len - 1 pieces followed by </s>. max_len defaults to the paper's L = 64
    (SPEC §3); the tiny and small configs' L is 32: pass cfg.max_text_len."""

    def __init__(self, spiece_model_path):
        import sentencepiece
        self.path = str(spiece_model_path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"{self.path}: no such sentencepiece model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:   # its parse errors
            raise ValueError(f"{self.path}: not a sentencepiece model ({e}); expected a .model file such as T5's "
                             f"spiece.model") from e
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: the sentencepiece model needs <pad> and </s> ids (T5 uses 0 and 1)")

    def __len__(self):
        return self.sp.get_piece_size()

    def digest(self):
        """sha256 of the sentencepiece model (its file's bytes): what ckpt.safetensors records of the tokenizer its
        text encoder was trained with (check_tokenizer)."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    def __call__(self, texts, max_len=64):
        if isinstance(texts, str):
            raise TypeError(f"texts is a str ({texts[:40]!r}); expected a list of texts, e.g. [text]")
        texts = list(texts)
        if not texts:
            raise ValueError("no texts; expected a list of one or more")
        if not isinstance(max_len, numbers.Integral) or max_len < 1:  # [:max_len - 1] kept all but the last (-1)
            raise ValueError(f"max_len {max_len!r}: expected an integer of at least 1 (room for </s>)")
        rows = []
        for text in texts:
            if not text or not text.strip():
                raise ValueError(f"empty text in the batch (position {len(rows)}); every clip needs a caption or expression")
            rows.append(self.sp.encode(text)[:max_len - 1] + [self.eos_id])
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id


def save_checkpoint(path, model, **extra):
    """safetensors with the config, fusion and task in the metadata, plus any `extra` JSON-able fields. Written
    to a temporary file and renamed, so a kill during the save never loses the previous checkpoint."""
    from safetensors.torch import save_file
    model = getattr(model, "_orig_mod", model)   # torch.compile's wrapper: its state_dict's keys carry `_orig_mod.`
    for part in ("text", "vision"):   # the flags say whole encoders: a partly trained one reloads wholly trained
        grads = {p.requires_grad for p in getattr(model, part).parameters()}
        if len(grads) > 1:
            warnings.warn(f"the {part} encoder is partly frozen; the checkpoint records freeze_{part}=False and "
                          f"load_checkpoint trains all of it", stacklevel=2)
    meta = {"config": json.dumps(dataclasses.asdict(model.cfg)), "fusion": model.fusion, "task": model.task,
            "freeze_text": json.dumps(model.freeze_text), "freeze_vision": json.dumps(model.freeze_vision),
            "extra": json.dumps(extra)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)

    def write(tmp):
        save_file(state, str(tmp), metadata=meta)
        # the mode open() gives a file here (umask, or the folder's default ACL): save_file writes 0600 whatever they
        # say (safetensors issue #782); no os.umask, which sets the process's umask, every thread's, while it reads it
        probe = path.with_name(path.name + ".mode")
        probe.touch()
        os.chmod(tmp, probe.stat().st_mode & 0o7777)
        probe.unlink()
    atomic_write(path, write)


def atomic_write(path, write):
    """write(tmp) writes the file to path + ".tmp", which then replaces path: a kill during the write never loses the
    file before it. A write that fails removes its part (which would hold the disk space the next write needs)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_checkpoint_metadata(path):
    from safetensors import SafetensorError, safe_open
    path, expected = Path(path), "expected a ckpt.safetensors written by train.py"
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such checkpoint"
        raise FileNotFoundError(f"{path}: {what}; {expected}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:   # empty, truncated, or not safetensors at all
        raise ValueError(f"{path}: not a safetensors checkpoint ({e}); {expected}") from e
    if "config" not in meta:
        raise ValueError(f"{path}: not an SLVP checkpoint (no config in the safetensors metadata)")
    return meta


def check_tokenizer(path, tokenizer):
    """Refuses a tokenizer other than the one the checkpoint at `path` records (train.py writes its digest among the
    extra fields): another sentencepiece model of no more pieces than the vocabulary gives the text encoder other ids
    without any error. A checkpoint that records none (saved without it through the API) is not checked."""
    want = json.loads(read_checkpoint_metadata(path).get("extra", "{}")).get("tokenizer_sha256")
    if want is not None and want != tokenizer.digest():
        raise ValueError(f"{tokenizer.path} is not the sentencepiece model {path} was trained with (sha256 "
                         f"{tokenizer.digest()[:16]}..., the checkpoint records {want[:16]}...); expected the "
                         f"spm.model of the run that wrote it")


def load_checkpoint(path, task=None, **overrides):
    """The model saved at `path`. With task="rvos" on a pre-training checkpoint: the transfer model, with
    everything it shares with the pre-training model loaded, the flow head dropped and fresh box and mask heads.
    `overrides` (fusion is fixed by the checkpoint) go to SLVP(), e.g. freeze_text=False (config fields such as
    num_frames, frame_size or patch_size are refused: the weights fix them); loaded for its own task,
    the model keeps the checkpoint's freeze flags unless they are overridden (None: not overridden)."""
    from safetensors.torch import load_file
    meta = read_checkpoint_metadata(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("fusion") not in (None, meta["fusion"]):
        raise ValueError(f"{path} has fusion {meta['fusion']!r}; a checkpoint's fusion cannot be changed "
                         f"(its decoder was trained with it)")
    overrides.pop("fusion", None)
    fields = sorted(set(overrides) & {f.name for f in dataclasses.fields(SLVPConfig)})
    if fields:  # E_tem is T x d, E_pos and the patch embedding follow the grid: the weights fix the config
        raise ValueError(f"{path}: {', '.join(fields)} cannot be overridden; the checkpoint's weights fix its config "
                         f"(E_tem has one row per frame, E_pos one per patch of its grid, the patch embedding its "
                         f"patch size): fine-tune at the pre-training's T, frame size and patch size")
    try:
        cfg = SLVPConfig(**json.loads(meta["config"]))
    except (TypeError, ValueError) as e:   # fields of another version of SLVPConfig, or not JSON
        raise ValueError(f"{path}: its config does not fit this SLVPConfig ({e})") from e
    saved_task = meta["task"]
    task = task or saved_task
    if saved_task == "rvos" and task == "pretrain":
        raise ValueError(f"{path} is a transfer (rvos) checkpoint; it has no flow head to pre-train with")
    kw = {} if task != saved_task else {"freeze_text": json.loads(meta["freeze_text"]),
                                          "freeze_vision": json.loads(meta["freeze_vision"])}
    model = SLVP(cfg, fusion=meta["fusion"], task=task, **{**kw, **overrides})
    state = load_file(str(path))
    if task != saved_task:  # pre-training -> transfer: drop the flow head, keep the fresh box and mask heads
        state = {k: v for k, v in state.items() if not k.startswith("flow_head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(("box_head.", "mask_head."))})
    check_state_dict(model, state, f"checkpoint {path}")
    return model
