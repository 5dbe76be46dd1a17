"""Blending-boundary supervision (Face X-ray: Li et al., CVPR 2020), for training with self-blended images.

A face swap pastes one face into another frame; whatever the swap tool, the pasted region meets the frame along a
boundary. A self-blend (dfdetect.sbi) knows exactly where its boundary is: B = 4 M (1 - M) of its soft blending
mask M, 1 at the middle of the feathered edge and 0 inside and outside. Besides the real/fake label, a small head
on one of the network's intermediate feature maps learns to draw that boundary (a real face has none), so the
features must see the seam itself, not only what one generator's fakes look like. The head is training's alone:
it is not part of the model that is checkpointed as the detector, exported or served. Images whose boundary is
unknown (the known fakes of a data set) add nothing to this loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class BoundaryError(ValueError):
    """train.sbi.boundary_layer names no module of the model, several, or one whose output is no feature map."""


def boundary_map(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x H x W blending masks in [0, 1] -> N x h x w boundary targets in [0, 1] at the feature map's `size`
    (averaged over each cell: a boundary thinner than a cell still shows)."""
    boundary = 4 * masks * (1 - masks)
    return F.adaptive_avg_pool2d(boundary.unsqueeze(1), size).squeeze(1).clamp(0, 1)


def boundary_layer(model: nn.Module, pattern: str) -> str:
    """The name of the one module whose output the head reads; resolved before training, so a pattern that
    matches no module, or several, fails before any work, naming the field."""
    names = [name for name, _ in model.named_modules() if name and re.search(pattern, name)]
    if len(names) != 1:
        some = [name for name, _ in model.named_modules() if name][:6]
        found = f"matches {len(names)} modules ({', '.join(names[:4])})" if names else "matches no module"
        raise BoundaryError(
            f"train.sbi.boundary_layer={pattern!r} {found}; it must name exactly one; module names include "
            + ", ".join(some)
        )
    return names[0]


class BoundaryHead(nn.Module):
    """A 1 x 1 convolution scoring each position of the tapped feature map for "on a blending boundary". It
    is deliberately weak: the boundary must be readable from the backbone's features themselves."""

    def __init__(self, channels: int, prior: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)
        # Starts as the constant guess "a tenth of each map is seam": a random start on features of large
        # magnitude scores every position confidently, and its first, large gradients would only unlearn that
        # (through the backbone too).
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, math.log(prior / (1 - prior)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features.float()).squeeze(1)


class BoundaryTap:
    """Keeps the latest output of the named module while attached (a forward hook); `close` removes it."""

    def __init__(self, model: nn.Module, name: str):
        self.features: torch.Tensor | None = None
        self._handle = dict(model.named_modules())[name].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.features = output

    def close(self) -> None:
        self._handle.remove()


def tapped_channels(model: nn.Module, name: str, image_size: int, device: torch.device) -> int:
    """The channel count of the named module's output, found by one forward pass of a blank image (in eval
    mode, so no running statistics move); an output that is no feature map fails before any work."""
    tap = BoundaryTap(model, name)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        tap.close()
    if not isinstance(tap.features, torch.Tensor) or tap.features.dim() != 4:
        shape = tuple(tap.features.shape) if isinstance(tap.features, torch.Tensor) else type(tap.features).__name__
        raise BoundaryError(
            f"train.sbi.boundary_layer names {name}, whose output is {shape}: the boundary head needs a feature "
            "map (N x C x H x W); name a convolutional block"
        )
    return int(tap.features.shape[1])


def boundary_loss(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the head's N x h x w logits and the boundary of each image's mask, over
    the images whose mask is `known` (reals: no boundary; self-blends: theirs); 0 when none is."""
    if not known.any():
        return logits.sum() * 0.0  # keeps the graph: every parameter still gets a (zero) gradient
    target = boundary_map(masks[known].to(logits), logits.shape[-2:])
    return F.binary_cross_entropy_with_logits(logits[known], target)


class BoundarySupervision:
    """One run's boundary supervision: the layer read, the head (`net`: wrapped by the trainer when
    distributed) and the loss's weight. `attached` taps the model for the training steps alone, so validation,
    checkpoints and the shipped model never carry the hook."""

    def __init__(self, model: nn.Module, pattern: str, weight: float, image_size: int, device: torch.device):
        self.layer = boundary_layer(model, pattern)
        self.weight = weight
        self.head = BoundaryHead(tapped_channels(model, self.layer, image_size, device)).to(device)
        self.net: nn.Module = self.head
        self._tap: BoundaryTap | None = None
        self._sum, self._steps = 0.0, 0  # the unweighted loss over the epoch's steps, for its history row

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        self._tap = BoundaryTap(model, self.layer)
        try:
            yield
        finally:
            self._tap.close()
            self._tap = None

    @property
    def features(self) -> torch.Tensor | None:
        """The tapped layer's output of the last forward pass while attached (None when detached)."""
        return self._tap.features if self._tap else None

    def loss(self, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """The weighted boundary loss of the last forward pass's first len(masks) images (with consistency's
        second view in the same batch, the first view's)."""
        features = self._tap.features[: len(masks)]
        loss = boundary_loss(self.net(features), masks, known.to(features.device))
        self._sum, self._steps = self._sum + loss.detach(), self._steps + 1  # a tensor: no device sync per step
        return self.weight * loss

    def epoch_loss(self) -> float:
        """The mean unweighted boundary loss of the steps since the last call (NaN for none); starts afresh."""
        mean = float(self._sum) / self._steps if self._steps else float("nan")
        self._sum, self._steps = 0.0, 0
        return mean
