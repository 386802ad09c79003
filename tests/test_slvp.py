"""slvp.py against the libraries it replaces (transformers, timm, open_clip, sentencepiece) and against hand-worked
values. Every reference model is random-init and built here; nothing is downloaded."""
import dataclasses
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import slvp

TOL = 1e-4


def rescale_(model, gen):
    """Random weights of a size that makes a parity check meaningful: every activation O(1), so a wrong
    scaling, bias, norm or mask shows up far above the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[1] if "embed" not in name and "shared" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if "norm" in name or "ln" in name
                        else 0.2 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------- T5 parity

@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
@pytest.mark.parametrize("full_model", [False, True])
def test_t5_matches_transformers(tmp_path, ffn, full_model):
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration
    hf_cfg = T5Config(vocab_size=120, d_model=48, d_kv=16, d_ff=80, num_layers=3, num_decoder_layers=1,
                      num_heads=4, feed_forward_proj=ffn, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-3)
    torch.manual_seed(0)   # an epsilon far from T5's 1e-6, so that one not read from config.json shows above TOL
    hf = (T5ForConditionalGeneration if full_model else T5EncoderModel)(hf_cfg).eval()
    rescale_(hf, torch.Generator().manual_seed(1))
    hf.save_pretrained(tmp_path)
    ours = slvp.load_t5(tmp_path).eval()
    assert ours.cfg.t5_gated == (ffn == "gated-gelu")

    # a padded batch, long enough (L=40) that relative distances reach the logarithmic buckets
    ids = torch.randint(3, 120, (3, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mask[2, 7:] = False
    ids[~mask] = 0
    with torch.no_grad():
        encoder = hf.encoder if full_model else hf
        ref = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out = ours(ids, mask)
    assert ref.std() > 0.1
    err = (out - ref).abs().max().item()
    print(f"T5 {ffn} full={full_model}: max abs diff {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors", "sharded bin"])
def test_t5_loads_from_each_hugging_face_layout(tmp_path, layout):
    """load_t5 reads pytorch_model.bin (older and converted releases) and the sharded *.index.json of either format
    (t5-3b/11b, flan-t5-xl/xxl), not only model.safetensors: the encoder's output equals transformers' own."""
    from transformers import T5Config, T5EncoderModel
    hf_cfg = T5Config(vocab_size=120, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_heads=4, dropout_rate=0.0)
    torch.manual_seed(0)
    hf = T5EncoderModel(hf_cfg).eval()
    rescale_(hf, torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in hf.state_dict().items()}   # tied embeddings: one tensor each
    hf_cfg.save_pretrained(tmp_path)
    if layout == "pytorch_model.bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    elif layout == "sharded safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
        assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    else:                                                          # the index format, written by hand: two shards
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in shards.items():
            torch.save({k: state[k] for k in part}, tmp_path / name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    ours = slvp.load_t5(tmp_path).eval()
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert ref.std() > 0.1 and (ours(ids, mask) - ref).abs().max().item() < TOL


def test_t5_buckets_match_transformers_beyond_max_distance():
    """Distances up to 299, past max_distance (128), where the buckets stop at the last of each direction's half (31
    for keys after the query, 15 before it): the parity test's L = 40 never gets there."""
    from transformers.models.t5.modeling_t5 import T5Attention
    pos = torch.arange(300)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True, num_buckets=32,
                                                max_distance=128)
    got = slvp.t5_relative_buckets(300, 32, 128, "cpu")
    assert torch.equal(got, ref)
    assert got[0, 299] == 31 and got[299, 0] == 15


def test_t5_conversion_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5EncoderModel
    T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(16, 8)
    state["encoder.block.0.layer.0.SelfAttention.q.bias"] = torch.zeros(16)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        slvp.load_t5(tmp_path)
    msg = str(e.value)
    assert "missing: layers.1.wo.weight" in msg
    assert "mis-shaped: layers.0.q.weight" in msg
    assert "unexpected: (unconverted) encoder.block.0.layer.0.SelfAttention.q.bias" in msg


def test_t5_with_another_activation_fails(tmp_path):
    """The FFN's activation cannot be read off the weights: a non-gated T5 whose config asks for gelu must not run as
    relu."""
    from transformers import T5Config, T5EncoderModel
    T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                            feed_forward_proj="gelu")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"FFN with activation 'gelu'; only relu \(t5\) and gated-gelu"):
        slvp.load_t5(tmp_path)


# ---------------------------------------------------------------------------------------------- ViT parity

def timm_vit(img_size, patch):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=128, depth=2, num_heads=2,
                             mlp_ratio=2.0, num_classes=10).eval()


def open_clip_tower(img_size, patch, coca):
    import open_clip
    vcfg = open_clip.CLIPVisionCfg(layers=2, width=128, head_width=64, mlp_ratio=2.0, patch_size=patch,
                                   image_size=img_size, attentional_pool=coca, attn_pooler_heads=2,
                                   attn_pooler_queries=4, output_tokens=True)
    return open_clip.model._build_vision_tower(embed_dim=96, vision_cfg=vcfg).eval()


def open_clip_tokens(tower, x):
    """CLIP: the tower's own token output (ln_post applied, class token dropped). CoCa: its tokens are the
    attentional pooler's, so take the patch tokens after the last block from the transformer's output."""
    if tower.attn_pool is None:
        return tower(x)[1]
    got = {}
    handle = tower.transformer.register_forward_hook(lambda m, i, o: got.setdefault("x", o))
    tower(x)
    handle.remove()
    return got["x"][:, 1:]


def resampled_with_timm(state, key_patch, key_pos, patch, grid, pos_batch):
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    state = dict(state)
    state[key_patch] = resample_patch_embed(state[key_patch], [patch, patch])
    pos = state[key_pos] if pos_batch else state[key_pos][None]
    pos = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)
    state[key_pos] = pos if pos_batch else pos[0]
    return state


@pytest.mark.parametrize("patch, old_grid, grid", [(32, 7, (20, 36)), (16, 32, (20, 36)), (14, 16, (12, 12)),
                                                    (8, 4, (20, 36))])
def test_resampling_equals_timms_also_shrinking(patch, old_grid, grid):
    """The patch kernel resized to the paper's 18 (from ViT-B/32's 32 and /16's 16: smaller; from 8: larger; 14 kept)
    and the position table to a grid smaller or larger than the checkpoint's, against timm's resample_patch_embed and
    resample_abs_pos_embed on the same tensors (the parity test above resamples one way only: 8 to 18, 4x4 to 20x36)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    g = torch.Generator().manual_seed(0)
    w, pos = torch.randn(16, 3, patch, patch, generator=g), torch.randn(1 + old_grid ** 2, 16, generator=g)
    new = (18, 18) if patch != 14 else (14, 14)
    assert (slvp.resample_patch_embed(w, new) - resample_patch_embed(w, list(new))).abs().max() < 1e-6
    ref = resample_abs_pos_embed(pos[None], new_size=list(grid), num_prefix_tokens=1)[0]
    assert (slvp.resample_pos_embed(pos, grid) - ref).abs().max() < 1e-6


def frame_cfg(H, W, patch):
    return dataclasses.replace(slvp.SLVPConfig.tiny(), frame_size=(H, W), patch_size=patch)


@pytest.mark.parametrize("kind", ["timm", "coca", "clip"])
def test_vit_matches_reference_native_and_resampled(tmp_path, kind):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    native = timm_vit(32, 8) if kind == "timm" else open_clip_tower(32, 8, coca=(kind == "coca"))
    rescale_(native, gen)
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    if kind == "clip":  # a whole open_clip model: vision keys under visual.*, plus a text tower to ignore
        state = {**{"visual." + k: v for k, v in state.items()}, "token_embedding.weight": torch.zeros(10, 8)}
    ckpt = tmp_path / "vit.safetensors"
    save_file(state, ckpt)

    # native size: 32x32 frames, patch 8
    ours = slvp.load_vit(ckpt, frame_cfg(32, 32, 8)).eval()
    assert (ours.cfg.vit_dim, ours.cfg.vit_layers, ours.cfg.vit_heads, ours.cfg.vit_mlp) == (128, 2, 2, 256)
    assert ours.cfg.vit_norm_final == (kind != "coca")
    # the library's LayerNorm epsilon (timm 1e-6, open_clip 1e-5), which the weights do not carry: a wrong one moves
    # the output by about 1e-5, under TOL
    assert {m.eps for m in native.modules() if isinstance(m, torch.nn.LayerNorm)} == \
        {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {ours.cfg.vit_eps}
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = native.forward_features(x)[:, 1:] if kind == "timm" else open_clip_tokens(native, x)
        err = (ours(x) - ref).abs().max().item()
    print(f"ViT {kind} native: max abs diff {err:.2e}")
    assert ref.std() > 0.1 and err < TOL

    # paper geometry: patch 18 on a 360x648 frame; reference = the library's model built at that size with
    # the weights resampled by timm's own functions
    big = timm_vit((360, 648), 18) if kind == "timm" else open_clip_tower((360, 648), 18, coca=(kind == "coca"))
    src = native.state_dict()
    if kind == "timm":
        from timm.models.vision_transformer import checkpoint_filter_fn
        big.load_state_dict(checkpoint_filter_fn(src, big))
    else:
        big.load_state_dict(resampled_with_timm(src, "conv1.weight", "positional_embedding", 18, (20, 36), False))
    ours = slvp.load_vit(ckpt, frame_cfg(360, 648, 18)).eval()
    x = torch.randn(1, 3, 360, 648, generator=gen)
    with torch.no_grad():
        ref = big.forward_features(x)[:, 1:] if kind == "timm" else open_clip_tokens(big, x)
        out = ours(x)
    assert out.shape == (1, 720, 128)
    err = (out - ref).abs().max().item()
    print(f"ViT {kind} patch 18 @ 360x648: max abs diff {err:.2e}")
    assert err < TOL


def test_timm_clip_tower_loads_as_timm_runs_it(tmp_path):
    """timm's CLIP image towers (vit_*_clip_*, LAION / DFN / MetaCLIP weights in timm's format) are built with
    pre_norm=True: a norm_pre, no patch-embedding bias, LayerNorm eps 1e-5. Loaded as a timm ViT they stopped with
    KeyError: 'patch_embed.proj.bias' (a traceback from train.py --vit). Reference: timm's own model of that name."""
    import timm
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn
    kw = dict(pretrained=False, embed_dim=128, depth=2, num_heads=2, num_classes=10)
    native = timm.create_model("vit_base_patch16_clip_224", img_size=32, patch_size=8, **kw).eval()
    rescale_(native, torch.Generator().manual_seed(3))
    assert "patch_embed.proj.bias" not in native.state_dict() and "norm_pre.weight" in native.state_dict()
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, tmp_path / "clip.safetensors")
    gen = torch.Generator().manual_seed(4)
    for (H, W), patch in (((32, 32), 8), ((32, 48), 8), ((360, 648), 18)):
        ref_model = native if (H, W) == (32, 32) else \
            timm.create_model("vit_base_patch16_clip_224", img_size=(H, W), patch_size=patch, **kw).eval()
        if ref_model is not native:
            ref_model.load_state_dict(checkpoint_filter_fn(native.state_dict(), ref_model))
        ours = slvp.load_vit(tmp_path / "clip.safetensors", frame_cfg(H, W, patch)).eval()
        assert {m.eps for m in ref_model.modules() if isinstance(m, torch.nn.LayerNorm)} == \
            {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
        x = torch.randn(1, 3, H, W, generator=gen)
        with torch.no_grad():
            ref = ref_model.forward_features(x)[:, 1:]
            err = (ours(x) - ref).abs().max().item()
        assert ref.std() > 0.1 and err < TOL, (H, W, err)
    # a timm ViT of another kind (no norm_pre) whose patch-embedding bias is missing stays a strict error naming it
    state = {k: v.contiguous() for k, v in timm_vit(32, 8).state_dict().items() if k != "patch_embed.proj.bias"}
    save_file(state, tmp_path / "nobias.safetensors")
    with pytest.raises(ValueError, match="missing: patch_embed.bias"):
        slvp.load_vit(tmp_path / "nobias.safetensors", frame_cfg(32, 32, 8))


def test_vit_conversion_is_strict(tmp_path):
    from safetensors.torch import save_file
    state = dict(timm_vit(32, 8).state_dict())
    state.pop("blocks.1.norm2.bias")
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(128, 7)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "v.safetensors")
    with pytest.raises(ValueError) as e:
        slvp.load_vit(tmp_path / "v.safetensors", frame_cfg(32, 32, 8))
    assert "missing: blocks.1.norm2.bias" in str(e.value)
    assert "mis-shaped: blocks.0.fc2.weight" in str(e.value)
    state = {k: v.contiguous() for k, v in timm_vit(32, 8).state_dict().items()}
    state["blocks.0.ls1.gamma"] = torch.ones(128)                    # layer scale (DeiT III), which ours lacks
    save_file(state, tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="unexpected: blocks.0.ls1.gamma"):
        slvp.load_vit(tmp_path / "v.safetensors", frame_cfg(32, 32, 8))


def test_vit_wider_than_vit_l_is_refused(tmp_path):
    """heads = width / 64 holds for the ViTs up to ViT-L (1024) of open_clip and timm; wider ones differ, and the
    weights do not say: open_clip's ViT-H-14 config (read here) has 16 heads of 80 channels, where width / 64 gives
    20, and a ViT-H loaded so would split its attention wrongly with every tensor of the right shape."""
    import importlib.util
    from safetensors.torch import save_file
    configs = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    large, huge = (json.loads((configs / f"ViT-{n}-14.json").read_text())["vision_cfg"] for n in ("L", "H"))
    assert large["width"] // large.get("head_width", 64) == large["width"] // 64 == 16      # the rule holds
    assert (huge["width"], huge["width"] // huge["head_width"]) == (1280, 16)                # it does not
    D = huge["width"]
    save_file({"conv1.weight": torch.zeros(D, 3, 8, 8), "class_embedding": torch.zeros(D),
               "positional_embedding": torch.zeros(17, D)}, tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="a ViT of width 1280, whose number of attention heads the weights do not"):
        slvp.load_vit(tmp_path / "h.safetensors", frame_cfg(32, 32, 8))


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_transformers(spm_model):
    from transformers import T5Tokenizer
    texts = ["the red circle moves left", "a large blue square falls while a small green triangle moves up",
             "  the   shape moving down  ", "zebra!"]
    # loaded the way a T5 checkpoint folder is (transformers 5 mis-reads a bare vocab_file= argument)
    folder = spm_model.parent / "hf"
    folder.mkdir(exist_ok=True)
    shutil.copy(spm_model, folder / "spiece.model")
    ref = T5Tokenizer.from_pretrained(folder, extra_ids=0)
    ids, mask = slvp.Tokenizer(spm_model)(texts, max_len=64)
    enc = ref(texts, padding=True, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"].bool())
    # truncation keeps </s> last
    ids, mask = slvp.Tokenizer(spm_model)(texts, max_len=6)
    enc = ref(texts, padding=True, truncation=True, max_length=6, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and (ids[:, -1][mask[:, -1]] == 1).all()


def test_tokenizer_rejects_empty_text(spm_model):
    with pytest.raises(ValueError, match="empty text"):
        slvp.Tokenizer(spm_model)(["a red circle", "  "], max_len=8)


# ---------------------------------------------------------------------------------------------- model

def test_paper_parameter_count():
    """Table 1: 258M parameters; Table 4: the same for both fusion modes (they differ by the one query token q). Each
    part counted by hand from Sec. 4.1's architecture: T5-base's encoder, CoCa's ViT-B at patch 18 on 360x648, the
    8-layer decoder (width 768, MLP 2048), E_pos, E_tem and the flow head of Eq. (3)."""
    with torch.device("meta"):
        model = slvp.SLVP(slvp.SLVPConfig.paper(), "vision")
        counts = {f: sum(p.numel() for p in slvp.SLVP(slvp.SLVPConfig.paper(), f).parameters())
                  for f in ("vision", "language")}
    print("paper config parameters:", counts)
    for n in counts.values():
        assert abs(n - 258e6) / 258e6 < 0.02
    d, N = 768, (360 // 18) * (648 // 18)
    t5 = 32128 * d + 12 * (2 * d + 4 * d * d + 2 * d * 3072) + 32 * 12 + d      # RMS norms, no biases; bucket bias
    vit = (3 * 18 * 18 * d + d) + d + (N + 1) * d + 2 * d + 12 * (4 * d + 4 * (d * d + d) + 2 * d * 3072 + 3072 + d)
    # (patch embedding, class token, positions, ln_pre, blocks); the decoder's layers, then its final LayerNorm
    decoder = 8 * (6 * d + 8 * (d * d + d) + 2 * d * 2048 + 2048 + d) + 2 * d
    parts = {"text": t5, "vision": vit, "decoder": decoder, "E_pos": N * d, "E_tem": 4 * d, "flow_head": d * 648 + 648}
    got = {name: sum(p.numel() for p in getattr(model, name).parameters()) if name not in ("E_pos", "E_tem")
           else getattr(model, name).numel() for name in parts}
    assert got == parts and sum(parts.values()) == counts["vision"]
    assert counts["language"] - counts["vision"] == 768
    # the transfer model swaps the flow head (d*p*p*2 + p*p*2) for box (d*4+4) and mask ((d+4)*p*p + p*p) heads
    with torch.device("meta"):
        rvos = sum(p.numel() for p in slvp.SLVP(slvp.SLVPConfig.paper(), "vision", task="rvos").parameters())
    assert rvos - counts["vision"] == (768 * 4 + 4) + (772 * 324 + 324) - (768 * 648 + 648)


def tiny_batch(B=2, L=9, seed=0):
    cfg = slvp.SLVPConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, cfg.num_frames, 3, *cfg.frame_size, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    ids[~mask] = 0
    ids[0, -1] = ids[1, 4] = 1
    return cfg, frames, ids, mask


@pytest.mark.parametrize("fusion", ["vision", "language"])
def test_fusion_shapes_gradients_and_padding(fusion):
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, fusion)
    torch.nn.init.normal_(model.flow_head.weight, std=0.02)  # the zero init would hide the decoder's gradient
    loss, flow = model.pretrain_loss(frames, ids, mask)
    assert flow.shape == (2, 4, 2, *cfg.frame_size) and loss.ndim == 0
    loss.backward()
    assert model.decoder.layers[0].self_attn.q.weight.grad.abs().sum() > 0
    assert model.E_pos.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text.parameters())      # frozen in pre-training (Sec. 4.1)
    assert all(p.grad is None for p in model.vision.parameters())

    # padded text tokens change nothing: append more padding, and change the ids under the padding
    model.eval()
    with torch.no_grad():
        ref = model.flow(frames, ids, mask)
        ids2 = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
        mask2 = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
        ids2[1, 6] = 77
        out = model.flow(frames, ids2, mask2)
        assert (out - ref).abs().max() < 1e-5
        ids2[1, 3] = 78  # a real token does change the output
        assert (model.flow(frames, ids2, mask2)[1] - ref[1]).abs().max() > 1e-4

    rvos = slvp.SLVP(cfg, fusion, task="rvos")
    out = rvos(frames, ids, mask)
    assert out["boxes"].shape == (2, 4, 4) and out["masks"].shape == (2, 4, *cfg.frame_size)
    b = out["boxes"]
    assert ((b >= 0) & (b <= 1)).all() and (b[..., 2] >= b[..., 0]).all() and (b[..., 3] >= b[..., 1]).all()
    gt_boxes = torch.tensor([0.1, 0.2, 0.5, 0.6]).expand(2, 4, 4)
    loss, parts = rvos.rvos_loss(out, gt_boxes, torch.rand(2, 4, *cfg.frame_size) > 0.5, torch.ones(2, 4, dtype=torch.bool))
    loss.backward()
    assert rvos.box_head.weight.grad.abs().sum() > 0 and rvos.mask_head.weight.grad.abs().sum() > 0
    assert rvos.vision.patch_embed.weight.grad.abs().sum() > 0       # transfer trains the vision encoder
    assert all(p.grad is None for p in rvos.text.parameters())       # and freezes the text encoder (Table 2)


def test_heads_get_what_eq4_gives_them():
    """Eq. (4): the box head reads each frame's max-pool over its N tokens; the mask head (Sec. 4.1) each token joined
    with its own frame's box. Read off the heads' inputs, against the decoder's output taken apart by hand."""
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, task="rvos").eval()
    seen = {}
    hooks = [model.decoder.register_forward_hook(lambda m, a, o: seen.update(fused=o)),
             model.box_head.register_forward_hook(lambda m, a, o: seen.update(box_in=a[0])),
             model.mask_head.register_forward_hook(lambda m, a, o: seen.update(mask_in=a[0]))]
    with torch.no_grad():
        out = model(frames, ids, mask)
    for h in hooks:
        h.remove()
    T, N, f = cfg.num_frames, cfg.num_patches, seen["fused"]                     # f: [B, T*N, d]
    assert torch.equal(seen["box_in"], torch.stack([f[:, t * N:(t + 1) * N].max(1).values for t in range(T)], 1))
    assert torch.equal(seen["mask_in"][..., :-4], f)
    for t in range(T):
        assert torch.equal(seen["mask_in"][:, t * N:(t + 1) * N, -4:], out["boxes"][:, t, None].expand(-1, N, 4))
    assert (out["boxes"][:, 0] - out["boxes"][:, 1]).abs().max() > 1e-4          # a box of another frame would show


def test_frames_are_normalized_as_coca_was_trained():
    """The ViT sees (frames - mean) / std with CoCa's (open_clip's OpenAI) mean and std, each frame alone, in order."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    cfg, frames, ids, mask = tiny_batch()
    model = slvp.SLVP(cfg).eval()
    got = {}
    hook = model.vision.register_forward_pre_hook(lambda m, args: got.update(x=args[0]))
    with torch.no_grad():
        model.flow(frames, ids, mask)
    hook.remove()
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    expected = torch.stack([(frames[b, t] - mean[:, None, None]) / std[:, None, None]
                            for b in range(frames.shape[0]) for t in range(cfg.num_frames)])
    assert torch.allclose(got["x"], expected, atol=1e-6)


def test_unpatchify_layout_hand_worked():
    """Token n = t*N + row*gw + col of frame t, its p*p*C values in (p, p, C) order (MAE): value k = (y*p + x)*C + c
    lands on channel c, pixel (row*p + y, col*p + x) of frame t."""
    cfg = slvp.SLVPConfig.tiny()
    T, (gh, gw), p, C = cfg.num_frames, cfg.grid, cfg.patch_size, 2
    n, k = torch.meshgrid(torch.arange(T * gh * gw), torch.arange(p * p * C), indexing="ij")
    out = slvp.unpatchify((1000 * n + k).float()[None], cfg, C)[0]              # [T, C, H, W]
    for t, c, Y, X in [(0, 0, 0, 0), (0, 1, 0, 0), (1, 0, 3, 17), (2, 1, 20, 5), (3, 0, 31, 47), (3, 1, 9, 40)]:
        token = t * gh * gw + (Y // p) * gw + X // p
        assert out[t, c, Y, X] == 1000 * token + ((Y % p) * p + X % p) * C + c, (t, c, Y, X)


@pytest.mark.parametrize("fusion", ["vision", "language"])
def test_positions_follow_the_tokens_order(fusion):
    """Eqs. (2), (8): the token of patch n in frame t (index t*N + n of f_v, frames one after another) gets
    E_pos[n] + E_tem[t], on the decoder's queries and, with language as query, on f_v as its memory."""
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, fusion).eval()
    got = {}
    hook = model.decoder.register_forward_hook(lambda m, args, out: got.update(query=args[0], memory=args[1]))
    with torch.no_grad():
        model.flow(frames, ids, mask)
        f_v, f_r = model.encode(frames, ids, mask)
    hook.remove()
    T, N = cfg.num_frames, cfg.num_patches
    pos = torch.stack([model.E_pos[n] + model.E_tem[t] for t in range(T) for n in range(N)]).detach()   # [T*N, d]
    if fusion == "vision":
        assert torch.allclose(got["query"] - f_v, pos.expand_as(f_v), atol=1e-5)
    else:
        assert torch.allclose(got["query"][:, -T * N:] - model.q.detach(), pos.expand_as(f_v), atol=1e-5)
        assert torch.allclose(got["memory"] - f_v, pos.expand_as(f_v), atol=1e-5)
        assert torch.equal(got["query"][:, :ids.shape[1]], f_r)


def torch_decoder(ours, cfg):
    """torch.nn.TransformerDecoder (pre-norm, GELU, a final LayerNorm) holding the weights of our Decoder `ours`."""
    d = cfg.dec_dim
    layer = torch.nn.TransformerDecoderLayer(d, cfg.dec_heads, cfg.dec_mlp, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    ref = torch.nn.TransformerDecoder(layer, cfg.dec_layers, norm=torch.nn.LayerNorm(d)).eval()
    with torch.no_grad():
        for a, b in zip(ours.layers, ref.layers):
            for mine, theirs in ((a.self_attn, b.self_attn), (a.cross_attn, b.multihead_attn)):
                theirs.in_proj_weight.copy_(torch.cat([mine.q.weight, mine.k.weight, mine.v.weight]))
                theirs.in_proj_bias.copy_(torch.cat([mine.q.bias, mine.k.bias, mine.v.bias]))
                theirs.out_proj.load_state_dict(mine.o.state_dict())
            for mine, theirs in ((a.norm1, b.norm1), (a.norm2, b.norm2), (a.norm3, b.norm3), (a.fc1, b.linear1),
                                 (a.fc2, b.linear2)):
                theirs.load_state_dict(mine.state_dict())
        ref.norm.load_state_dict(ours.norm.state_dict())
    return ref


def test_decoder_matches_torch_transformer_decoder():
    """T of Eqs. (2) and (8), pre-norm self-attention, cross-attention and GELU MLP with a final LayerNorm, against
    torch.nn.TransformerDecoder(norm_first=True) with the same weights, padded keys masked in both attentions."""
    cfg = slvp.SLVPConfig.tiny()
    d = cfg.dec_dim
    torch.manual_seed(0)
    ours = slvp.Decoder(cfg).eval()
    rescale_(ours, torch.Generator().manual_seed(1))
    ref = torch_decoder(ours, cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        x, memory = torch.randn(2, 10, d, generator=g), torch.randn(2, 7, d, generator=g)
        x_keep, m_keep = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
        x_keep[1, 6:], m_keep[0, 4:] = False, False
        out = ours(x, memory, self_mask=x_keep, memory_mask=m_keep)
        expected = ref(x, memory, tgt_key_padding_mask=~x_keep, memory_key_padding_mask=~m_keep)
    print("decoder vs torch.nn.TransformerDecoder:", (out - expected).abs().max().item())
    assert (out - expected).abs().max() < TOL


def test_language_query_reads_its_own_patch_at_init():
    """Language as query: at initialization the first cross-attention of each q^ + E_pos + E_tem token already
    puts most of its weight on its own patch of f_v (softmax(q k^T / sqrt(d_head)) worked out from the layer's
    inputs); with the sin-cos codes of MAE (w_k = 10000^(-2k/d), written out here) in place of the Gaussian codes
    (k = q and the 4x kept) it stays within a few times the uniform 1/96: the start with which language as query
    learned no flow (README, "How the miniature learns flow", row 50)."""
    cfg, frames, ids, mask = tiny_batch()
    TN = cfg.num_frames * cfg.num_patches

    def own_patch_weight(model):
        read, got = model.decoder.layers[0].cross_attn, {}
        hook = read.register_forward_hook(lambda m, args, out: got.update(x=args[0], memory=args[1]))
        with torch.no_grad():
            model.flow(frames, ids, mask)
            hook.remove()
            q = read.q(got["x"][:, -TN:]).unflatten(-1, (cfg.dec_heads, -1)).transpose(1, 2)   # [B, h, T*N, d/h]
            k = read.k(got["memory"]).unflatten(-1, (cfg.dec_heads, -1)).transpose(1, 2)      # [B, h, T*N, d/h]
            attn = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return attn.diagonal(dim1=-2, dim2=-1).mean().item()

    torch.manual_seed(0)
    model = slvp.SLVP(cfg, "language").eval()
    assert torch.equal(model.decoder.layers[0].cross_attn.k.weight, model.decoder.layers[0].cross_attn.q.weight)
    assert own_patch_weight(model) > 30 / TN                   # measured 0.50-0.54 over 4 seeds; uniform is 1/96
    d, (gh, gw) = cfg.dec_dim, cfg.grid

    def mae(n, d):                                             # [n, d]: sin then cos of pos * 10000^(-2k/d)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * 10000 ** (-torch.arange(d // 2) / (d // 2))
        return torch.cat([angle.sin(), angle.cos()], 1).float()

    with torch.no_grad():
        model.E_pos.copy_(torch.cat([mae(gh, d // 2)[:, None].expand(gh, gw, -1),
                                     mae(gw, d // 2)[None].expand(gh, gw, -1)], -1).reshape(gh * gw, d))
        model.E_tem.copy_(mae(cfg.num_frames, d))
    assert own_patch_weight(model) < 5 / TN                    # measured 0.025-0.033


def test_sincos_codes_hand_worked():
    """sincos_1d(n, d): d/2 frequencies from 0.9 pi down to pi / n, geometrically; sin then cos. With n = 4 and d = 4
    the two are 0.9 pi and pi / 4, so position 2 is (sin 1.8 pi, sin pi/2, cos 1.8 pi, cos pi/2); with d = 6 a third
    lies between them at their geometric mean, pi sqrt(0.9 / 4). sincos_2d puts the row's code in the first half of
    the channels and the column's in the second, row-major. On the tiny config's 4x6 grid two neighbouring patches'
    codes are far less alike than with MAE's frequencies (1 rad down to 1e-4: 0.98), which is what lets the decoder
    learn the lookup of frame 1 sooner (README)."""
    got = slvp.sincos_1d(4, 4)
    assert torch.allclose(got[2], torch.tensor([math.sin(1.8 * math.pi), 1.0, math.cos(1.8 * math.pi), 0.0]), atol=1e-6)
    assert torch.equal(got[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    w = torch.tensor([0.9 * math.pi, math.pi * (0.9 / 4) ** 0.5, math.pi / 4])
    assert torch.allclose(slvp.sincos_1d(4, 6)[1], torch.cat([w.sin(), w.cos()]), atol=1e-6)
    grid = slvp.sincos_2d(2, 3, 8)                             # row r, column c at index 3 r + c
    assert torch.equal(grid[4, :4], slvp.sincos_1d(2, 4)[1]) and torch.equal(grid[4, 4:], slvp.sincos_1d(3, 4)[1])
    cfg = slvp.SLVPConfig.tiny()
    cos = torch.nn.functional.cosine_similarity
    codes = slvp.sincos_2d(*cfg.grid, cfg.dec_dim)
    assert cos(codes[0], codes[1], dim=0) < 0.6 and cos(codes[0], codes[cfg.grid[1]], dim=0) < 0.6   # 0.590, 0.495
    with pytest.raises(ValueError, match="dec_dim 126 is not a multiple of 4"):    # was a shape error in SLVP()
        dataclasses.replace(cfg, dec_dim=126)


# ---------------------------------------------------------------------------------------------- losses

def test_giou_hand_worked():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.5]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.1, 0.2, 0.3, 0.5]])
    # overlapping: inter 1, union 7, hull 9 -> 1/7 - 2/9; disjoint: inter 0, union 2, hull 3 -> -1/3; identical: 1
    expected = torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0])
    assert torch.allclose(slvp.generalized_box_iou(a, b), expected, atol=1e-6)


def test_rvos_loss_hand_worked():
    cfg = slvp.SLVPConfig.tiny()
    model = slvp.SLVP(cfg, task="rvos")
    H, W = cfg.frame_size
    pred_boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]]])    # B=1, T=2
    gt_boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.9, 0.9, 1.0, 1.0]]])
    valid = torch.tensor([[True, False]])                                      # frame 2: object absent
    logits = torch.zeros(1, 2, H, W)                                           # m = 0.5 everywhere
    gt = torch.zeros(1, 2, H, W)
    gt[0, 0, :8, :8] = 1                                                       # 64 target pixels
    loss, parts = model.rvos_loss({"boxes": pred_boxes, "masks": logits}, gt_boxes, gt.bool(), valid)
    # L1 on frame 1 only: |0.5 - 0.25| = 0.25; GIoU: IoU = 0.125 / 0.25 = 0.5, hull = union -> loss 0.5
    assert abs(parts["l1"].item() - 0.25) < 1e-6
    assert abs(parts["giou"].item() - 0.5) < 1e-6
    # Dice: 1 - (2 * 0.5 * 64 + 1) / (0.25 * 2HW + 64 + 1); BCE: log 2 at every pixel
    dice = 1 - (64 + 1) / (0.25 * 2 * H * W + 64 + 1)
    assert abs(parts["dice"].item() - dice) < 1e-6
    assert abs(parts["bce"].item() - 0.6931471805599453) < 1e-6
    assert abs(loss.item() - (5 * 0.25 + 0.5 + 5 * dice + 0.6931471805599453)) < 1e-5
    # logits that see the target (at logit 0 BCE is log 2 whatever the target): +ln 3 on the 64 target pixels of
    # frame 1 (m = 3/4), -ln 3 elsewhere (m = 1/4): every pixel then costs -ln(3/4) in BCE, and a target inverted or
    # taken from the other frame costs ln 4 on the pixels it misplaces
    logits = torch.full((1, 2, H, W), -math.log(3))
    logits[0, 0, :8, :8] = math.log(3)
    _, parts = model.rvos_loss({"boxes": pred_boxes, "masks": logits}, gt_boxes, gt.bool(), valid)
    assert parts["bce"].item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    dice = 1 - (2 * 0.75 * 64 + 1) / (0.75 ** 2 * 64 + 0.25 ** 2 * (2 * H * W - 64) + 64 + 1)
    assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
    # Dice per clip, then the mean over clips: clip 1 predicted exactly (0), clip 2 on 2 pixels beside its 2 (1 - 1/5)
    m, g2 = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    m[0, 0, :2, :2] = g2[0, 0, :2, :2] = 1
    m[1, 0, 0, :2], g2[1, 0, 3, :2] = 1, 1
    assert slvp.dice_loss(m, g2).item() == pytest.approx((0 + (1 - 1 / 5)) / 2)
    # no frame with the object: the box terms vanish and stay finite
    _, parts = model.rvos_loss({"boxes": pred_boxes, "masks": logits}, gt_boxes, gt.bool(), valid & False)
    assert parts["l1"].item() == 0 and parts["giou"].item() == 0


def test_box_beyond_the_frame_is_pulled_back():
    """A predicted box whose left edge lies beyond the frame: returned clamped to [0, 1], in float32 under bf16
    autocast, and the L1 of Eq. (6) still pulls the hidden edge back. Worked by hand: the box head's output is its
    bias (weights zero), sigmoid -> cx 0.15, w 0.5, so x1 = -0.1 (shown as 0) and x2 = 0.4, against a target x1 0.1
    and x2 0.45: dL/dx1 = dL/dx2 = -1, so dL/dcx = -2 and dL/dw = (+1 - 1) / 2 = 0 per frame, times the sigmoid's
    slope s (1 - s). A plain clamp gives dL/dx1 = 0: dL/dcx = -1, dL/dw = -0.5."""
    cfg = slvp.SLVPConfig.tiny()
    model = slvp.SLVP(cfg, task="rvos")
    s = torch.tensor([0.15, 0.5, 0.5, 0.4])                                   # cx, cy, w, h
    with torch.no_grad():
        model.box_head.weight.zero_()
        model.box_head.bias.copy_(torch.logit(s.double()).float())
    _, frames, ids, mask = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(frames, ids, mask)
    boxes = out["boxes"]                                                      # [2, T, 4]
    assert boxes.dtype == torch.float32
    expected = torch.tensor([0.0, 0.3, 0.4, 0.7])                              # x1 -0.1 shown clamped
    assert torch.allclose(boxes, expected.expand_as(boxes), atol=1e-6)
    target = torch.tensor([0.1, 0.3, 0.45, 0.7])
    (boxes[..., [0, 2]] - target[[0, 2]]).abs().sum().backward()              # Eq. (6) on x1 and x2
    BT, slope = boxes.shape[0] * boxes.shape[1], s * (1 - s)
    grad = model.box_head.bias.grad
    assert torch.allclose(grad[[0, 2]], BT * torch.tensor([-2.0, 0.0]) * slope[[0, 2]], atol=1e-5)


def test_flow_is_float32_under_bf16_autocast():
    """The flow head's output leaves autocast as float32: with its weights zero and its bias 8.03 px every flow value is
    float32's 8.03, where bf16 (8 bits of mantissa: steps of 1/16 between 8 and 16) would give 8.0. Through flow()
    and forward(), the one train.py takes."""
    cfg = slvp.SLVPConfig.tiny()
    model = slvp.SLVP(cfg, task="pretrain")
    with torch.no_grad():
        model.flow_head.weight.zero_()
        model.flow_head.bias.fill_(8.03)
    assert torch.tensor(8.03).bfloat16().item() == 8.0
    _, frames, ids, mask = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for flow in (model.flow(frames, ids, mask), model(frames, ids, mask)):
            assert flow.dtype == torch.float32 and flow.shape == (2, cfg.num_frames, 2, *cfg.frame_size)
            assert (flow == torch.tensor(8.03)).all()


def test_photometric_loss_known_shift():
    """Frame 2 is frame 1 moved 3 px right and 2 px down, so o_(2,1)(p) = (-3, -2): zero loss in the interior
    with the true flow, clearly positive with the zero flow."""
    g = torch.Generator().manual_seed(0)
    V1 = torch.rand(1, 3, 30, 40, generator=g)
    V2 = torch.zeros_like(V1)
    V2[:, :, 2:, 3:] = V1[:, :, :-2, :-3]
    flow = torch.zeros(1, 2, 30, 40)
    flow[:, 0], flow[:, 1] = -3.0, -2.0
    interior = torch.zeros(1, 1, 30, 40)
    interior[:, :, 2:, 3:] = 1
    import flow_warp_triton as fw
    assert fw.photometric_loss(V1, flow, V2, interior).item() < 1e-10
    assert fw.photometric_loss(V1, torch.zeros_like(flow), V2, interior).item() > 0.05


def test_photometric_objective_pairs_each_frame_with_frame_1():
    """Eq. (1) on a clip: frame 2 is frame 1 moved 1 px right, frame 3 moved 2 px down (a texture away from the
    border, so nothing leaves the frame): o_(2,1) = (-1, 0) and o_(3,1) = (0, -2) give 0; each other pairing of
    flows and frames does not; the zero flow gives the mean over frames 2 and 3 of their squared difference to frame
    1, worked here."""
    g = torch.Generator().manual_seed(0)
    V1 = torch.zeros(3, 20, 24)
    V1[:, 4:16, 4:20] = torch.rand(3, 12, 16, generator=g)
    frames = torch.stack([V1, V1.roll(1, dims=2), V1.roll(2, dims=1)])[None]            # [1, T=3, 3, H, W]
    flow = torch.zeros(1, 3, 2, 20, 24)
    flow[0, 1, 0], flow[0, 2, 1] = -1.0, -2.0
    assert slvp.photometric_objective(frames, flow).item() < 1e-10
    assert slvp.photometric_objective(frames, flow[:, [0, 2, 1]]).item() > 0.01                # flows swapped
    assert slvp.photometric_objective(frames[:, [1, 0, 2]], flow).item() > 0.01               # another reference
    zero = ((frames[0, 1] - V1) ** 2).mean() / 2 + ((frames[0, 2] - V1) ** 2).mean() / 2
    assert slvp.photometric_objective(frames, torch.zeros_like(flow)).item() == pytest.approx(zero.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_transfer(tmp_path):
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, "language").eval()
    torch.nn.init.normal_(model.flow_head.weight, std=0.02)
    slvp.save_checkpoint(tmp_path / "pre.safetensors", model, step=7)
    assert not (tmp_path / "pre.safetensors.tmp").exists()
    back = slvp.load_checkpoint(tmp_path / "pre.safetensors").eval()
    assert back.fusion == "language" and back.cfg == cfg
    with torch.no_grad():
        assert torch.equal(back.flow(frames, ids, mask), model.flow(frames, ids, mask))

    rvos = slvp.load_checkpoint(tmp_path / "pre.safetensors", task="rvos")
    assert rvos.task == "rvos" and not hasattr(rvos, "flow_head")
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("flow_head")}
    for k, v in shared.items():
        assert torch.equal(rvos.state_dict()[k], v), k
    assert rvos.freeze_text and not rvos.freeze_vision   # the transfer defaults, not the pre-training ones
    for m, text, vision in ((model, False, False), (rvos, False, True)):   # the flags applied: what requires a gradient
        assert {p.requires_grad for p in m.text.parameters()} == {text}
        assert {p.requires_grad for p in m.vision.parameters()} == {vision}
    # a checkpoint keeps its own freezing; keyword arguments override it
    slvp.save_checkpoint(tmp_path / "ft.safetensors", slvp.SLVP(cfg, task="rvos", freeze_text=False, freeze_vision=True))
    ft = slvp.load_checkpoint(tmp_path / "ft.safetensors")
    assert (ft.freeze_text, ft.freeze_vision) == (False, True)
    assert all(p.requires_grad for p in ft.text.parameters()) and not any(p.requires_grad for p in ft.vision.parameters())
    ft = slvp.load_checkpoint(tmp_path / "ft.safetensors", freeze_vision=False)
    assert (ft.freeze_text, ft.freeze_vision) == (False, False)
    ft = slvp.load_checkpoint(tmp_path / "ft.safetensors", task="rvos", freeze_text=None, freeze_vision=None)
    assert (ft.freeze_text, ft.freeze_vision) == (False, True)          # None: not overridden
    # the config comes from the checkpoint, not from a preset
    other = dataclasses.replace(slvp.SLVPConfig.small(), num_frames=3, dec_layers=2)
    slvp.save_checkpoint(tmp_path / "other.safetensors", slvp.SLVP(other))
    assert slvp.load_checkpoint(tmp_path / "other.safetensors").cfg == other


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_checkpoint_is_as_readable_as_any_file_written_beside_it(tmp_path, umask):
    """safetensors 0.8 writes 0600 whatever the umask (its issue #782): a checkpoint another user of the machine (or
    a container's user) could not read. Reference: the mode open() gives a file in the same folder; train.py's
    resume.pt, written the same way (a temporary file renamed), takes it too."""
    import train
    old = os.umask(umask)
    try:
        slvp.save_checkpoint(tmp_path / "ckpt.safetensors", slvp.SLVP(slvp.SLVPConfig.tiny()))
        train.atomic_save({"step": 1}, tmp_path / "resume.pt")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda f: stat.S_IMODE((tmp_path / f).stat().st_mode)
    assert mode("ckpt.safetensors") == mode("resume.pt") == mode("plain.txt") == 0o666 & ~umask


def test_a_checkpoint_takes_the_folders_default_acl(tmp_path):
    """In a folder with a default ACL (a group's shared folder), open() takes the mode from it, not from the umask:
    a chmod to 0666 less the umask gave 0644 where open() gives 0664. Reference: a file written by open() beside it."""
    import struct
    entry = lambda tag, perm: struct.pack("<HHI", tag, perm, 0xFFFFFFFF)   # the kernel's posix_acl_xattr layout
    try:     # u::rw- g::rw- o::r--
        os.setxattr(tmp_path, "system.posix_acl_default", struct.pack("<I", 2) + entry(1, 6) + entry(4, 6) + entry(32, 4))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs here: {e}")
    slvp.save_checkpoint(tmp_path / "ckpt.safetensors", slvp.SLVP(slvp.SLVPConfig.tiny()))
    (tmp_path / "plain.txt").write_text("x")
    mode = lambda f: stat.S_IMODE((tmp_path / f).stat().st_mode)
    assert mode("ckpt.safetensors") == mode("plain.txt") == 0o664


def test_checkpoint_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = slvp.SLVPConfig.tiny()
    slvp.save_checkpoint(tmp_path / "c.safetensors", slvp.SLVP(cfg))
    meta = slvp.read_checkpoint_metadata(tmp_path / "c.safetensors")
    state = load_file(tmp_path / "c.safetensors")
    state.pop("decoder.layers.1.fc1.bias")
    state["E_tem"] = torch.zeros(5, cfg.dec_dim)
    save_file(state, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError) as e:
        slvp.load_checkpoint(tmp_path / "bad.safetensors")
    assert "missing: decoder.layers.1.fc1.bias" in str(e.value)
    assert "mis-shaped: E_tem: checkpoint (5, 128) vs model (4, 128)" in str(e.value)   # tiny: d = 128
    state = load_file(tmp_path / "c.safetensors")
    state["decoder.layers.9.fc1.bias"] = torch.zeros(3)                                  # a tensor the model lacks
    save_file(state, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="unexpected: decoder.layers.9.fc1.bias"):
        slvp.load_checkpoint(tmp_path / "extra.safetensors")
    slvp.save_checkpoint(tmp_path / "r.safetensors", slvp.SLVP(cfg, task="rvos"))
    with pytest.raises(ValueError, match="no flow head"):
        slvp.load_checkpoint(tmp_path / "r.safetensors", task="pretrain")
    with pytest.raises(ValueError, match="has fusion 'vision'; a checkpoint's fusion cannot be changed"):
        slvp.load_checkpoint(tmp_path / "r.safetensors", fusion="language")   # was a TypeError from SLVP()
    assert slvp.load_checkpoint(tmp_path / "r.safetensors", fusion="vision").fusion == "vision"


def test_the_readme_api_snippet_runs_as_written(tmp_path, spm_model, monkeypatch):
    """README "The API in a few lines", run as written where the main job has left its tokenizer: the shapes it
    states are the shapes it gets."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## The API in a few lines\n\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "out/pretrain").mkdir(parents=True)
    shutil.copy(spm_model, tmp_path / "out/pretrain/spm.model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET")       # the torch path of the warp: the interpreter is slow (SPEC §2)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    cfg = env["cfg"]
    T, (H, W) = cfg.num_frames, cfg.frame_size
    assert env["flow"].shape == (2, T, 2, H, W) and env["loss"].ndim == 0 and env["loss"] > 0
    assert env["out"]["boxes"].shape == (2, T, 4) and env["out"]["masks"].shape == (2, T, H, W)
    assert ((env["out"]["boxes"] >= 0) & (env["out"]["boxes"] <= 1)).all()
    assert torch.isfinite(env["loss"]) and set(env["parts"]) == {"l1", "giou", "dice", "bce"}


# ---------------------------------------------------------------------------------------------- from a mutation run

def test_t5_reads_its_position_buckets_from_the_config(tmp_path):
    """load_t5 takes relative_attention_num_buckets and relative_attention_max_distance from config.json: a T5 with
    16 buckets and max distance 20 (not the 32 / 128 that every other test uses, which a key read wrong would still
    give by default) matches transformers on a batch of L = 40, where distances pass 20."""
    from transformers import T5Config, T5EncoderModel
    hf_cfg = T5Config(vocab_size=120, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_heads=4,
                      feed_forward_proj="relu", relative_attention_num_buckets=16,
                      relative_attention_max_distance=20, dropout_rate=0.0)
    torch.manual_seed(0)
    hf = T5EncoderModel(hf_cfg).eval()
    rescale_(hf, torch.Generator().manual_seed(1))
    hf.save_pretrained(tmp_path)
    ours = slvp.load_t5(tmp_path).eval()
    assert (ours.cfg.t5_num_buckets, ours.cfg.t5_max_distance) == (16, 20)
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    ids[~mask] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out = ours(ids, mask)
    assert ref.std() > 0.1 and (out - ref).abs().max().item() < TOL


def test_weights_saved_under_model_load_as_timm_loads_them(tmp_path):
    """read_tensors unwraps {"model": state_dict}, the layout of DeiT's and MAE's released .pth files (their training
    scripts save {"model": ..., "epoch": ...}); timm's own load_state_dict, the reference here, unwraps it the same way.
    A ViT saved so loads as the bare one does."""
    from timm.models import load_state_dict
    vit = timm_vit(32, 8)
    gen = torch.Generator().manual_seed(5)
    rescale_(vit, gen)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    path = tmp_path / "deit.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    ref = load_state_dict(str(path), use_ema=False)
    got = slvp.read_tensors(path)
    assert set(got) == set(ref) == set(sd) and all(torch.equal(got[k], ref[k]) for k in ref)
    ours = slvp.load_vit(path, frame_cfg(32, 32, 8)).eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        err = (ours(x) - vit.forward_features(x)[:, 1:]).abs().max().item()
    assert err < TOL


# ---------------------------------------------------------------------------------------------- a fork's configs

def test_pretraining_needs_two_frames():
    """Eq. (1) is a mean over frames i = 2..T, each warped from frame 1: at T = 1 there is no pair. It was a silent
    NaN (the mean over nothing), which train.py then reported as a 'non-finite loss at step 1', as if the run had
    diverged. T = 1 stays a valid transfer (rvos) config: image clips."""
    cfg = dataclasses.replace(slvp.SLVPConfig.tiny(), num_frames=1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        slvp.SLVP(cfg)
    with pytest.raises(ValueError, match="expected T >= 2"):
        slvp.photometric_objective(torch.rand(2, 1, 3, 8, 8), torch.zeros(2, 1, 2, 8, 8))
    out = slvp.SLVP(cfg, task="rvos")(torch.rand(1, 1, 3, *cfg.frame_size), torch.tensor([[5, 1]]),
                                      torch.ones(1, 2, dtype=torch.bool))
    assert out["masks"].shape == (1, 1, *cfg.frame_size)


@pytest.mark.parametrize("width, heads", [("dec_dim", "dec_heads"), ("vit_dim", "vit_heads")])
def test_config_refuses_heads_that_do_not_split_the_width(width, heads):
    """Multi-head attention splits the width evenly over the heads; torch's own nn.MultiheadAttention refuses
    128 over 5 heads. The config refused dec_dim 126 (not a multiple of 4) but accepted 5 heads of 128 channels,
    which failed at the first forward with a bare view error inside Attention."""
    with pytest.raises(AssertionError, match="divisible"):
        torch.nn.MultiheadAttention(128, 5)                       # the reference's rule
    base = dataclasses.replace(slvp.SLVPConfig.tiny(), vit_dim=128, dec_dim=128)
    with pytest.raises(ValueError, match=f"{width} 128 is not divisible by {heads} 5"):
        dataclasses.replace(base, **{heads: 5})
    dataclasses.replace(base, **{heads: 16})                      # divisible: accepted


@pytest.mark.parametrize("heads", [0, -8])
def test_config_refuses_a_head_count_below_one(heads):
    """A head count is a positive integer, as torch's nn.MultiheadAttention requires. 0 heads failed the divisibility
    check with a ZeroDivisionError (a traceback from load_checkpoint, which turns only ValueError into a line), and -8
    divides 128, so it was accepted and failed at the first forward with an invalid shape."""
    with pytest.raises(ValueError, match="must be greater than 0"):
        torch.nn.MultiheadAttention(128, heads)                   # the reference's rule
    for name in ("dec_heads", "vit_heads"):
        with pytest.raises(ValueError, match=f"{name} {heads}: expected at least 1 attention head"):
            dataclasses.replace(slvp.SLVPConfig.tiny(), **{name: heads})


# ---------------------------------------------------------------------------------------------- freezing

def _encoder_grads(model, part):
    torch.manual_seed(1)
    frames = torch.rand(2, 4, 3, 32, 48)
    ids = torch.tensor([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    out = model(frames, ids, ids != 0)
    loss = out["masks"].square().mean() + out["boxes"].sum() if isinstance(out, dict) else out.square().mean()
    loss.backward()
    return [p.grad for p in getattr(model, part).parameters()]


@pytest.mark.parametrize("task,part", [("rvos", "text"), ("pretrain", "vision"), ("pretrain", "text")])
@pytest.mark.parametrize("how", ["requires_grad_", "attribute"])
def test_unfreezing_an_encoder_gives_its_gradient(task, part, how, tmp_path):
    """The freeze flags and requires_grad are one state: an encoder unfrozen the PyTorch way (requires_grad_) or by
    its flag gets the gradient of one built unfrozen (freeze_*=False, the documented way), and the flag and the
    checkpoint say so. The flags were stored apart: requires_grad_(True) left the encoder under no_grad, its .grad
    None for ever, and setting the flag left the parameters frozen while the checkpoint recorded them trained."""
    torch.manual_seed(0)
    ref = slvp.SLVP(slvp.SLVPConfig.tiny(), task=task, **{f"freeze_{part}": False})   # the documented way
    model = slvp.SLVP(slvp.SLVPConfig.tiny(), task=task)                           # frozen by default
    model.load_state_dict(ref.state_dict())
    assert getattr(model, f"freeze_{part}") is True
    assert all(g is None for g in _encoder_grads(model, part))
    model.zero_grad(set_to_none=True)
    if how == "requires_grad_":
        getattr(model, part).requires_grad_(True)
    else:
        setattr(model, f"freeze_{part}", False)
    assert all(p.requires_grad for p in getattr(model, part).parameters())
    assert getattr(model, f"freeze_{part}") is False
    got, want = _encoder_grads(model, part), _encoder_grads(ref, part)
    assert all(g is not None for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    slvp.save_checkpoint(tmp_path / "m.safetensors", model)
    assert getattr(slvp.load_checkpoint(tmp_path / "m.safetensors"), f"freeze_{part}") is False


@pytest.mark.parametrize("part", ["vision", "text"])
def test_a_partly_frozen_encoder_is_named_when_saved(tmp_path, part):
    """The freeze flags are whole-encoder: the last parameter of a frozen encoder unfrozen by hand makes its flag
    False, and the reloaded model trains every parameter of that encoder (counted here by requires_grad).
    save_checkpoint says so, for either encoder."""
    m = slvp.SLVP(slvp.SLVPConfig.tiny(), task="rvos", **{f"freeze_{part}": True})
    list(getattr(m, part).parameters())[-1].requires_grad_(True)
    with pytest.warns(UserWarning, match=f"{part} encoder is partly frozen"):
        slvp.save_checkpoint(tmp_path / "m.safetensors", m)
    r = slvp.load_checkpoint(tmp_path / "m.safetensors")
    assert all(p.requires_grad for p in getattr(r, part).parameters())


# ---------------------------------------------------------------------------------------------- from a mutation run (2)

def test_flow_channel_0_is_x_and_points_into_frame_1(monkeypatch):
    """Eq. (3) and SPEC §3: flow() is [B, T, 2, H, W] in pixels, channel 0 = x, and frame i's pixel p takes its colour
    from frame 1 at p + o_(i,1)(p). Frames 2..T are frame 1 moved 1 px right and 2 px down (a texture away from the
    border), so o_(i,1) = (-1, -2) everywhere: a flow head that outputs exactly that (weights zero, its bias laid out
    (p, p, 2) as unpatchify reads a token) gives Eq. (1) = 0 through pretrain_loss; its x and y swapped, or its sign,
    give the squared differences of a misplaced texture."""
    monkeypatch.delenv("TRITON_INTERPRET")       # the torch path of the warp: the interpreter is slow (SPEC §2)
    cfg = slvp.SLVPConfig.tiny()
    T, (H, W), p = cfg.num_frames, cfg.frame_size, cfg.patch_size
    V1 = torch.zeros(3, H, W)
    V1[:, 4:H - 4, 4:W - 4] = torch.rand(3, H - 8, W - 8, generator=torch.Generator().manual_seed(0))
    moved = V1.roll((2, 1), dims=(1, 2))                                      # moved[y, x] = V1[y - 2, x - 1]
    frames = torch.stack([V1] + [moved] * (T - 1))[None]                      # [1, T, 3, H, W]
    ids, mask = torch.tensor([[5, 6, 1]]), torch.ones(1, 3, dtype=torch.bool)
    model = slvp.SLVP(cfg).eval()

    def loss_with(u, v):
        with torch.no_grad():
            model.flow_head.weight.zero_()
            model.flow_head.bias.view(p, p, 2)[..., 0] = u
            model.flow_head.bias.view(p, p, 2)[..., 1] = v
            return model.pretrain_loss(frames, ids, mask)

    loss, flow = loss_with(-1.0, -2.0)
    assert torch.equal(flow[:, :, 0], torch.full((1, T, H, W), -1.0))          # x
    assert torch.equal(flow[:, :, 1], torch.full((1, T, H, W), -2.0))          # y
    assert loss.item() < 1e-10
    for u, v in ((-2.0, -1.0), (1.0, 2.0)):                                   # x and y swapped; the sign flipped
        assert loss_with(u, v)[0].item() > 0.01, (u, v)


@pytest.mark.parametrize("fusion", ["vision", "language"])
def test_pretraining_starts_from_the_zero_flow(fusion, monkeypatch):
    """The flow head starts at zero, weights and bias (the identity warp): a fresh pre-training model's flow is 0 at
    every pixel, and its Eq. (1) is the zero flow's, worked by hand: the mean over frames 2..T, channels and pixels of
    (V_i - V_1)^2."""
    monkeypatch.delenv("TRITON_INTERPRET")
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, fusion).eval()
    with torch.no_grad():
        loss, flow = model.pretrain_loss(frames, ids, mask)
    assert torch.equal(flow, torch.zeros(2, cfg.num_frames, 2, *cfg.frame_size))
    assert loss.item() == pytest.approx(((frames[:, 1:] - frames[:, :1]) ** 2).mean().item(), rel=1e-5)


def test_vision_query_positions_start_as_the_grids_sin_cos_codes():
    """Vision as query: E_pos starts as the sin-cos code of each patch's row (first half of the channels) and column
    (second half), patches row-major (token n = row * gw + col), and E_tem as the code of the frame index; the codes
    written out here from sincos_1d's docstring: d/2 frequencies from 0.9 pi per step down to pi / n, geometrically,
    sin then cos."""
    cfg = slvp.SLVPConfig.tiny()
    (gh, gw), d, T = cfg.grid, cfg.dec_dim, cfg.num_frames

    def code(pos, n, dim):                                    # [dim]: sin(pos w_k), then cos(pos w_k), k < dim / 2
        k = dim // 2
        w = [0.9 * math.pi * (1 / (0.9 * n)) ** (j / (k - 1)) for j in range(k)]
        return torch.tensor([math.sin(pos * x) for x in w] + [math.cos(pos * x) for x in w])

    model = slvp.SLVP(cfg, "vision")
    for row, col in ((0, 0), (0, 1), (1, 0), (2, 5), (3, 4)):
        want = torch.cat([code(row, gh, d // 2), code(col, gw, d // 2)])
        assert torch.allclose(model.E_pos[row * gw + col].detach(), want, atol=1e-5), (row, col)
    for t in range(T):
        assert torch.allclose(model.E_tem[t].detach(), code(t, T, d), atol=1e-5), t


def test_language_query_init_as_its_comment_says():
    """Language as query (SLVP.__init__): E_pos and E_tem start as standard Gaussian codes, not sin-cos ones (whose
    values lie in [-1, 1], std 0.71), and the first cross-attention's key projection equals its query projection, both
    scaled 4x: nn.Linear(d, d) draws weight and bias from U(-1/sqrt(d), 1/sqrt(d)) (PyTorch's documented init), so
    scaled they reach past 1/sqrt(d), up to 4/sqrt(d); the other layers keep the plain init."""
    cfg = slvp.SLVPConfig.tiny()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, "language")
    for name in ("E_pos", "E_tem"):
        e = getattr(model, name).detach()
        assert abs(e.mean().item()) < 0.15 and 0.85 < e.std().item() < 1.15 and e.abs().max() > 1.5, name
    read, bound = model.decoder.layers[0].cross_attn, 1 / cfg.dec_dim ** 0.5
    assert torch.equal(read.k.weight, read.q.weight) and torch.equal(read.k.bias, read.q.bias)
    for t in (read.q.weight, read.q.bias):
        assert bound < t.abs().max() <= 4 * bound + 1e-6
    other = model.decoder.layers[1].cross_attn
    for t in (other.q.weight, other.q.bias, other.k.weight, other.k.bias):
        assert t.abs().max() <= bound + 1e-6


@pytest.mark.parametrize("fusion", ["vision", "language"])
def test_fusion_is_eq_2_or_8_through_torch_transformer_decoder(fusion):
    """f_fused written out with torch.nn.TransformerDecoder (our decoder's weights) as the decoder: Eq. (2), query
    f_v + E_pos + E_tem, memory f_r, padded text masked as keys of the cross-attention; Eq. (8), query cat(f_r, q^ +
    E_pos + E_tem), memory f_v + E_pos + E_tem, the self-attention's keys all but the padded text (every q^ token
    visible to every query), its last T*N outputs. E_pos[n] + E_tem[t] on token t*N + n, built token by token."""
    cfg, frames, ids, mask = tiny_batch()
    torch.manual_seed(0)
    model = slvp.SLVP(cfg, fusion).eval()
    ref = torch_decoder(model.decoder, cfg)
    T, N = cfg.num_frames, cfg.num_patches
    with torch.no_grad():
        f_v, f_r = model.encode(frames, ids, mask)
        pos = torch.stack([model.E_pos[n] + model.E_tem[t] for t in range(T) for n in range(N)])[None]
        if fusion == "vision":
            want = ref(f_v + pos, f_r, memory_key_padding_mask=~mask)
        else:
            query = torch.cat([f_r, model.q + pos.expand(len(ids), -1, -1)], 1)
            keep = torch.cat([mask, torch.ones(len(ids), T * N, dtype=torch.bool)], 1)
            want = ref(query, f_v + pos, tgt_key_padding_mask=~keep)[:, -T * N:]
        got = model.fuse(frames, ids, mask)
    assert want.std() > 0.1 and (got - want).abs().max() < TOL


def test_checkpoint_restores_every_config_field(tmp_path):
    """save_checkpoint / load_checkpoint keep every SLVPConfig field, here each one away from its default, among them
    those that no weight's shape fixes (LayerNorm and RMSNorm epsilons, T5's max distance, the head counts): a field
    left out of the metadata would come back as its default without an error, e.g. a timm ViT's eps 1e-6 as 1e-5."""
    cfg = dataclasses.replace(slvp.SLVPConfig.tiny(), num_frames=3, t5_gated=True, t5_num_buckets=16,
                              t5_max_distance=20, t5_eps=1e-3, vit_eps=1e-6, vit_norm_pre=False, vit_norm_final=True)
    for f in dataclasses.fields(slvp.SLVPConfig):
        assert getattr(cfg, f.name) != f.default, f.name
    slvp.save_checkpoint(tmp_path / "c.safetensors", slvp.SLVP(cfg))
    assert slvp.load_checkpoint(tmp_path / "c.safetensors").cfg == cfg


def test_t5_norm_in_bfloat16_matches_transformers():
    """T5's RMSNorm takes its statistics in float32 whatever the input's dtype, as transformers' T5LayerNorm does: in
    a bfloat16 model the two give the same bits (statistics in bfloat16 differ by up to 0.03 on inputs of std 30)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    g = torch.Generator().manual_seed(0)
    d = 48
    weight = 1 + 0.2 * torch.randn(d, generator=g)
    ours, ref = slvp.T5RMSNorm(d, 1e-6), T5LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
    x = (30 * torch.randn(4, 7, d, generator=g)).bfloat16()
    with torch.no_grad():
        got, want = ours.bfloat16()(x), ref.bfloat16()(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
