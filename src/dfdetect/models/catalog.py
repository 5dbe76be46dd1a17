"""The model registry: adding an architecture is one decorated class or function.

Every model maps an N x 3 x H x W normalised batch to N logits of "fake" (label 1); `create_model` wraps
it in `Detector`, which flattens the output. Constructors only
build the architecture; ImageNet weights are loaded afterwards, from a local file, by `create_model`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelParams
from .residual import ResidualBranch


class ModelError(ValueError):
    """An unknown architecture or unusable weights."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(dropout=...) -> module with a 1-logit head
    imagenet_weights: object | None = None  # a torchvision WeightsEnum, when ImageNet weights exist
    packaged_weights: Callable[[], Path] | None = None  # ImageNet weights inside an installed package


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, imagenet_weights=None, packaged_weights=None):
    def decorator(builder):
        if name in _MODELS:
            raise ModelError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelSpec(name, builder, imagenet_weights, packaged_weights)
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ModelError(f"model.name: unknown model {name!r}; available: {available_models()}") from None


def imagenet_weights_file(spec: ModelSpec, weights_path: str | None) -> Path:
    """Where the ImageNet weights must be: the user's file, else torchvision's file in the torch hub cache."""
    if spec.imagenet_weights is None and spec.packaged_weights is None:
        raise ModelError(f"model {spec.name!r} has no ImageNet weights; set model.pretrained: false")
    if weights_path:
        path = Path(weights_path)
    elif spec.packaged_weights is not None:
        try:
            path = spec.packaged_weights()
        except FileNotFoundError as exc:
            raise ModelError(
                f"ImageNet weights for {spec.name!r}: {exc}; set model.weights_path or install it"
            ) from None
    else:
        filename = spec.imagenet_weights.url.rsplit("/", 1)[-1]
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise ModelError(
            f"ImageNet weights for {spec.name!r} not found at {path}. Nothing is downloaded at run time: "
            f"fetch {spec.imagenet_weights.url} and put it there, or set model.weights_path to the file."
        )
    return path


def load_matching(model: nn.Module, state: dict, source: str) -> None:
    """Load every tensor whose name and shape match (the classification head differs by design). At least 90 %
    of the model's tensors must match, not counting a head the model names as its own (`new_heads`: prefixes of
    tensors no ImageNet file has, such as a patch head that is larger than the backbone it keeps)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    expected = [k for k in own if not k.startswith(tuple(getattr(model, "new_heads", ())))]
    if len(usable) < 0.9 * len(expected):
        raise ModelError(f"{source}: only {len(usable)} of {len(expected)} tensors match this model; wrong file?")
    model.load_state_dict(usable, strict=False)


# The calibration buffers of a Detector at their neutral values (it serves (logit - shift) / temperature): what a
# model has before calibration, and what a checkpoint or pickle from before a buffer existed is read with.
NEUTRAL_CALIBRATION = {"temperature": 1.0, "logit_shift": 0.0}


class Detector(nn.Module):
    """Wraps any registered network so that every model returns a flat vector of N logits, less the shift and
    divided by the temperature fitted on validation (0 and 1 until then): calibration travels inside the
    weights, so every path (checkpoint, MLflow model, ONNX, serving) serves the same calibrated probabilities.
    With several `scales`, scoring averages the logits of the input at each downscaling factor (one forward
    per factor)."""

    def __init__(self, net: nn.Module, branch: nn.Module | None = None, scales: tuple[int, ...] = (1,)):
        super().__init__()
        self.net = net
        self.branch = branch  # optional second opinion whose logit is added (model.residual_branch)
        self.scales = tuple(scales)  # model.scales: downscaling factors of the input, same weights for each
        for name, value in NEUTRAL_CALIBRATION.items():  # logit_shift: Platt's offset, a training prior unlike val's
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        if len(self.scales) == 1:
            return self._calibrated(self._logits(x, self.scales[0]))
        if self.training:  # one factor per batch: each scale must be decisive alone, at the cost of one pass
            factor = self.scales[int(torch.randint(len(self.scales), ()))]
            return self._calibrated(self._logits(x, factor))
        return self._calibrated(torch.stack([self._logits(x, f) for f in self.scales]).mean(0))

    def __setstate__(self, state):
        """A Detector pickled before a calibration buffer existed (an MLflow model logged then) unpickles with
        that buffer at its neutral value."""
        super().__setstate__(state)
        for name, value in NEUTRAL_CALIBRATION.items():
            if name not in self._buffers:
                self.register_buffer(name, torch.tensor(value))

    def _calibrated(self, logits):
        return (logits - self.logit_shift) / self.temperature

    def _logits(self, x, factor: int):
        if factor > 1:  # average pooling: an exact box downscale, the same in torch and ONNX
            x = F.avg_pool2d(x, factor)
        logits = self.net(x).reshape(-1)
        if self.branch is not None:
            logits = logits + self.branch(x)
        return logits


def create_model(params: ModelParams) -> nn.Module:
    spec = get_spec(params.name)
    if params.patch_blocks is None:
        net = spec.build(dropout=params.dropout)
    else:
        truncatable = [n for n in available_models() if _takes_patch_blocks(get_spec(n))]
        if params.name not in truncatable:
            raise ModelError(f"model.patch_blocks: {params.name} cannot be truncated; these can: {truncatable}")
        try:
            net = spec.build(dropout=params.dropout, patch_blocks=params.patch_blocks)
        except ValueError as exc:  # an out-of-range patch_blocks: the builder knows its own depth
            raise ModelError(str(exc)) from None
    if params.pretrained:  # into the bare network, whose names match torchvision's ImageNet files
        path = imagenet_weights_file(spec, params.weights_path)
        load_matching(net, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return Detector(net, ResidualBranch(params.dropout) if params.residual_branch else None, tuple(params.scales))


def _takes_patch_blocks(spec: ModelSpec) -> bool:
    return "patch_blocks" in inspect.signature(spec.build).parameters


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
