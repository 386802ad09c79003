"""flow_warp_triton.py: the Triton kernels against grid_sample + mse_loss and their autograd. On CPU tensors through
TRITON_INTERPRET=1 (set in conftest.py before triton is imported); compiled, on a CUDA GPU when one is present and
TRITON_INTERPRET=0 is set (tests/gpu_check.py runs them so).

Sample points are kept off exact pixel borders: at an integer sample coordinate bilinear interpolation is not
differentiable and the two implementations may take different one-sided derivatives (the reference's coordinate
also takes a round trip through [-1, 1]), so every flow here has its fractional part in [0.1, 0.9]."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flow_warp_triton as fw

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(fw.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make(B=2, C=3, H=37, W=53, seed=0, reach=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, C, H, W, generator=g)
    target = torch.rand(B, C, H, W, generator=g)
    # integer part in [-reach, reach] (many points land outside the frame), fractional part in [0.1, 0.9]
    flow = torch.randint(-reach, reach + 1, (B, 2, H, W), generator=g) + 0.1 + 0.8 * torch.rand(B, 2, H, W, generator=g)
    return (x.to(DEVICE, dtype) for x in (image, flow, target))


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_triton_path_runs_under_the_interpreter(monkeypatch):
    """Proof that the kernels ran, not a silent fallback: the torch reference raises if called."""
    image, flow, target = make()
    assert fw.use_triton(image, flow)
    def boom(*a, **k):
        raise AssertionError("the torch reference was called")
    monkeypatch.setattr(fw, "flow_warp_reference", boom)
    monkeypatch.setattr(fw, "photometric_loss_reference", boom)
    fw.flow_warp(image, flow)
    fw.photometric_loss(image, flow.requires_grad_(), target).backward()
    for mask in (torch.ones(2, 1, 37, 53, device=DEVICE), torch.ones(2, 3, 37, 53, dtype=torch.bool, device=DEVICE)):
        fw.photometric_loss(image, flow, target, mask).backward()
    with pytest.raises(AssertionError, match="reference was called"):   # float64 takes the torch path
        fw.flow_warp(image.double(), flow.detach().double())


def test_frames_of_2_31_pixels_take_the_torch_path():
    """The kernels number a frame's pixels in 32 bits (H * W wrapped past 2^31 and they computed nothing): such
    frames go to the torch reference. Views of one element, so nothing is allocated."""
    one = torch.zeros(1, 1, 1, 1, device=DEVICE)
    assert fw.use_triton(one.expand(1, 3, 46340, 46340), one.expand(1, 2, 46340, 46340))     # 2^31 - 88048 pixels
    assert not fw.use_triton(one.expand(1, 3, 46341, 46341), one.expand(1, 2, 46341, 46341))  # 2^31 + 4633
    assert not fw.use_triton(one.expand(1, 3, 1, 2 ** 31), one.expand(1, 2, 1, 2 ** 31))
    assert fw.use_triton(one[0, 0, 0]) == fw.use_triton(one)          # any shape asks (gpu_check asked with [1])


def test_interpreter_set_after_import_takes_the_torch_path():
    """Kernels defined without TRITON_INTERPRET=1 are compiled ones: setting it later must not send CPU tensors to
    them (it did: 'RuntimeError: 0 active drivers'), and the loss is the reference's."""
    code = ("import os, torch, flow_warp_triton as fw\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "g = torch.Generator().manual_seed(0)\n"
            "image, flow, target = (torch.rand(1, c, 5, 6, generator=g) for c in (3, 2, 3))\n"
            "assert not fw.use_triton(image, flow)\n"
            "print(fw.photometric_loss(image, flow, target).item() == fw.photometric_loss_reference(image, flow, "
            "target).item())\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def test_interpreter_unset_after_import_takes_the_torch_path(monkeypatch):
    """use_triton's docstring: CPU tensors reach the kernels only while TRITON_INTERPRET=1 is still set; the tests unset
    it to take the torch reference (the 'interpret 0' cases), which a check of the import-time flag alone ignored."""
    if not fw.INTERPRETED:
        pytest.skip("CPU tensors reach the kernels only when TRITON_INTERPRET=1 was set at import")
    image, flow = torch.rand(1, 3, 5, 6), torch.rand(1, 2, 5, 6)
    assert fw.use_triton(image, flow)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fw.use_triton(image, flow)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fw.use_triton(image, flow)


@pytest.mark.parametrize("C,H,W,B,reach", [(3, 37, 53, 2, 6), (1, 37, 53, 3, 6), (3, 8, 300, 1, 6), (2, 9, 14, 2, 40)])
def test_warp_forward_and_backward_match_grid_sample(C, H, W, B, reach):
    """The last case: flows up to 40 px on a 9x14 frame, beyond the clamp of the whole-pixel step to +-(size + 2)."""
    image, flow, _ = make(B, C, H, W, seed=C + H, reach=reach)
    image.requires_grad_()
    flow.requires_grad_()
    out = fw.flow_warp(image, flow)
    ref = fw.flow_warp_reference(image, flow)
    # the forward against grid_sample in float64 on the same inputs: in float32 grid_sample's own coordinate
    # round trip through [-1, 1] costs about W * 4e-8 px (1.1e-5 in value at W = 300; 1.4e-5 measured on the 8x300
    # case), which the kernels, weighting by the flow's fractional part, do not pay (1.2e-7 at most measured)
    exact = fw.flow_warp_reference(image.detach().double(), flow.detach().double())
    assert (out.double() - exact).abs().max().item() < 1e-6
    assert (ref == 0).any() and (out == 0).any()          # some points left the frame
    g_out = torch.randn_like(out)
    gi, gf = torch.autograd.grad(out, (image, flow), g_out)
    ri, rf = torch.autograd.grad(ref, (image, flow), g_out)
    assert rel(gf, rf) < 1e-4
    image64 = image.detach().double().requires_grad_()
    (ri64,) = torch.autograd.grad(fw.flow_warp_reference(image64, flow.detach().double()), image64, g_out.double())
    assert rel(gi, ri64) < 1e-5
    # no image gradient is computed or returned when the image does not ask for one
    (gf2,) = torch.autograd.grad(fw.flow_warp(image.detach(), flow), flow, g_out)
    assert torch.equal(gf2, gf)


@pytest.mark.parametrize("mask_kind", [None, "pixel", "element", "weight"])
def test_fused_loss_and_flow_gradient(mask_kind):
    image, flow, target = make(seed=5)
    g = torch.Generator().manual_seed(9)
    mask = {None: None,
            "pixel": (torch.rand(2, 1, 37, 53, generator=g) > 0.3).float(),      # read with channel stride 0
            "element": torch.rand(2, 3, 37, 53, generator=g) > 0.5,
            "weight": torch.rand(2, 1, 37, 53, generator=g)}[mask_kind]        # soft: the weighted mean
    mask = None if mask is None else mask.to(DEVICE)
    f1 = flow.clone().requires_grad_()
    f2 = flow.clone().requires_grad_()
    loss = fw.photometric_loss(image, f1, target, mask)
    ref = fw.photometric_loss_reference(image, f2, target, mask)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    (3.0 * loss).backward()                                  # backward scales by grad_output
    (3.0 * ref).backward()
    assert rel(f1.grad, f2.grad) < 1e-4
    if mask_kind == "pixel":                                  # masked-out pixels get no gradient
        assert (f1.grad * (1 - mask)).abs().max() == 0


def test_fused_loss_is_deterministic():
    image, flow, target = make(seed=3)
    runs = []
    for _ in range(2):
        f = flow.clone().requires_grad_()
        loss = fw.photometric_loss(image, f, target)
        loss.backward()
        runs.append((loss, f.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_known_shift_by_hand():
    """Frame 2 = frame 1 moved by (+2, -1) px: the true flow (-2, +1) gives zero loss where it stays inside."""
    V1 = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(1))
    V2 = torch.zeros_like(V1)
    V2[:, :, :-1, 2:] = V1[:, :, 1:, :-2]
    flow = torch.empty(1, 2, 20, 30)
    flow[:, 0], flow[:, 1] = -2.0, 1.0
    inside = torch.zeros(1, 1, 20, 30)
    inside[:, :, :-1, 2:] = 1
    V1, V2, flow, inside = (x.to(DEVICE) for x in (V1, V2, flow, inside))
    assert fw.photometric_loss(V1, flow, V2, inside).item() < 1e-12
    assert fw.photometric_loss(V1, torch.zeros_like(flow), V2, inside).item() > 0.05
    assert torch.equal(fw.flow_warp(V1, flow)[:, :, :-1, 2:], V2[:, :, :-1, 2:])


def test_non_contiguous_inputs():
    image, flow, target = make(seed=11)
    image_nc = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)       # channels-last strides
    target_nc = torch.cat([target, target], dim=3)[..., ::2]                   # a strided view
    flow_nc = flow.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not (image_nc.is_contiguous() or target_nc.is_contiguous() or flow_nc.is_contiguous())
    target_c = target_nc.contiguous()
    assert (fw.flow_warp(image_nc, flow_nc) - fw.flow_warp_reference(image, flow)).abs().max() < 1e-5  # W = 53
    loss = fw.photometric_loss(image_nc, flow_nc, target_nc)
    f = flow.clone().requires_grad_()
    ref = fw.photometric_loss_reference(image, f, target_c)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item() and rel(flow_nc.grad, f.grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Half inputs, fp32 accumulation: the same numbers as the fp32 reference on the same (rounded) inputs, up to
    the rounding of the output and of the flow gradient to the input dtype: one unit in the last place of each value
    at most (eps |v|, and eps tiny among fp16's subnormal gradients; measured 0.99 of it in bf16, 0.49 in fp16)."""
    fi = torch.finfo(dtype)
    ulp = lambda v: fi.eps * v.abs() + fi.tiny * fi.eps
    image, flow, target = make(seed=7, dtype=dtype)
    out = fw.flow_warp(image, flow)
    assert out.dtype == dtype
    ref = fw.flow_warp_reference(image.float(), flow.float())
    assert ((out.float() - ref).abs() <= ulp(ref)).all()
    f = flow.clone().requires_grad_()
    loss = fw.photometric_loss(image, f, target)
    loss.backward()
    f32 = flow.float().requires_grad_()
    ref = fw.photometric_loss_reference(image.float(), f32, target.float())
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()   # fp32 accumulation: no half rounding in the loss
    assert f.grad.dtype == dtype and ((f.grad.float() - f32.grad).abs() <= ulp(f32.grad)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_in_half_precision_moves_by_the_flow(dtype):
    """The torch path (taken on CPU without the interpreter, or on CUDA without triton) with half inputs, 648 pixels
    wide: a whole-pixel flow of (+3, -1) gives the image shifted by it, zeros where it leaves the frame, as worked
    by hand (to 1e-3: the float32 grid's round trip through [-1, 1] moves a sample by under 1e-4 px; a grid in
    bfloat16 put samples up to 3 px off)."""
    H, W = 5, 648
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3)).to(dtype)
    flow = torch.zeros(2, 2, H, W, dtype=dtype)
    flow[:, 0], flow[:, 1] = 3, -1
    want = torch.zeros_like(image)
    want[:, :, 1:, :W - 3] = image[:, :, :H - 1, 3:]   # out(x, y) = image(x + 3, y - 1)
    out = fw.flow_warp_reference(image, flow)
    assert out.dtype == dtype and (out.float() - want.float()).abs().max() < 1e-3
    loss = fw.photometric_loss_reference(image, flow, want)
    assert loss.dtype == torch.float32 and loss.item() < 1e-8


def test_64_bit_offsets(monkeypatch):
    """A plane whose offsets pass 2^31 - 1 is detected (on a meta tensor: no memory), and the 64-bit code path
    gives the same results as the 32-bit one."""
    huge = torch.empty(0, device="meta").as_strided((1, 3, 2, 2), (0, 1, 2 ** 31, 1))
    assert fw._wide(huge) and not fw._wide(torch.empty(1, 3, 2, 2))
    image, flow, target = make(seed=13)
    out32 = fw.flow_warp(image, flow)
    f32 = flow.clone().requires_grad_()
    l32 = fw.photometric_loss(image, f32, target)
    l32.backward()
    monkeypatch.setattr(fw, "_wide", lambda *t: True)
    f64 = flow.clone().requires_grad_()
    l64 = fw.photometric_loss(image, f64, target)
    l64.backward()
    assert torch.equal(l32, l64) and torch.equal(f32.grad, f64.grad)
    assert torch.equal(fw.flow_warp(image, flow), out32)


def test_gradcheck_torch_path():
    image, flow, target = make(B=1, C=2, H=6, W=7, seed=2, reach=2)
    image, flow, target = image.double(), flow.double().requires_grad_(), target.double()
    assert not fw.use_triton(image, flow)
    assert torch.autograd.gradcheck(lambda f: fw.photometric_loss(image, f, target), (flow,))
    img = image.clone().requires_grad_()
    # grid_sample's image gradient is scattered with atomics on CUDA: backward is not bitwise repeatable there, and
    # gradcheck's reentrancy check needs a tolerance (PyTorch's own OpInfo for grid_sample uses 1e-15)
    assert torch.autograd.gradcheck(fw.flow_warp, (img, flow), nondet_tol=1e-12 if img.is_cuda else 0.0)


def test_bad_shapes_fail_clearly():
    image, flow, target = make()
    with pytest.raises(ValueError, match="flow"):
        fw.flow_warp(image, flow[:, :1])
    with pytest.raises(ValueError, match="target"):
        fw.photometric_loss(image, flow, target[:, :2])


def test_integer_frames_are_refused():
    """grid_sample refuses an integer image ("not implemented for 'Byte'"); the kernel sampled uint8 frames and
    truncated the result (and the loss of 0-255 frames is 255^2 times that of the [0, 1] frames Eq. (1) reads)."""
    image, flow, target = make()
    as_bytes = (image * 255).to(torch.uint8)
    with pytest.raises(TypeError, match="divide 8-bit frames by 255"):
        fw.flow_warp(as_bytes, flow)
    with pytest.raises(TypeError, match="floating point"):
        fw.photometric_loss(as_bytes, flow, target)
    with pytest.raises(TypeError, match="floating point"):
        fw.photometric_loss(image, flow, (target * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="floating point"):
        fw.flow_warp(image, flow.round().to(torch.int64))


# ---------------------------------------------------------------------------------- edges found untested by mutations

def test_image_gradient_of_a_channels_last_image():
    """The image gradient is written to a contiguous buffer: its offsets are not the (channels-last) image's."""
    image, flow, _ = make(B=2, C=2, H=6, W=7, seed=1, reach=3)
    img_cl = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
    assert not img_cl.is_contiguous()
    g_out = torch.randn(image.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (gi,) = torch.autograd.grad(fw.flow_warp(img_cl, flow), img_cl, g_out)
    img64 = image.double().requires_grad_()
    (ri,) = torch.autograd.grad(fw.flow_warp_reference(img64, flow.double()), img64, g_out.double())
    assert rel(gi, ri) < 1e-5


def test_warp_backward_with_strided_grad_output():
    """grad_output as autograd hands it over: expanded (stride 0) from .sum(), or a channels-last view."""
    image, flow, _ = make(B=2, C=2, H=6, W=7, seed=3, reach=3)
    channels_last = torch.randn(2, 6, 7, 2, generator=torch.Generator().manual_seed(4)).to(DEVICE).permute(0, 3, 1, 2)
    for g in (None, channels_last):
        f1, f2 = flow.clone().requires_grad_(), flow.double().requires_grad_()
        out1, out2 = fw.flow_warp(image, f1), fw.flow_warp_reference(image.double(), f2)
        if g is None:
            out1.sum().backward()
            out2.sum().backward()
        else:
            out1.backward(g)
            out2.backward(g.double())
        assert rel(f1.grad, f2.grad) < 1e-4


def test_channels_last_flow():
    """A channels-last flow has channel stride 1: its y component is read a stride away from x, not H * W."""
    image, flow, target = make(B=2, C=2, H=6, W=7, seed=5, reach=3)
    flow_cl = flow.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert flow_cl.stride(1) == 1
    exact = fw.flow_warp_reference(image.double(), flow.double())
    assert (fw.flow_warp(image, flow_cl).double() - exact).abs().max() < 1e-5
    f1, f2 = flow_cl.clone().requires_grad_(), flow.clone().requires_grad_()
    loss, ref = fw.photometric_loss(image, f1, target), fw.photometric_loss_reference(image, f2, target)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item() and rel(f1.grad, f2.grad) < 1e-4


def test_bf16_image_differences_taken_in_float32():
    """Hand-worked: a bf16 image [1.0078125, 256] (both exact in bf16), flow (0.5, 0) at pixel 0: d out / d x there is
    v01 - v00 = 254.9921875 (exact in float32; bf16 would round it to 255); the fused loss of pixel 0 alone (a mask)
    is val^2 with val = 0.5 * 1.0078125 + 0.5 * 256, its gradient 2 val * 254.9921875."""
    image = torch.tensor([[[[1.0078125, 256.0]]]], dtype=torch.bfloat16, device=DEVICE)
    flow = torch.zeros(1, 2, 1, 2, device=DEVICE)
    flow[:, 0] = 0.5
    flow.requires_grad_()
    (gf,) = torch.autograd.grad(fw.flow_warp(image, flow), flow,
                                torch.tensor([[[[1.0, 0.0]]]], dtype=torch.bfloat16, device=DEVICE))
    assert gf.dtype == torch.float32 and gf[0, 0, 0, 0].item() == 254.9921875
    pixel_0 = torch.tensor([[[[1.0, 0.0]]]], device=DEVICE)
    loss = fw.photometric_loss(image, flow, torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16, device=DEVICE), pixel_0)
    (gl,) = torch.autograd.grad(loss, flow)
    val = 0.5 * 1.0078125 + 0.5 * 256.0
    assert loss.item() == pytest.approx(val ** 2, rel=1e-6)
    assert gl[0, 0, 0, 0].item() == pytest.approx(2 * val * 254.9921875, rel=1e-6)


def test_bf16_mask_count_in_float32():
    """261 ones in a bf16 mask: the count is 261 (a bf16 sum gives 260), as the reference counts in float32."""
    image, flow, target = make(B=1, C=1, H=3, W=87, seed=6, reach=2)
    mask = torch.ones(1, 1, 3, 87, dtype=torch.bfloat16, device=DEVICE)
    assert mask.sum().item() != 261
    f1, f2 = flow.clone().requires_grad_(), flow.clone().requires_grad_()
    loss, ref = fw.photometric_loss(image, f1, target, mask), fw.photometric_loss_reference(image, f2, target, mask)
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    loss.backward()
    ref.backward()
    assert rel(f1.grad, f2.grad) < 1e-4


def test_one_pixel_dimensions_sample_zeros_outside():
    """Hand-worked, a frame one pixel tall [1, 2, 3] (and the same one pixel wide): moved down by 1.5 px every sample is
    outside (0); by 0.5 px, half of it (0.5, 1, 1.5); by -0.25, three quarters. grid_sample with align_corners=True
    maps every coordinate of a one-pixel dimension onto that pixel, so the torch reference pads it with zeros."""
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]], device=DEVICE)
    for v, want in ((1.5, [0.0, 0.0, 0.0]), (0.5, [0.5, 1.0, 1.5]), (-0.25, [0.75, 1.5, 2.25])):
        for image in (row, row.transpose(2, 3)):                         # [1, 1, 1, 3] and [1, 1, 3, 1]
            flow = torch.zeros(1, 2, *image.shape[2:], device=DEVICE)
            flow[:, int(image.shape[2] == 1)] = v                        # across the one-pixel dimension
            for warp in (fw.flow_warp, fw.flow_warp_reference):
                assert warp(image, flow).flatten().tolist() == want, (v, image.shape, warp.__name__)


def test_wide_checks_every_tensor():
    huge = torch.empty(0, device="meta").as_strided((1, 3, 2, 2), (0, 1, 2 ** 31, 1))
    small = torch.empty(1, 3, 2, 2)
    assert fw._wide(small, huge) and fw._wide(small, small, huge) and not fw._wide(small, small)


def test_wide_offsets_on_a_sparse_4gb_plane(tmp_path):
    """A real plane whose offsets pass 2^31 with 32-bit strides (row stride 2^30 + 7, 3 rows), on a sparse file of
    4.3 GB of which 3 pages are written: the 64-bit path reads rows 1 and 2 where they are (test_64_bit_offsets
    compares the two paths on small tensors only). CPU tensors: the kernels through the interpreter."""
    S = 2 ** 30 + 7
    n = 2 * S + 2
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as fh:
        fh.truncate(n * 2)
    assert os.stat(path).st_blocks * 512 < 2 ** 20, "the file system holds no sparse file"
    base = torch.from_file(str(path), shared=True, size=n, dtype=torch.float16)
    image = base.as_strided((1, 1, 3, 2), (0, 0, S, 1))
    want = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float16)
    image[0, 0] = want
    assert fw._wide(image)
    if not fw.INTERPRETED:   # gpu_check's run (TRITON_INTERPRET=0): CPU tensors take the torch path, not the kernels
        pytest.skip("CPU tensors reach the kernels only under TRITON_INTERPRET=1")
    assert fw.use_triton(image, torch.zeros(1, 2, 3, 2, dtype=torch.float16))   # the kernels, not the reference
    zero = torch.zeros(1, 2, 3, 2, dtype=torch.float16)
    assert torch.equal(fw.flow_warp(image, zero)[0, 0], want)
    small = want.reshape(1, 1, 3, 2).clone()                  # the plane as the fused loss's target: warp = target
    assert fw.photometric_loss(small, zero, image).item() == 0
    assert fw.photometric_loss(small, zero, image * 0 + 1).item() > 0


# ---------------------------------------------------------------------------------------------- from a mutation run

@pytest.mark.parametrize("H,W", [(48, 5), (5, 48)])
def test_steps_longer_than_the_other_side_reach_their_pixel(H, W):
    """_corners clamps a flow's whole-pixel step to +-(size + 2) along the step's own axis: on a frame 48 tall and 5
    wide a vertical step of up to 47 rows, far past 5 + 2, lands on the row it points at, and across a frame 5 tall
    and 48 wide a horizontal one on its column. Reference: grid_sample in float64 (align_corners=True, zeros outside)
    on the sample points p + flow, each a random point of the frame with its fraction in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, H, W, generator=g)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    tx = torch.randint(0, W - 1, (2, H, W), generator=g) + 0.1 + 0.8 * torch.rand(2, H, W, generator=g)
    ty = torch.randint(0, H - 1, (2, H, W), generator=g) + 0.1 + 0.8 * torch.rand(2, H, W, generator=g)
    flow = torch.stack([tx - xs, ty - ys], 1)
    assert flow.abs().amax() > max(H, W) - 8
    image, flow = image.to(DEVICE), flow.to(DEVICE)
    assert fw.use_triton(image, flow)
    out = fw.flow_warp(image, flow)
    grid = torch.stack([tx.double() / (W - 1) * 2 - 1, ty.double() / (H - 1) * 2 - 1], -1)
    exact = torch.nn.functional.grid_sample(image.cpu().double(), grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=True)
    assert (out.cpu().double() - exact).abs().max().item() < 1e-5
    target = torch.rand(2, 3, H, W, generator=g).to(DEVICE)           # the fused loss reads through the same corners
    loss = fw.photometric_loss(image, flow, target)
    assert abs(loss.item() - ((exact - target.cpu().double()) ** 2).mean().item()) < 1e-5


def test_a_float64_flow_is_followed_in_float64_on_a_float32_image():
    """flow_warp_reference computes in the widest of the image's dtype, the flow's and float32 (its docstring: float64
    stays float64): a float64 flow on a float32 image 648 wide is sampled where float64 samples it, to the output's
    float32 rounding (6e-8), not at a float32 grid's coordinate (off by about 648 * 6e-8 / 2 px, 2e-5 in value).
    Reference: grid_sample in float64 on the same points."""
    g = torch.Generator().manual_seed(4)
    H, W = 6, 648
    image = torch.rand(1, 3, H, W, generator=g)
    flow = (torch.rand(1, 2, H, W, generator=g, dtype=torch.float64) - 0.5) * 6
    out = fw.flow_warp(image, flow)                                   # a float64 flow: the torch path
    assert out.dtype == torch.float32
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0]) / (W - 1) * 2 - 1, (ys + flow[:, 1]) / (H - 1) * 2 - 1], -1)
    exact = torch.nn.functional.grid_sample(image.double(), grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=True)
    assert (out.double() - exact).abs().max().item() < 1e-6


def test_only_the_flow_gets_a_gradient_on_both_paths():
    """photometric_loss's docstring: only flow gets a gradient, and the result's dtype follows the flow. The kernel
    path (a float32 flow) gave the mask none; the torch reference (a float64 flow) gave a mask that asked for one a
    gradient."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        image, target = torch.rand(2, 3, 5, 7, generator=g), torch.rand(2, 3, 5, 7, generator=g)
        image.requires_grad_(), target.requires_grad_()
        flow = torch.randn(2, 2, 5, 7, generator=g, dtype=dtype).requires_grad_()
        mask = torch.rand(5, 7, generator=g).requires_grad_()
        loss = fw.photometric_loss(image, flow, target, mask)
        assert loss.dtype == dtype
        loss.backward()
        assert flow.grad is not None and image.grad is None and target.grad is None and mask.grad is None


def test_bytes_moved_hand_worked():
    """The benchmark's byte count (its GB/s and % of copy columns, README "Performance"), per pixel: the fused loss
    reads image and target (C channels each) and the flow (2); with backward it writes the flow gradient (2), then
    reads it and writes it times grad_output (2 + 2). 2 frames of 10 x 10, C = 3, float32: 200 * 8 * 4 = 6400 bytes,
    and 200 * 6 * 4 = 4800 more with backward; bfloat16 halves both."""
    assert fw.bytes_moved(2, 3, 10, 10, torch.float32, False) == 6400
    assert fw.bytes_moved(2, 3, 10, 10, torch.float32, True) == 11200
    assert fw.bytes_moved(2, 3, 10, 10, torch.bfloat16, True) == 5600


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the interpreter's numpy: 0/0
def test_an_all_zero_mask_gives_nan():
    """The docstring: an all-zero mask is the mean of nothing, NaN (0/0), on the kernel path and the reference."""
    image, flow, target = make()
    mask = torch.zeros(image.shape[-2:], device=image.device)
    assert fw.photometric_loss(image, flow, target, mask).isnan()
    assert fw.photometric_loss_reference(image, flow, target, mask[None, None]).isnan()
