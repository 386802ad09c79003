"""flow_warp_triton.py: the Triton kernels against grid_sample + mse_loss and their autograd. On CPU tensors through
TRITON_INTERPRET=1 (set in conftest.py before triton is imported); compiled, on a CUDA GPU when one is present and
TRITON_INTERPRET=0 is set (tests/gpu_check.py runs them so).

Sample points are kept off exact pixel borders: at an integer sample coordinate bilinear interpolation is not
differentiable and the two implementations may take different one-sided derivatives (the reference's coordinate
also takes a round trip through [-1, 1]), so every flow here has its fractional part in [0.1, 0.9]."""
import os

import pytest
import torch

import flow_warp_triton as fw

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


@pytest.mark.parametrize("C,H,W,B,reach", [(3, 37, 53, 2, 6), (1, 37, 53, 3, 6), (3, 8, 300, 1, 6), (2, 9, 14, 2, 40)])
def test_warp_forward_and_backward_match_grid_sample(C, H, W, B, reach):
    """The last case: flows up to 40 px on a 9x14 frame, beyond the clamp of the whole-pixel step to +-(size + 2)."""
    image, flow, _ = make(B, C, H, W, seed=C + H, reach=reach)
    image.requires_grad_()
    flow.requires_grad_()
    out = fw.flow_warp(image, flow)
    ref = fw.flow_warp_reference(image, flow)
    # the forward against grid_sample in float64 on the same inputs: in float32 grid_sample's own coordinate
    # round trip through [-1, 1] costs about W * 4e-8 px (1.1e-5 in value at W = 300)
    exact = fw.flow_warp_reference(image.detach().double(), flow.detach().double())
    assert (out.double() - exact).abs().max().item() < 1e-5
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
    the rounding of the output to the input dtype."""
    image, flow, target = make(seed=7, dtype=dtype)
    out = fw.flow_warp(image, flow)
    assert out.dtype == dtype
    assert (out.float() - fw.flow_warp_reference(image.float(), flow.float())).abs().max() < 1e-2
    f = flow.clone().requires_grad_()
    loss = fw.photometric_loss(image, f, target)
    loss.backward()
    f32 = flow.float().requires_grad_()
    ref = fw.photometric_loss_reference(image.float(), f32, target.float())
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()   # fp32 accumulation: no half rounding in the loss
    assert f.grad.dtype == dtype and rel(f.grad, f32.grad) < 1e-2


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
    assert torch.autograd.gradcheck(fw.flow_warp, (img, flow))


def test_bad_shapes_fail_clearly():
    image, flow, target = make()
    with pytest.raises(ValueError, match="flow"):
        fw.flow_warp(image, flow[:, :1])
    with pytest.raises(ValueError, match="target"):
        fw.photometric_loss(image, flow, target[:, :2])
