"""Edge-case inputs to the public API (SPEC §3, §5) that a researcher forking the code plausibly passes: each either
gives the right result, checked against an independent value (hand-worked, grid_sample, the DAVIS evaluator's or
Middlebury's conventions), or fails with an error that names the problem."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
import flow_warp_triton as fw
import slvp

CFG = slvp.SLVPConfig.tiny()


def clip(B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, CFG.num_frames, 3, *CFG.frame_size, generator=g)
    return frames, torch.randint(3, 100, (B, 5), generator=g), torch.ones(B, 5, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- the model

def test_frames_of_integer_dtype_are_refused_and_float64_taken():
    """uint8 frames (PIL, video decoders) were normalized as if in [0, 1]: silently other masks (logits off by ~1).
    float64 frames (numpy's default) crashed in the patch embedding's conv; they are the float32 frames' values."""
    torch.manual_seed(0)
    model = slvp.SLVP(CFG, task="rvos").eval()
    frames, ids, mask = clip()
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"\[0, 1\]"):
            model((frames * 255).round().byte(), ids, mask)
        ref = model(frames, ids, mask)["masks"]
        assert torch.allclose(model(frames.double(), ids, mask)["masks"], ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_to_another_dtype_runs(dtype):
    """model.to(torch.bfloat16) (inference) and model.double() (gradcheck) crashed: the heads cast their input to
    float32 against bf16/float64 weights ("mat1 and mat2 must have the same dtype"), and T5's mask bias built in float32
    overflowed with float64's minimum. The reference: the float32 model on the same weights."""
    torch.manual_seed(0)
    frames, ids, mask = clip()
    for task in ("rvos", "pretrain"):
        model = slvp.SLVP(CFG, task=task).eval()
        if task == "pretrain":  # the zero-initialized flow head gives the zero flow in every dtype: nothing to compare
            torch.nn.init.normal_(model.flow_head.weight, std=0.02)
        cast = slvp.SLVP(CFG, task=task).eval()
        cast.load_state_dict(model.state_dict())
        cast = cast.to(dtype)
        with torch.no_grad():
            ref = model(frames, ids, mask)
            out = cast(frames.to(dtype), ids, mask)
        ref = ref["masks"] if task == "rvos" else ref
        out = out["masks"] if task == "rvos" else out
        tol = 0.1 if dtype == torch.bfloat16 else 1e-4   # bf16: measured 0.02 on masks of std 0.6
        assert ref.std() > 0.1, task
        assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < tol, task


def test_t5_in_float64_matches_float32():
    torch.manual_seed(0)
    t5 = slvp.T5Encoder(CFG).eval()
    t64 = slvp.T5Encoder(CFG).eval()
    t64.load_state_dict(t5.state_dict())
    t64 = t64.double()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        assert torch.allclose(t64(ids, mask).float(), t5(ids, mask), atol=1e-4)
def test_vit_refuses_frames_of_another_size():
    """A portrait frame (48x32 for 32x48) or 36x52 (the conv drops the rest) has the same 24 patches: it ran with the
    position embedding of another grid; 224x224 failed 'The size of tensor a (785) must match ... (25)'."""
    vit = slvp.ViTEncoder(CFG).eval()
    for size in ((48, 32), (36, 52), (224, 224)):
        with pytest.raises(ValueError, match="frame_size"):
            vit(torch.randn(1, 3, *size))


def test_rvos_loss_reads_masks_as_the_evaluator_does():
    """Non-zero is the object (the DAVIS evaluator's astype(bool)): a 0/255 mask, uint8 (a binary PNG) or float (a
    PNG read with .float()), was a BCE and Dice target of 255 (a loss of 11.38 where the bool mask's is 8.04); float
    values in [0, 1] are soft targets. References: the bool mask's loss (hand-worked in test_rvos_loss_hand_worked),
    and torch's BCE with logits against the soft target itself."""
    torch.manual_seed(0)
    model = slvp.SLVP(CFG, task="rvos")
    frames, ids, mask = clip(B=2)
    with torch.no_grad():
        out = model(frames, ids, mask)
    H, W = CFG.frame_size
    masks = torch.zeros(2, CFG.num_frames, H, W, dtype=torch.bool)
    masks[..., 8:20, 10:30] = True
    boxes = torch.tensor([10 / W, 8 / H, 30 / W, 20 / H]).expand(2, CFG.num_frames, 4)
    valid = torch.ones(2, CFG.num_frames, dtype=torch.bool)
    ref = model.rvos_loss(out, boxes, masks, valid)[0]
    for other in (masks.byte() * 255, masks.float() * 255, masks.float()):
        assert torch.allclose(model.rvos_loss(out, boxes, other, valid)[0], ref), other.dtype
    soft = torch.rand(2, CFG.num_frames, H, W, generator=torch.Generator().manual_seed(1))
    _, parts = model.rvos_loss(out, boxes, soft, valid)
    assert torch.allclose(parts["bce"], F.binary_cross_entropy_with_logits(out["masks"].float(), soft))
    with pytest.raises(ValueError, match="do not match"):
        model.rvos_loss(out, boxes, masks.flatten(0, 1), valid)


# ---------------------------------------------------------------------------------------------- the warp and loss

def reference_loss(image, flow, target, mask):
    """grid_sample (align_corners=True, zeros) in float64, masked mean."""
    B, C, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0].double()) * 2 / (W - 1) - 1, (ys + flow[:, 1].double()) * 2 / (H - 1) - 1], -1)
    sq = (F.grid_sample(image.double(), grid, align_corners=True) - target.double()) ** 2
    m = mask.double().expand_as(sq)
    return (sq * m).sum() / m.sum()


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_a_mask_per_frame_without_its_channel_axis_is_refused(interpret, monkeypatch):
    """A [B, H, W] mask with B == C (one clip of T = 4 frames: B*(T-1) = 3 pairs, as photometric_objective builds
    them) broadcast as [C, H, W]: frame b's mask applied to channel b of every frame, a wrong loss without an error."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(0)
    image, target = torch.rand(3, 3, 5, 7, generator=g), torch.rand(3, 3, 5, 7, generator=g)
    flow = torch.randn(3, 2, 5, 7, generator=g)
    mask = torch.rand(3, 5, 7, generator=g) > 0.5
    with pytest.raises(ValueError, match="4-D"):
        fw.photometric_loss(image, flow, target, mask)
    loss = fw.photometric_loss(image, flow, target, mask[:, None])
    assert loss.item() == pytest.approx(reference_loss(image, flow, target, mask[:, None]).item(), rel=1e-5)
def test_metrics_refuse_masks_of_other_shapes():
    """The DAVIS evaluator asserts gt.shape == pred.shape; numpy broadcast a one-frame or [H, W] prediction over every
    frame: gt with its object in frame 0 only, pred that frame alone, scored J = [1, 0] without an error."""
    gt = np.zeros((1, 2, 20, 30), bool)
    gt[0, 0, 5:15, 5:20] = True
    with pytest.raises(ValueError, match="shape"):
        ev.db_eval_iou(gt[0], gt[0, 0])
    with pytest.raises(ValueError, match="T, H, W"):
        ev.evaluate_objects(gt, gt[:, :1])
    with pytest.raises(ValueError, match="binary"):
        ev.db_eval_iou(gt[0], gt[0].astype(np.float32) * 0.7)


def test_boundary_of_single_frames_as_the_evaluator_takes_them():
    """db_eval_boundary(gt, pred) on [H, W] masks (the evaluator's 2-D case) failed with IndexError 'too many indices';
    the 20x20 square shifted 5 px is F = 0.5 (worked in test_j_and_f_hand_worked)."""
    gt = np.zeros((100, 100), bool)
    gt[20:40, 20:40] = True
    shifted = np.roll(gt, 5, 1)
    assert float(ev.db_eval_boundary(gt, shifted)) == pytest.approx(0.5)


def test_overlay_takes_the_mask_as_a_mask():
    """A uint8 0/1 mask or a torch bool mask indexed the frame as row numbers / a sequence: rows 0 and 1 painted, the
    object not. Hand-worked: inside 0.5 * 100 + 0.5 * 255 = 177.5, rounded down; the DAVIS boundary map in the colour."""
    frame = np.full((4, 5, 3), 100, np.uint8)
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    want = [[255, 255, 255, 255, 100], [255, 177, 177, 255, 100], [255, 255, 255, 255, 100], [100] * 5]
    for mask in (m, m.astype(np.uint8), torch.from_numpy(m)):
        assert ev.overlay(frame, mask)[:, :, 0].tolist() == want
    with pytest.raises(ValueError, match="uint8"):
        ev.overlay(frame / 255, m)


def test_flow_colour_of_a_non_finite_pixel_is_black():
    """Middlebury's flowToColor paints NaN (and unknown) flow black and leaves it out of the normalization; here one
    NaN pixel made the whole picture fail with IndexError (index -9223372036854775808)."""
    flow = np.zeros((2, 1, 3), np.float32)
    flow[0, 0, 1] = 3.0                                               # right: red at full saturation
    flow[0, 0, 2] = np.nan
    c = ev.flow_to_color(flow)[0]
    assert c.tolist() == [[255, 255, 255], [255, 0, 0], [0, 0, 0]]


def test_predict_refuses_a_pretraining_model(spm_model):
    import data
    ds = data.build_dataset("synthetic", None, "val", CFG, train=False, size=1)
    with pytest.raises(ValueError, match="rvos"):
        list(ev.predict(slvp.SLVP(CFG), ds, slvp.Tokenizer(spm_model), progress=False))


# ---------------------------------------------------------------------------------------------- the tokenizer

def test_tokenizer_takes_a_list_and_defaults_to_64(spm_model):
    """SPEC §3: (texts: list[str], max_len=64). A str was read as a list of characters: 'circle' gave 6 rows, and
    'the red circle' failed 'empty text in the batch (position 3)'."""
    tok = slvp.Tokenizer(spm_model)
    ids, mask = tok(["the red circle " * 40])
    assert ids.shape == (1, 64) and ids[0, -1] == 1                  # cut to 63 pieces + </s>
    with pytest.raises(TypeError, match="list"):
        tok("circle", max_len=8)


@pytest.mark.parametrize("max_len", [0, -3])
def test_tokenizer_refuses_a_max_len_without_room_for_eos(spm_model, max_len):
    """Cut to max_len - 1 pieces and </s>: max_len 0 kept all pieces but the last ([:-1]), rows longer than asked."""
    with pytest.raises(ValueError, match="max_len"):
        slvp.Tokenizer(spm_model)(["the red circle moves left"], max_len=max_len)


def test_overlay_refuses_logits_and_probabilities():
    """A float mask (logits, sigmoid output) made overlay tint every non-zero pixel, i.e. the whole frame, silently
    (up to commit cf5e320; before it an IndexError). Hand-worked: with the binary mask only the 2x3 object is tinted (177)."""
    frame = np.full((4, 5, 3), 100, np.uint8)
    logits = np.full((4, 5), -3.0, np.float32)
    logits[1:3, 1:4] = 3.0
    with pytest.raises(ValueError, match="binary"):
        ev.overlay(frame, logits)
    with pytest.raises(ValueError, match="binary"):
        ev.overlay(frame, 1 / (1 + np.exp(-logits)))
    assert (ev.overlay(frame, logits > 0)[:, :, 0] == 177).sum() == 2    # interior of the 2x3 object (rest: boundary)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_photometric_loss_takes_one_hw_mask_for_every_image(interpret, monkeypatch):
    """The docstring says the mask is broadcastable to [B,C,H,W]; an [H, W] mask (one valid region for every image)
    was taken before, and was refused with the [B, H, W] one up to commit cf5e320. Reference: grid_sample (align_corners=True, zeros)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(0)
    image, target = torch.rand(3, 3, 5, 7, generator=g), torch.rand(3, 3, 5, 7, generator=g)
    flow = torch.randn(3, 2, 5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.5
    ys, xs = torch.meshgrid(torch.arange(5.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0].double()) * 2 / 6 - 1, (ys + flow[:, 1].double()) * 2 / 4 - 1], -1)
    sq = (F.grid_sample(image.double(), grid, align_corners=True) - target.double()) ** 2
    m = mask.double().expand_as(sq)
    ref = ((sq * m).sum() / m.sum()).item()
    assert fw.photometric_loss(image, flow, target, mask).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="4-D"):                      # the ambiguous [B, H, W] stays refused
        fw.photometric_loss(image, flow, target, mask[None].expand(3, 5, 7))


# ---------------------------------------------------------------------------------------------- from a mutation run

def test_metrics_refuse_a_void_mask_of_another_shape():
    """same_shapes' docstring: gt, pred and void of one shape, as the evaluator asserts; a [H, W] void was broadcast
    over every frame."""
    gt = np.zeros((2, 20, 30), bool)
    gt[:, 5:15, 5:20] = True
    void = np.zeros((20, 30), bool)
    with pytest.raises(ValueError, match="void"):
        ev.db_eval_iou(gt, gt, void)
    with pytest.raises(ValueError, match="void"):
        ev.db_eval_boundary(gt, gt, void)


def test_flow_colour_of_a_non_finite_y_component_is_black():
    """Middlebury's flowToColor: a pixel is unknown where either component is not finite; a NaN in the y channel made
    the whole picture fail with IndexError, as one in x did."""
    flow = np.zeros((2, 1, 3), np.float32)
    flow[0, 0, 1] = 3.0                                               # right: red at full saturation
    flow[1, 0, 2] = np.inf
    assert ev.flow_to_color(flow)[0].tolist() == [[255, 255, 255], [255, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_photometric_loss_of_an_empty_batch_is_the_mean_of_nothing(interpret, monkeypatch):
    """torch's F.mse_loss on empty tensors gives NaN (the mean of nothing, as the docstring says of an all-zero mask);
    the Triton launcher divided by image.numel() = 0: ZeroDivisionError."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    image, target, flow = torch.rand(0, 3, 4, 5), torch.rand(0, 3, 4, 5), torch.zeros(0, 2, 4, 5, requires_grad=True)
    assert torch.isnan(F.mse_loss(image, target))
    loss = fw.photometric_loss(image, flow, target)
    assert torch.isnan(loss) and loss.dtype == torch.float32
    assert fw.flow_warp(image, flow).shape == image.shape


def test_load_checkpoint_refuses_config_overrides(tmp_path):
    """load_checkpoint's overrides go to SLVP(): num_frames=2 failed with Python's "unexpected keyword argument"; a
    config given as cfg= with "multiple values". The weights fix T (E_tem: T x d), the grid (E_pos) and the patch."""
    cfg = slvp.SLVPConfig.tiny()
    path = tmp_path / "pre.safetensors"
    slvp.save_checkpoint(path, slvp.SLVP(cfg))
    for field, value in (("num_frames", 2), ("frame_size", (64, 96)), ("patch_size", 16)):
        with pytest.raises(ValueError, match=f"{field} cannot be overridden"):
            slvp.load_checkpoint(path, task="rvos", **{field: value})
    assert slvp.load_checkpoint(path, task="rvos", freeze_text=False).freeze_text is False


def test_tokenizer_refuses_an_empty_list_and_a_max_len_not_an_integer(spm_model):
    """tok([]) failed inside max() ("max() arg is an empty sequence"), and so did an empty generator (truthy, it passed
    a check for no texts), max_len=None in a comparison with an int; texts from a generator and a numpy integer
    max_len are taken, as a list and an int are."""
    tok = slvp.Tokenizer(spm_model)
    for empty in ([], (t for t in [])):
        with pytest.raises(ValueError, match="no texts; expected a list of one or more"):
            tok(empty)
    for max_len in (None, 8.0):
        with pytest.raises(ValueError, match=f"max_len {max_len}: expected an integer of at least 1"):
            tok(["the red circle"], max_len=max_len)
    ref = tok(["the red circle", "a blue square"], max_len=8)
    got = tok((t for t in ("the red circle", "a blue square")), max_len=np.int64(8))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("case", ["batch 2 of ids", "ids of batch 2", "no clip", "grey frames", "RGBA frames",
                                  "int64 mask", "float mask", "ids without their batch axis",
                                  "mask of one text for two", "mask of one token", "ids stacked of [1, L] rows"])
def test_inputs_that_do_not_fit_are_refused_by_name(case):
    """Frames and text of other batch sizes, an empty batch, frames with other than 3 channels and a mask that is not
    bool failed deep in torch (a reshape, a broadcast, masked_fill_'s dtype), or, one grey channel, ran by
    broadcasting against the RGB mean and std; a mask [1, L] or [B, 1] beside ids [B, L] ran broadcast over the batch
    or the tokens, ids and mask [B, 1, L] (the Tokenizer's rows stacked) failed in an unpacking; each is refused now,
    naming the inputs and what is expected."""
    model = slvp.SLVP(CFG, task="rvos").eval()
    frames, ids, mask = clip(B=2)
    wrong = {"batch 2 of ids": (frames[:1], ids, mask), "ids of batch 2": (frames, ids[:1], mask[:1]),
             "no clip": (frames[:0], ids[:0], mask[:0]), "grey frames": (frames[:, :, :1], ids, mask),
             "RGBA frames": (torch.cat([frames, frames[:, :, :1]], 2), ids, mask),
             "int64 mask": (frames, ids, mask.long()), "float mask": (frames, ids, mask.float()),
             "ids without their batch axis": (frames[:1], ids[0], mask[0]),
             "mask of one text for two": (frames, ids, mask[:1]), "mask of one token": (frames, ids, mask[:, :1]),
             "ids stacked of [1, L] rows": (frames, ids[:, None], mask[:, None])}[case]
    expected = {"grey frames": r"expected \[B >= 1, T, 3 \(RGB\), H, W\]", "RGBA frames": r"3 \(RGB\)",
                "no clip": "B >= 1", "int64 mask": "mask is torch.int64; expected bool",
                "float mask": "mask is torch.float32; expected bool"}.get(case, r"expected \[B, L\] each")
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=expected):
        model(*wrong)


def test_rvos_loss_refuses_boxes_and_valid_of_other_shapes():
    """valid of shape [B] failed in a broadcast ("size of tensor a (8) must match ... (2)"), boxes [4] with an
    IndexError; a box per frame and a flag per frame are expected."""
    model = slvp.SLVP(CFG, task="rvos").eval()
    frames, ids, mask = clip(B=2)
    with torch.no_grad():
        out = model(frames, ids, mask)
    T = CFG.num_frames
    boxes, masks, valid = torch.tensor([0.1, 0.2, 0.5, 0.6]).expand(2, T, 4), torch.zeros(2, T, *CFG.frame_size), \
        torch.ones(2, T, dtype=torch.bool)
    assert torch.isfinite(model.rvos_loss(out, boxes, masks, valid)[0])
    for b, v in ((boxes, valid[:, 0]), (boxes[0, 0], valid), (boxes[..., :2], valid)):
        with pytest.raises(ValueError, match=rf"expected \[B, T, 4\] and \[B, T\], B, T = 2, {T} as predicted"):
            model.rvos_loss(out, b, masks, v)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")   # torch._dynamo's import, 14 times
def test_a_compiled_model_saves_as_the_model_itself(tmp_path):
    """save_checkpoint(path, torch.compile(model)) wrote every key with torch.compile's `_orig_mod.` prefix, which
    load_checkpoint then refused (a list of hundreds of missing and unexpected keys); its checkpoint is the model's
    own now, tensor for tensor."""
    torch.manual_seed(0)
    model = slvp.SLVP(CFG, task="rvos")
    slvp.save_checkpoint(tmp_path / "compiled.safetensors", torch.compile(model))
    loaded = slvp.load_checkpoint(tmp_path / "compiled.safetensors")
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None     # as on macOS and Windows: no triton to import
import torch
import flow_warp_triton as fw, slvp, train
from test_api_edges import reference_loss
assert fw.triton is None
g = torch.Generator().manual_seed(0)
image, target = torch.rand(2, 3, 9, 11, generator=g), torch.rand(2, 3, 9, 11, generator=g)
flow = (3 * torch.randn(2, 2, 9, 11, generator=g)).requires_grad_()
loss = fw.photometric_loss(image, flow, target)
loss.backward()
f = flow.detach().double().requires_grad_()
ref = reference_loss(image, f, target, torch.ones(1, 1, 9, 11))
ref.backward()
assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item(), (loss.item(), ref.item())
assert torch.allclose(flow.grad.double(), f.grad, rtol=1e-4, atol=1e-9)
train.main(["--mode", "pretrain", "--steps", "2", "--eval-every", "2", "--eval-clips", "2", "--out", sys.argv[1]])
print("ok")
"""


def test_without_triton_the_torch_reference_runs(tmp_path):
    """On macOS and Windows (no triton wheel) flow_warp_triton imports with triton None, the loss and its gradient are
    grid_sample's (reference_loss above, float64), and train.py's main job runs (README, "Set-up")."""
    here = Path(__file__).resolve().parent                     # reference_loss from this file, the scripts from above
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=here.parent, env={**os.environ, "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"},
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert (tmp_path / "run/ckpt.safetensors").is_file()
