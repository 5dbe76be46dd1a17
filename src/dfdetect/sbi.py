"""Self-blended images (Shiohara & Yamasaki, CVPR 2022): pseudo-fakes made from real faces alone.

A face is blended with a slightly altered copy of itself (colour, sharpness, scale, position) inside a soft,
randomly deformed face mask. The result carries the traces every face swap leaves (a blending boundary,
colour and frequency mismatches) without any identity change, so a detector learns those traces instead of
one generator's fingerprint. With no landmarks, the mask is an ellipse around the face centre of the crop:
`prepare` crops faces centred with a 1.3x margin, and tight crops are centred too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter


def _soft_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse around the centre, deformed by a smooth random warp, with a blurred edge; values in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * (0.5 + rng.uniform(-0.05, 0.05)), w * (0.5 + rng.uniform(-0.05, 0.05))
    ry, rx = h * rng.uniform(0.28, 0.42), w * rng.uniform(0.24, 0.36)
    # a low-frequency displacement of the boundary (the paper's elastic mask deformation)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= wobble**2
    mask = Image.fromarray((inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.03, 0.09) * w))
    return np.asarray(mask, dtype=np.float32) / 255


def _altered_copy(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 'source' face: the same face, with colour, sharpness, scale and position slightly changed."""
    h, w = face.shape[:2]
    img = face.astype(np.float32)
    img = img * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-12, 12, size=3)  # per-channel gain and shift (colour)
    img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    else:
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.uniform(50, 150))))
    scale = rng.uniform(0.94, 1.06)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    img = np.asarray(img.resize((sw, sh), Image.BILINEAR))
    out = np.empty_like(face)
    # centre the rescaled copy, then shift it by a few pixels (crop or edge-pad to the original size)
    dy, dx = (sh - h) // 2 + int(rng.integers(-2, 3)), (sw - w) // 2 + int(rng.integers(-2, 3))
    padded = np.pad(img, ((max(0, -dy), max(0, h + dy - sh)), (max(0, -dx), max(0, w + dx - sw)), (0, 0)), mode="edge")
    out[:] = padded[max(0, dy):max(0, dy) + h, max(0, dx):max(0, dx) + w]
    return out


def self_blend(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A real face (H x W x 3 uint8) -> (its self-blended pseudo-fake, the blending mask H x W in [0, 1])."""
    h, w = face.shape[:2]
    mask = _soft_mask(h, w, rng) * rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])  # blend ratio, mostly full
    source = _altered_copy(face, rng)
    blended = mask[..., None] * source + (1 - mask[..., None]) * face.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8), mask


def sbi_batch(images: torch.Tensor, labels: torch.Tensor, prob: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a random share `prob` of the real images of a uint8 N x 3 x H x W CPU batch into self-blended
    fakes (label 1). Seeded from `gen`, so a resumed run makes the same ones."""
    n = images.shape[0]
    chosen = (torch.rand(n, generator=gen) < prob) & (labels == 0)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    if not chosen.any():
        return images, labels
    rng = np.random.default_rng(seed)
    images, labels = images.clone(), labels.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        fake, _ = self_blend(images[i].permute(1, 2, 0).numpy(), rng)
        images[i] = torch.from_numpy(fake).permute(2, 0, 1)
        labels[i] = 1
    return images, labels
