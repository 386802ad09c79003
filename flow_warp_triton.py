import torch
import torch.nn.functional as F


def flow_warp_reference(image, flow):
    B, C, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device, dtype=flow.dtype),
                            torch.arange(W, device=image.device, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2 / max(W - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(H - 1, 1)) - 1
    return F.grid_sample(image, torch.stack([gx, gy], -1).to(image.dtype), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


def flow_warp(image, flow):
    return flow_warp_reference(image, flow)


def photometric_loss(image, flow, target, mask=None):
    d = (flow_warp_reference(image, flow) - target).float() ** 2
    if mask is None:
        return d.mean()
    m = mask.expand_as(d).float()
    return (d * m).sum() / m.sum()
