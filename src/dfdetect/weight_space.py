"""Weight-space ensembling with the pretrained weights (WiSE-FT: Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022).

Fine-tuning on one source moves every weight toward what separates that source's reals from its fakes,
including what only that source has. A linear mix of the fine-tuned weights with the ImageNet weights they
started from keeps part of the features that were never fitted to that source; the paper found such a mix
more robust off the training distribution than either end, at little cost on it. Only the tensors the
ImageNet file supplied are mixed: a new head (the 1-logit classifier, a patch head, a residual branch) has no
pretrained counterpart and stays fine-tuned. Batch-norm statistics are mixed with the weights, as the paper
mixes every tensor. The mixed model must have its calibration and threshold chosen again (`train.finish`).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .artifact import TrainedModel
from .config import ModelParams
from .models.catalog import get_spec, imagenet_weights_file

LINEAGE_KEY = "wise_ft"


def pretrained_weights(spec: ModelParams) -> dict[str, torch.Tensor]:
    """The ImageNet tensors the architecture starts from, named as in a Detector's state dict (`net.`)."""
    path = imagenet_weights_file(get_spec(spec.name), spec.weights_path)
    return {f"net.{k}": v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def mix_with_pretrained(trained: TrainedModel, pretrained: dict[str, torch.Tensor], alpha: float) -> TrainedModel:
    """A copy whose pretrained tensors are alpha x fine-tuned + (1 - alpha) x pretrained; the rest unchanged.
    Its lineage records the mix, so a model is never mixed twice."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if LINEAGE_KEY in trained.lineage:
        raise ValueError(f"this model is already mixed with its pretrained weights: {trained.lineage[LINEAGE_KEY]}")
    module = copy.deepcopy(trained.module)
    mixed = 0
    with torch.no_grad():
        for name, tensor in module.state_dict().items():  # the module's own storage: changed in place
            source = pretrained.get(name)
            if source is None or source.shape != tensor.shape or not tensor.is_floating_point():
                continue
            tensor.lerp_(source.to(tensor.device, tensor.dtype), 1.0 - alpha)
            mixed += 1
    if not mixed:
        raise ValueError("no tensor of this model has a pretrained counterpart: nothing to mix")
    lineage = {**trained.lineage, LINEAGE_KEY: {"alpha": alpha, "tensors_mixed": mixed}}
    return replace(trained, module=module, lineage=lineage)
