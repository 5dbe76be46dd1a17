"""MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021) as a training-only regulariser.

The channel-wise mean and standard deviation of an early feature map describe an image's "style": its camera,
colour, compression and resize chain, which is what differs between the sources of face sets. During training,
each image of a batch chosen by chance gets a mix of its own statistics and those of another image of the batch;
the normalised map (local structure such as a blending boundary) is kept. A model that cannot rely on style must
rely on structure, which is what transfers to other sources. Nothing changes at inference: the hooks act in
training mode only and are removed after each epoch, so no saved or exported model carries them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import MixStyleParams


class MixStyleError(ValueError):
    """train.mixstyle names layers this model does not have."""


class _MixStyleHook:
    """A forward hook that mixes the output's per-channel statistics between images of the batch."""

    def __init__(self, prob: float, alpha: float, eps: float = 1e-6):
        self.prob, self.eps = prob, eps
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise MixStyleError(
                f"train.mixstyle.layers: a matched {type(module).__name__} gives no N x C x H x W feature map "
                "(MixStyle mixes the per-channel statistics of convolutional features)"
            )
        n = output.shape[0]
        if not module.training or n < 2 or float(torch.rand(())) >= self.prob:
            return output
        x = output.float()  # statistics in fp32 also under bf16/fp16 autocast
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        std = (x.var(dim=(2, 3), keepdim=True, correction=0) + self.eps).sqrt().detach()  # 1 x 1 maps: no NaN
        weight = self.beta.sample((n, 1, 1, 1)).to(x.device)
        other = torch.randperm(n).to(x.device)
        mixed_mean = weight * mean + (1 - weight) * mean[other]
        mixed_std = weight * std + (1 - weight) * std[other]
        return ((x - mean) / std * mixed_std + mixed_mean).to(output.dtype)


def mixstyle_layers(model: nn.Module, params: MixStyleParams) -> list[str]:
    """The names of the modules whose outputs are mixed (none at probability 0); resolved once, before
    training, so a pattern that matches nothing fails before any work, naming the field."""
    if params.prob <= 0:
        return []
    names = [name for name, _ in model.named_modules() if name and re.search(params.layers, name)]
    if not names:
        some = [name for name, _ in model.named_modules() if name][:6]
        raise MixStyleError(
            f"train.mixstyle.layers={params.layers!r} matches no module of this model; its module names include "
            + ", ".join(some)
        )
    return names


@contextmanager
def mixing_style(model: nn.Module, layers: list[str], params: MixStyleParams) -> Iterator[None]:
    """Mix styles at the named `layers` (from mixstyle_layers) while the block runs (training steps); no
    layers attach nothing."""
    modules = dict(model.named_modules())
    hook = _MixStyleHook(params.prob, params.alpha)
    handles = [modules[name].register_forward_hook(hook) for name in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
