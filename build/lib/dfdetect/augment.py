"""Training augmentation on whole batches, on the training device.

The original guide's augmentations (horizontal flip, +-10 degree rotation, colour jitter) with a random
draw per image and the same formulas as torchvision v2's RandomHorizontalFlip, RandomRotation and
ColorJitter (brightness, contrast, saturation), but computed for the batch at once and in place: per-image
v2 transforms cost about 17 % of a CPU training step here (see benchmarks/train_throughput.py). Randomness comes from one seeded generator that checkpoints save, so a
resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AugmentParams


# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
LUMA = (0.2989, 0.587, 0.114)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def augment_batch(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> augmented batch, same shape. `gen` is a CPU generator."""
    n, device = images.shape[0], images.device
    # Draw every random number first, always the same count, so the stream does not depend on params.
    flip = torch.rand(n, generator=gen)
    angle = _uniform(gen, n, -params.rotation_degrees, params.rotation_degrees)
    j = params.color_jitter
    factors = [_uniform(gen, n, max(0.0, 1 - j), 1 + j) for _ in range(3)]  # brightness, contrast, saturation
    # One host-to-device copy for all of them: each small copy would stall a GPU pipeline.
    flip, angle, *factors = torch.stack([flip, angle, *factors]).to(device).unbind(0)
    out = images
    if params.hflip:
        out = torch.where((flip < 0.5).view(n, 1, 1, 1), out.flip(-1), out)
    if params.rotation_degrees > 0:
        theta = angle * (math.pi / 180)
        cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
        affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(affine.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if j > 0:
        if out is images:
            out = images.clone()  # the colour steps work in place
        b, c, s = (f.view(n, 1, 1, 1) for f in factors)
        luma = torch.tensor(LUMA, device=device, dtype=out.dtype).view(1, 3, 1, 1)
        out.mul_(b).clamp_(0, 1)  # brightness
        mean_gray = (out.mean(dim=(2, 3), keepdim=True) * luma).sum(1, keepdim=True)
        out.mul_(c).add_((1 - c) * mean_gray).clamp_(0, 1)  # contrast: towards the mean grey
        gray = (out * luma).sum(1, keepdim=True)
        out.mul_(s).add_((1 - s) * gray).clamp_(0, 1)  # saturation: towards the pixel's grey
    return out
