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
from .preprocessing import luma


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def augment_batch(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> augmented batch, same shape. `gen` is a CPU generator."""
    return augment_with_masks(images, None, params, gen)[0]


def augment_with_masks(
    images: torch.Tensor, masks: torch.Tensor | None, params: AugmentParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """augment_batch, and N x H x W `masks` (the self-blends' blending masks) moved by the same flips, rotations,
    zooms and stretches as their images, and cleared under the rectangles cutout greys out; the same random
    draws as without masks."""
    n, device = images.shape[0], images.device
    # Draw every random number first, always the same count, so the stream does not depend on params (zoom and
    # stretch, below, draw only when set: recipes without them keep the stream they were measured with).
    flip = torch.rand(n, generator=gen)
    angle = _uniform(gen, n, -params.rotation_degrees, params.rotation_degrees)
    j = params.color_jitter
    factors = [_uniform(gen, n, max(0.0, 1 - j), 1 + j) for _ in range(3)]  # brightness, contrast, saturation
    reshaped = (params.scale, params.aspect) != ((1.0, 1.0), (1.0, 1.0))
    ones = torch.ones(n)
    zoom, stretch = (
        (_log_uniform(gen, n, *params.scale), _log_uniform(gen, n, *params.aspect)) if reshaped else (ones, ones)
    )
    # One host-to-device copy for all of them: each small copy would stall a GPU pipeline.
    flip, angle, zoom, stretch, *factors = torch.stack([flip, angle, zoom, stretch, *factors]).to(device).unbind(0)
    out = images if masks is None else torch.cat([images, masks.unsqueeze(1).to(images)], 1)  # a 4th channel
    if params.hflip:
        out = torch.where((flip < 0.5).view(n, 1, 1, 1), out.flip(-1), out)
    if params.rotation_degrees > 0 or reshaped:
        out = _rotate_and_reshape(out, angle * (math.pi / 180), zoom, stretch)
    if masks is not None:
        out, masks = out[:, :3].contiguous(), out[:, 3]
    out = match_sharpness(out, params.sharpness_match_prob, gen)
    out = degrade(out, params, gen)
    if j > 0:
        if out is images:
            out = images.clone()  # the colour steps work in place
        b, c, s = (f.view(n, 1, 1, 1) for f in factors)
        out.mul_(b).clamp_(0, 1)  # brightness
        mean_gray = luma(out.mean(dim=(2, 3), keepdim=True)).unsqueeze(1)
        out.mul_(c).add_((1 - c) * mean_gray).clamp_(0, 1)  # contrast: towards the mean grey
        gray = luma(out).unsqueeze(1)
        out.mul_(s).add_((1 - s) * gray).clamp_(0, 1)  # saturation: towards the pixel's grey
    out = to_grey(out, params.grayscale_prob, gen)
    if masks is None:
        return erase(out, params, gen), None
    box = erased_boxes(out, params, gen)  # a seam under a grey box is no longer there to be seen
    return (out, masks) if box is None else (out.masked_fill(box.unsqueeze(1), 0.5), masks.masked_fill(box, 0))


def _log_uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """Factors whose logarithm is uniform: a zoom of 0.8 is as likely as one of 1.25."""
    return _uniform(gen, n, math.log(low), math.log(high)).exp()


def _rotate_and_reshape(images: torch.Tensor, theta: torch.Tensor, zoom: torch.Tensor, stretch: torch.Tensor):
    """Each image rotated by theta (radians), zoomed by `zoom` and stretched to `stretch` times its width over
    height (area kept), about its centre; what falls outside is black, as in torchvision's rotation."""
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    # affine_grid maps output to input coordinates: the inverse of the zoom and stretch, after the rotation
    x_scale, y_scale = 1 / (zoom * stretch.sqrt()), stretch.sqrt() / zoom
    row_x = torch.stack([cos * x_scale, -sin * x_scale, zero], 1)
    row_y = torch.stack([sin * y_scale, cos * y_scale, zero], 1)
    grid = F.affine_grid(torch.stack([row_x, row_y], 1).to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_grey(images: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """A `prob` share of the batch in grey (luma in all three channels), as torchvision's RandomGrayscale.
    A model trained on one source's colours reads another source's white balance or chroma compression as a
    label (README "Generalisation"); grey images make it find evidence in luminance too."""
    if prob <= 0:
        return images  # no draws when off: recipes measured before this existed draw the same numbers
    n = images.shape[0]
    on = (torch.rand(n, generator=gen) < prob).to(images.device).view(n, 1, 1, 1)
    return torch.where(on, luma(images).unsqueeze(1).expand_as(images), images)


def erase(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Cutout: grey out one random rectangle (area and aspect ratio drawn as torchvision's RandomErasing
    does) in a random share of a float N x 3 x H x W batch in [0, 1]."""
    box = erased_boxes(images, params, gen)
    return images if box is None else images.masked_fill(box.unsqueeze(1), 0.5)


def erased_boxes(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor | None:
    """The N x H x W rectangles that `erase` greys out (on the images' device), or None when none is."""
    n, _, h, w = images.shape
    draws = torch.rand(5, n, generator=gen)  # always drawn, so the stream does not depend on params
    if params.erase_prob <= 0 or not (on := draws[0] < params.erase_prob).any():
        return None
    low, high = params.erase_area
    area = (low + draws[1] * (high - low)) * h * w
    aspect = torch.exp(math.log(0.3) + draws[2] * (math.log(1 / 0.3) - math.log(0.3)))
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top, left = (draws[3] * (h - eh + 1)).floor(), (draws[4] * (w - ew + 1)).floor()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
        & on.view(n, 1, 1)
    )
    return box.to(images.device)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """N x (2r+1) normalised 1-D Gaussians; sigma 0 gives the identity (a delta)."""
    x = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (x / sigma.clamp_min(1e-6).unsqueeze(1)) ** 2)
    return k / k.sum(1, keepdim=True)


def _separable_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image of a float N x C x H x W batch blurred with its own Gaussian (sigma 0: unchanged). One
    grouped convolution per axis: much faster on a CPU than a batched single-kernel one."""
    n, c, h, w = images.shape
    kernels = _gaussian_kernels(sigma, radius).to(images.device, images.dtype)
    weight = kernels.repeat_interleave(c, 0)  # one kernel per image, for each of its channels
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _grey_sharpness(grey: torch.Tensor) -> torch.Tensor:
    h, w = grey.shape[-2:]
    grey = grey[:, h // 4 : h - h // 4, w // 4 : w - w // 4] * 255
    lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    return torch.log1p(lap.flatten(1).var(1))


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Per image of a float N x 3 x H x W batch in [0, 1]: log(1 + variance of the 4-neighbour Laplacian) of
    the grey centre half on the 0-255 scale (the measure of benchmarks/shortcuts.py)."""
    return _grey_sharpness(luma(images))


# The ladder match_sharpness chooses from: Gaussian blurs (sigma, pixels) and unsharp masks (amount x the
# detail a sigma-1 blur removes). Wide enough to move a 128 px face crop by about +-2 in sharpness.
_BLUR_SIGMAS = (0.4, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)
_SHARPEN_AMOUNTS = (0.3, 0.6, 1.0, 1.5, 2.2, 3.0)


def _blur_grey(grey: torch.Tensor, sigma: float) -> torch.Tensor:
    n = grey.shape[0]
    blurred = _separable_blur(
        grey.unsqueeze(1), torch.full((n,), sigma, device=grey.device), max(1, math.ceil(3 * sigma))
    )
    return blurred.squeeze(1)


def match_sharpness(images: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Take sharpness away as a label cue: a `prob` share of the batch is blurred or sharpened towards the
    sharpness of another image of the same batch, drawn at random. The targets then follow the batch's own
    mixture of both classes, whatever each image's label, so "blurrier means fake" (true of one set's swaps,
    false of another's: README "Generalisation") no longer pays. Each image takes the step of a fixed ladder
    (or none) whose sharpness lands nearest its target; the ladder is measured on the grey image alone (grey
    is linear in RGB, so it blurs and sharpens alike) and only the chosen step is applied in colour."""
    if prob <= 0:
        # No draws when off, so recipes measured before this existed draw the same augmentations as then.
        return images
    n, device = images.shape[0], images.device
    on = (torch.rand(n, generator=gen) < prob).to(device)
    grey = luma(images)
    target = _grey_sharpness(grey)[torch.randperm(n, generator=gen).to(device)]
    smooth = _blur_grey(grey, 1.0)
    ladder = [grey] + [_blur_grey(grey, s) for s in _BLUR_SIGMAS]
    ladder += [grey + a * (grey - smooth) for a in _SHARPEN_AMOUNTS]
    best = torch.where(on, (torch.stack([_grey_sharpness(g) for g in ladder]) - target).abs().argmin(0), 0)
    sigmas = torch.tensor((0.0, *_BLUR_SIGMAS, *[0.0] * len(_SHARPEN_AMOUNTS)), device=device)[best]
    amounts = torch.tensor((0.0, *[0.0] * len(_BLUR_SIGMAS), *_SHARPEN_AMOUNTS), device=device)[best]
    out = images
    if (sigmas > 0).any():
        out = _separable_blur(out, sigmas, max(1, math.ceil(3 * max(_BLUR_SIGMAS))))
    if (amounts > 0).any():
        detail = out - _separable_blur(out, (amounts > 0).to(out.dtype), 3)
        out = (out + detail * amounts.view(n, 1, 1, 1).to(out.dtype)).clamp(0, 1)
    return out


def degrade(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Blur or sharpen, downscale-and-back and noise on a random share of the batch (float N x 3 x H x W in
    [0, 1]). Sharpening is blur's mirror: an image is blurred or sharpened, never both, so that how sharp a
    face looks carries no label (a face swap is often blurrier than its frame, an enhanced one sharper)."""
    n, _, h, w = images.shape
    draws = torch.rand(8, n, generator=gen)  # always drawn, so the stream does not depend on params
    blur_on, sigma = draws[0] < params.blur_prob, draws[1] * params.blur_sigma
    down_on, factor = draws[2] < params.downscale_prob, params.downscale_min + draws[3] * (1 - params.downscale_min)
    noise_on, std = draws[4] < params.noise_prob, draws[5] * params.noise_std
    sharpen_on = (draws[6] < params.sharpen_prob) & ~blur_on
    amount = draws[7] * params.sharpen_amount
    out = images
    if blur_on.any():
        out = _separable_blur(out, torch.where(blur_on, sigma, 0.0), max(1, math.ceil(3 * params.blur_sigma)))
    if sharpen_on.any():
        # unsharp mask: add back `amount` x the detail a sigma-1 blur removes
        detail = out - _separable_blur(out, torch.where(sharpen_on, 1.0, 0.0), 3)
        out = (out + detail * (amount * sharpen_on).view(n, 1, 1, 1).to(out.device, out.dtype)).clamp(0, 1)
    if down_on.any():
        out = out.clone() if out is images else out
        for i in torch.nonzero(down_on).flatten().tolist():
            small = F.interpolate(
                out[i : i + 1],
                size=(max(1, round(h * float(factor[i]))), max(1, round(w * float(factor[i])))),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            out[i : i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if params.noise_prob > 0:
        noise = torch.randn(n, 3, h, w, generator=gen) * (std * noise_on).view(n, 1, 1, 1)
        out = (out + noise.to(out.device, out.dtype)).clamp(0, 1)
    return out


def recompress(images: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """JPEG re-compression at a random quality for a random share of a uint8 N x 3 x H x W CPU batch
    (before it goes to the device: JPEG is a CPU codec). With `params.jpeg_scale` other than [1, 1] each is
    compressed at a random size and resized back, as a photograph is compressed at its own resolution and then
    resized by the face crop: its 8 x 8 blocks reach the model magnified or shrunk, never on the model's grid."""
    import io

    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    chosen, quality = torch.rand(n, generator=gen) < params.jpeg_prob, torch.rand(n, generator=gen)
    low_scale, high_scale = params.jpeg_scale
    rescaled = (low_scale, high_scale) != (1.0, 1.0)
    # drawn only when asked for, so that the recipes measured before this option draw the same numbers
    scale = _uniform(gen, n, low_scale, high_scale) if rescaled else torch.ones(n)
    if not chosen.any():
        return images
    low, high = params.jpeg_quality
    out = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        size = (max(8, round(w * float(scale[i]))), max(8, round(h * float(scale[i]))))
        if size != (w, h):
            pil = pil.resize(size, Image.Resampling.BICUBIC)  # antialiased when shrinking
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(low + quality[i] * (high - low)))
        decoded = Image.open(buf).convert("RGB")
        if decoded.size != (w, h):
            decoded = decoded.resize((w, h), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.array(decoded)).permute(2, 0, 1)
    return out
