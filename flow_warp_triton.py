"""
Bilinear backward warp and the fused photometric loss of Eq. (1), as Triton kernels.

    flow_warp(image [B,C,H,W], flow [B,2,H,W]) -> [B,C,H,W]
        out(p) = image(p + flow(p)), bilinear, zero outside the frame; flow in pixels, channel 0 = x, 1 = y.
        The same as grid_sample(image, grid, align_corners=True, padding_mode="zeros") with grid built from p + flow,
        except along a one-pixel dimension, which grid_sample maps every coordinate onto; here points off it read 0.
    photometric_loss(image, flow, target, mask=None) -> scalar
        mean of (flow_warp(image, flow) - target)^2 over all elements, or over those where mask is 1. Warp, squared
        error, reduction and dL/dflow in one pass: no warped image or residual is written. image and target get no
        gradient (they are data in Eq. (1)).

Layout of this file: the plain torch reference; the Triton kernels; launchers; the autograd Functions and the
public functions that choose a path (Triton on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before this file was imported and still is; the torch reference otherwise, and for frames of 2^31 pixels or more);
a benchmark under __main__.
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton run the torch reference
    triton = None
# triton.jit builds interpreter kernels, which run on CPU tensors, only when TRITON_INTERPRET=1 as they are defined
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, *TRITON_DTYPES)  # masks the kernel reads (bool as its bytes)
BLOCK = 128     # pixels per program
NUM_WARPS = 4   # warps per program


# ----------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------

def flow_warp_reference(image, flow):
    """In float32 at least, as the kernels compute (in a frame 648 wide a bfloat16 grid misplaces samples by up to
    5 px, a float16 one by up to 0.4 px), returned in image's dtype."""
    B, C, H, W = image.shape
    acc = torch.promote_types(torch.promote_types(image.dtype, flow.dtype), torch.float32)  # float64 stays float64
    ys, xs = torch.meshgrid(torch.arange(H, device=flow.device, dtype=acc),
                            torch.arange(W, device=flow.device, dtype=acc), indexing="ij")
    # a dimension of one pixel gets a zero pixel on each side: grid_sample (align_corners=True) would map every
    # coordinate along it onto its one pixel, never outside
    py, px = int(H == 1), int(W == 1)
    # pixel x -> normalized [-1, 1] with align_corners=True: -1 is the centre of pixel 0, +1 that of pixel W-1
    gx = (xs + px + flow[:, 0].to(acc)) * (2 / (W + 2 * px - 1)) - 1
    gy = (ys + py + flow[:, 1].to(acc)) * (2 / (H + 2 * py - 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)                                    # [B, H, W, 2]
    source = F.pad(image.to(acc), (px, px, py, py)) if px or py else image.to(acc)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(image.dtype)


def photometric_loss_reference(image, flow, target, mask=None):
    acc = torch.promote_types(flow.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    sq = (flow_warp_reference(image.detach().to(acc), flow) - target.detach().to(acc)) ** 2
    if mask is None:
        return sq.mean()
    m = mask.detach().expand_as(sq).to(acc)  # data, as the kernel takes it: no gradient
    return (sq * m).sum() / m.sum()


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. One program: BLOCK pixels of one image (axis 0: pixel block, axis 1: image). Each pixel finds
# its four bilinear corners once and loops over the channels. Batch and channel offsets are 64-bit; in-plane
# offsets are 64-bit too when WIDE (an in-plane extent above 2^31 - 1). Pixel numbers are 32-bit: frames of 2^31
# pixels or more take the torch reference (use_triton).
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _corners(flow_ptr, b, offs, H, W, sf_b, sf_c, sf_h, sf_w, WIDE: tl.constexpr):
        inside = offs < H * W
        h = offs // W
        w = offs % W
        if WIDE:
            h = h.to(tl.int64)
            w = w.to(tl.int64)
        f = flow_ptr + b * sf_b + h * sf_h + w * sf_w
        u = tl.load(f, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(f + sf_c, mask=inside, other=0.0).to(tl.float32)
        # sample point (w + u, h + v). The weights come from the flow's own fractional part, which is exact,
        # rather than from w + u rounded to float32; the integer part, clamped to +-(size + 2) so that it cannot
        # overflow (any point beyond reads only zeros either way), moves the pixel index.
        fu = tl.floor(u)
        fv = tl.floor(v)
        ax = u - fu
        ay = v - fv
        x0 = w + tl.minimum(tl.maximum(fu, -W - 2.0), W + 2.0).to(tl.int32)
        y0 = h + tl.minimum(tl.maximum(fv, -H - 2.0), H + 2.0).to(tl.int32)
        vx0 = (x0 >= 0) & (x0 < W)
        vx1 = (x0 + 1 >= 0) & (x0 + 1 < W)
        vy0 = (y0 >= 0) & (y0 < H)
        vy1 = (y0 + 1 >= 0) & (y0 + 1 < H)
        return inside, h, w, x0, y0, ax, ay, inside & vy0 & vx0, inside & vy0 & vx1, inside & vy1 & vx0, inside & vy1 & vx1

    @triton.jit
    def _gather(plane, x0, y0, s_h, s_w, m00, m01, m10, m11):
        p = plane + y0 * s_h + x0 * s_w
        v00 = tl.load(p, mask=m00, other=0.0).to(tl.float32)
        v01 = tl.load(p + s_w, mask=m01, other=0.0).to(tl.float32)
        v10 = tl.load(p + s_h, mask=m10, other=0.0).to(tl.float32)
        v11 = tl.load(p + s_h + s_w, mask=m11, other=0.0).to(tl.float32)
        return v00, v01, v10, v11

    @triton.jit
    def _warp_fwd_kernel(img_ptr, flow_ptr, out_ptr, C, H, W,
                         si_b, si_c, si_h, si_w, sf_b, sf_c, sf_h, sf_w, so_b, so_c, so_h, so_w,
                         BLOCK: tl.constexpr, WIDE: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside, h, w, x0, y0, ax, ay, m00, m01, m10, m11 = _corners(flow_ptr, b, offs, H, W,
                                                                    sf_b, sf_c, sf_h, sf_w, WIDE)
        img = img_ptr + b * si_b                     # channel planes are reached by advancing 64-bit pointers
        out = out_ptr + b * so_b + h * so_h + w * so_w
        for c in range(C):
            v00, v01, v10, v11 = _gather(img, x0, y0, si_h, si_w, m00, m01, m10, m11)
            val = (1 - ay) * ((1 - ax) * v00 + ax * v01) + ay * ((1 - ax) * v10 + ax * v11)
            tl.store(out, val.to(out_ptr.dtype.element_ty), mask=inside)
            img += si_c
            out += so_c

    @triton.jit
    def _warp_bwd_kernel(img_ptr, flow_ptr, gout_ptr, gflow_ptr, gimg_ptr, C, H, W,
                         si_b, si_c, si_h, si_w, sf_b, sf_c, sf_h, sf_w, sg_b, sg_c, sg_h, sg_w,
                         BLOCK: tl.constexpr, WIDE: tl.constexpr, IMAGE_GRAD: tl.constexpr):
        # grad_flow: contiguous fp32 [B, 2, H, W]; grad_image: contiguous fp32 [B, C, H, W], scattered with
        # atomics (a source pixel can feed many output pixels)
        b = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside, h, w, x0, y0, ax, ay, m00, m01, m10, m11 = _corners(flow_ptr, b, offs, H, W,
                                                                    sf_b, sf_c, sf_h, sf_w, WIDE)
        gu = tl.zeros([BLOCK], dtype=tl.float32)
        gv = tl.zeros([BLOCK], dtype=tl.float32)
        img = img_ptr + b * si_b
        gout = gout_ptr + b * sg_b + h * sg_h + w * sg_w
        gimg = gimg_ptr + b * C * H * W + y0 * W + x0
        for c in range(C):
            v00, v01, v10, v11 = _gather(img, x0, y0, si_h, si_w, m00, m01, m10, m11)
            g = tl.load(gout, mask=inside, other=0.0).to(tl.float32)
            gu += g * ((1 - ay) * (v01 - v00) + ay * (v11 - v10))      # d out / d x
            gv += g * ((1 - ax) * (v10 - v00) + ax * (v11 - v01))      # d out / d y
            if IMAGE_GRAD:
                tl.atomic_add(gimg, g * (1 - ax) * (1 - ay), mask=m00)
                tl.atomic_add(gimg + 1, g * ax * (1 - ay), mask=m01)
                tl.atomic_add(gimg + W, g * (1 - ax) * ay, mask=m10)
                tl.atomic_add(gimg + W + 1, g * ax * ay, mask=m11)
            img += si_c
            gout += sg_c
            gimg += H * W
        gf = gflow_ptr + b * 2 * H * W + offs
        tl.store(gf, gu, mask=inside)
        tl.store(gf + H * W, gv, mask=inside)

    @triton.jit
    def _photometric_kernel(img_ptr, flow_ptr, tgt_ptr, mask_ptr, count_ptr, partial_ptr, gflow_ptr, inv_count,
                            C, H, W, si_b, si_c, si_h, si_w, sf_b, sf_c, sf_h, sf_w, st_b, st_c, st_h, st_w,
                            sm_b, sm_c, sm_h, sm_w,
                            BLOCK: tl.constexpr, WIDE: tl.constexpr, HAS_MASK: tl.constexpr,
                            FLOW_GRAD: tl.constexpr):
        # partial[program] = (sum over its pixels and all channels of (warp - target)^2, weighted by the mask) / count,
        # so that the loss is the sum of the partials; grad_flow (contiguous [B, 2, H, W], the flow's dtype) =
        # d loss / d flow, to be scaled by grad_output. count: the element count (inv_count = 1 / count), or with a
        # mask the mask's sum, read from count_ptr (a device scalar: no host synchronization)
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside, h, w, x0, y0, ax, ay, m00, m01, m10, m11 = _corners(flow_ptr, b, offs, H, W,
                                                                    sf_b, sf_c, sf_h, sf_w, WIDE)
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        gu = tl.zeros([BLOCK], dtype=tl.float32)
        gv = tl.zeros([BLOCK], dtype=tl.float32)
        img = img_ptr + b * si_b
        tgt = tgt_ptr + b * st_b + h * st_h + w * st_w
        msk = mask_ptr + b * sm_b + h * sm_h + w * sm_w
        for c in range(C):
            v00, v01, v10, v11 = _gather(img, x0, y0, si_h, si_w, m00, m01, m10, m11)
            val = (1 - ay) * ((1 - ax) * v00 + ax * v01) + ay * ((1 - ax) * v10 + ax * v11)
            r = val - tl.load(tgt, mask=inside, other=0.0).to(tl.float32)
            mr = r * tl.load(msk, mask=inside, other=0.0).to(tl.float32) if HAS_MASK else r   # weight m: m r^2
            sq += mr * r
            if FLOW_GRAD:
                gu += 2 * mr * ((1 - ay) * (v01 - v00) + ay * (v11 - v10))
                gv += 2 * mr * ((1 - ax) * (v10 - v00) + ax * (v11 - v01))
            img += si_c
            tgt += st_c
            msk += sm_c
        scale = 1.0 / tl.load(count_ptr) if HAS_MASK else inv_count
        tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + pid, tl.sum(sq, axis=0) * scale)
        if FLOW_GRAD:
            gf = gflow_ptr + b * 2 * H * W + offs
            tl.store(gf, (gu * scale).to(gflow_ptr.dtype.element_ty), mask=inside)
            tl.store(gf + H * W, (gv * scale).to(gflow_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _wide(*tensors):
    """True when some in-plane offset (h * stride_h + w * stride_w) of an input can pass 2^31 - 1. (The
    gradient buffers are contiguous and indexed by pixel number, batch and channel offsets in 64 bits.)"""
    return any((t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) >= 2 ** 31 - 1
               for t in tensors)


def _check(image, flow, *more):
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"expected image [B,C,H,W] and flow [B,2,H,W], got {tuple(image.shape)} and {tuple(flow.shape)}")
    if not all(t.is_floating_point() for t in (image, flow, *more)):  # uint8 frames were sampled and truncated
        raise TypeError(f"image, flow (and target) must be floating point, got "
                        f"{', '.join(str(t.dtype) for t in (image, flow, *more))}: divide 8-bit frames by 255")
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and flow {tuple(flow.shape)} differ in batch or size")


def _launch_warp_fwd(image, flow):
    B, C, H, W = image.shape
    out = torch.empty_like(image, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(H * W, BLOCK), B)
    _warp_fwd_kernel[grid](image, flow, out, C, H, W, *image.stride(), *flow.stride(), *out.stride(),
                           BLOCK=BLOCK, WIDE=_wide(image, flow, out), num_warps=NUM_WARPS)
    return out


def _launch_warp_bwd(image, flow, grad_out, image_grad):
    B, C, H, W = image.shape
    grad_flow = torch.empty(B, 2, H, W, device=flow.device, dtype=torch.float32)
    grad_image = torch.zeros(B, C, H, W, device=image.device, dtype=torch.float32) if image_grad else grad_flow
    grid = (triton.cdiv(H * W, BLOCK), B)
    _warp_bwd_kernel[grid](image, flow, grad_out, grad_flow, grad_image, C, H, W,
                           *image.stride(), *flow.stride(), *grad_out.stride(),
                           BLOCK=BLOCK, WIDE=_wide(image, flow, grad_out), IMAGE_GRAD=image_grad,
                           num_warps=NUM_WARPS)
    return grad_flow, (grad_image if image_grad else None)


def _launch_photometric(image, flow, target, mask, flow_grad):
    """(loss, d loss / d flow or None): the loss a float32 scalar, the gradient in the flow's dtype."""
    B, C, H, W = image.shape
    n_blocks = triton.cdiv(H * W, BLOCK)
    partial = torch.empty(B * n_blocks, device=image.device, dtype=torch.float32)
    grad_flow = torch.empty(B, 2, H, W, device=flow.device, dtype=flow.dtype) if flow_grad else partial
    m = mask if mask is not None else image  # a placeholder pointer when there is no mask
    count = mask.sum(dtype=torch.float32) if mask is not None else partial  # read by the kernel only with a mask
    _photometric_kernel[(n_blocks, B)](image, flow, target, m, count, partial, grad_flow, 1.0 / image.numel(),
                                       C, H, W, *image.stride(), *flow.stride(), *target.stride(), *m.stride(),
                                       BLOCK=BLOCK, WIDE=_wide(image, flow, target, m),
                                       HAS_MASK=mask is not None, FLOW_GRAD=flow_grad, num_warps=NUM_WARPS)
    return partial.sum(), (grad_flow if flow_grad else None)  # fixed-order sum of per-program partials


# ----------------------------------------------------------------------------------------------------------
# Autograd Functions and the public API
# ----------------------------------------------------------------------------------------------------------

class FlowWarpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, flow):
        ctx.save_for_backward(image, flow)
        return _launch_warp_fwd(image, flow)

    @staticmethod
    def backward(ctx, grad_out):
        image, flow = ctx.saved_tensors
        grad_flow, grad_image = _launch_warp_bwd(image, flow, grad_out, ctx.needs_input_grad[0])
        return (None if grad_image is None else grad_image.to(image.dtype)), grad_flow.to(flow.dtype)


class PhotometricLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, flow, target, mask):
        loss, grad_flow = _launch_photometric(image, flow, target, mask, flow_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_flow)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_flow,) = ctx.saved_tensors
        return None, grad_flow * grad_loss.to(grad_flow.dtype), None, None


def use_triton(*tensors):
    """Triton on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1 when this file was
    imported, and still set: the tests unset it to take the torch path); fp32/fp16/bf16, frames below 2^31 pixels."""
    if triton is None or any(t.dtype not in TRITON_DTYPES or t.shape[-2:].numel() >= 2 ** 31 for t in tensors):
        return False
    if any(t.numel() == 0 for t in tensors):  # nothing to launch; the reference gives the mean of nothing, NaN
        return False
    return all(t.is_cuda for t in tensors) or (INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")


def flow_warp(image, flow):
    """image [B,C,H,W], flow [B,2,H,W] in pixels (x, y) -> image sampled at p + flow(p), zeros outside."""
    _check(image, flow)
    if use_triton(image, flow):
        return FlowWarpFunction.apply(image, flow)
    return flow_warp_reference(image, flow)


def photometric_loss(image, flow, target, mask=None):
    """Eq. (1): mean of (flow_warp(image, flow) - target)^2 over all elements, or over those where mask (0/1: [H,W]
    for every image and channel, or 4-D broadcastable to [B,C,H,W], e.g. [B,1,H,W]) is 1; a mask of other weights
    gives the mean weighted by them (an all-zero mask: NaN, the mean of nothing).
    A float32 scalar (float64 for a float64 flow, which takes the torch reference; float64 frames with a float32
    flow are computed in float32); only flow gets a gradient."""
    _check(image, flow, target)
    if target.shape != image.shape:
        raise ValueError(f"target {tuple(target.shape)} must have the image's shape {tuple(image.shape)}")
    if mask is not None:
        if mask.dim() == 2:  # one [H, W] mask for every image and channel: unambiguous
            mask = mask[None, None]
        if mask.dim() != 4:  # a [B, H, W] mask would broadcast as [C, H, W] where B == C (B*(T-1) = 3 for T = 4)
            raise ValueError(f"mask {tuple(mask.shape)} must be [H, W] or 4-D, [B or 1, 1 or C, H, W], for image "
                             f"{tuple(image.shape)}")
        mask = mask.expand(image.shape)  # a view: a [B,1,H,W] mask is read with channel stride 0
    if use_triton(image, flow, target) and (mask is None or mask.dtype in MASK_DTYPES):
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # any mask dtype is read as a number; bool as its bytes
        return PhotometricLossFunction.apply(image.detach(), flow, target.detach(), mask)
    return photometric_loss_reference(image, flow, target, mask)


# ----------------------------------------------------------------------------------------------------------
# Benchmark: python flow_warp_triton.py  (CUDA GPU)
# ----------------------------------------------------------------------------------------------------------

def bytes_moved(B, C, H, W, dtype, backward):
    """What the fused loss must move: read image, target (C channels) and flow (2); with backward, write the flow
    gradient once, then read it and write it times grad_output (2 channels each, all in the inputs' dtype)."""
    e = torch.empty(0, dtype=dtype).element_size()
    n = B * H * W
    return n * (2 * C + 2) * e + (n * 2 * 3 * e if backward else 0)


def benchmark(clips=8, frames=3, H=360, W=648):
    """Eager grid_sample + mse_loss (in float32, as the kernel computes), the same under torch.compile, and the fused
    kernel, forward and forward + backward, fp32 and bf16 inputs, on clips x frames random images and flows of std
    8 px. Timed by do_bench (CUDA events around each call, the L2 cache flushed before it: the host's launch and
    autograd work counts wherever the GPU waits for it) and, eager and fused, by do_bench_cudagraph (the calls
    replayed back to back as one CUDA graph: no host work, no L2 flush); medians. A CUDA graph that fails is a
    "FAILED: ..." row, the others measured. Returns (copy GB/s, rows)."""
    from triton.testing import do_bench, do_bench_cudagraph
    dev = "cuda"
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    copy_gbs = 2 * big.numel() / do_bench(lambda: big.clone(), return_mode="median") / 1e6
    del big
    B = clips * frames
    eager = lambda i, f, t: F.mse_loss(flow_warp_reference(i.float(), f), t.float())
    compiled = torch.compile(eager)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=dev).manual_seed(0)
        image = torch.rand(B, 3, H, W, device=dev, generator=g).to(dtype)
        target = torch.rand(B, 3, H, W, device=dev, generator=g).to(dtype)
        flow = (8 * torch.randn(B, 2, H, W, device=dev, generator=g)).to(dtype)
        for backward in (False, True):
            fl = flow.clone().requires_grad_(backward)

            def step(fn):
                def run():
                    loss = fn(image, fl, target)
                    if backward:
                        loss.backward()
                        fl.grad = None
                return run
            nbytes = bytes_moved(B, 3, H, W, dtype, backward)
            times = {(name, "do_bench"): do_bench(step(fn), return_mode="median") for name, fn in
                     (("eager torch", eager), ("torch.compile", compiled), ("fused triton", photometric_loss))}
            for name, fn in (("eager torch", eager), ("fused triton", photometric_loss)):
                try:
                    times[name, "CUDA graph"] = do_bench_cudagraph(step(fn), return_mode="median")
                except Exception as e:  # a capture that fails (never run on a GPU yet) keeps the rows measured
                    times[name, "CUDA graph"] = f"FAILED: {type(e).__name__}: {(str(e) or ' ').splitlines()[0]}"
            for (name, timing), ms in times.items():
                row = {"dtype": str(dtype)[6:], "pass": "fwd+bwd" if backward else "fwd", "method": name,
                       "timing": timing, "ms": ms}
                if not isinstance(ms, str):
                    base = times["eager torch", timing]
                    row.update({"GB/s": nbytes / ms / 1e6, "% copy": 100 * nbytes / ms / 1e6 / copy_gbs,
                                "speed-up": base / ms if not isinstance(base, str) else ""})
                rows.append(row)
    return copy_gbs, rows


if __name__ == "__main__":
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("the benchmark needs a CUDA GPU and triton (the tests cover the CPU, through the interpreter)")
    copy_gbs, rows = benchmark()
    print(f"device: {torch.cuda.get_device_name()}, device-to-device copy: {copy_gbs:.0f} GB/s (1 GiB clone)")
    print("8 x 3 frames of 360x648, C=3; medians of triton.testing.do_bench and do_bench_cudagraph")
    print(f"{'dtype':9} {'pass':8} {'method':14} {'timing':11} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'speed-up':>9}")
    for r in rows:
        line = f"{r['dtype']:9} {r['pass']:8} {r['method']:14} {r['timing']:11} "
        if isinstance(r["ms"], str):
            print(line + r["ms"])
            continue
        speed_up = f"{r['speed-up']:8.2f}x" if r["speed-up"] != "" else ""
        print(line + f"{r['ms']:8.3f} {r['GB/s']:7.0f} {r['% copy']:6.0f}% {speed_up}")
