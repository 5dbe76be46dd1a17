"""Linear probing before fine-tuning (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022).

A new head starts random, so the first fine-tuning steps send large, arbitrary gradients into every pretrained
layer and reshape features the head has not learnt to read yet. Training the new parts alone first, on frozen
ImageNet features, gives the fine-tune a head that already reads them; the paper found the features then
distorted less and the model more robust off the training distribution. `train.probe_epochs` are the first
epochs of a run trained that way: only the tensors without an ImageNet counterpart (the 1-logit head, a patch
head, a residual branch) learn, and the frozen layers' batch-norm statistics stay ImageNet's too, so the
features really are fixed. No gradient flows into the frozen layers, so a probe epoch costs about a forward
pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def new_parameter_names(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> set[str]:
    """The parameters of `model` that the ImageNet file does not supply (same name and shape): the new parts."""
    return {
        name
        for name, param in model.named_parameters()
        if name not in pretrained or pretrained[name].shape != param.shape
    }


@contextmanager
def probing(model: nn.Module, trainable: set[str]) -> Iterator[None]:
    """Inside: only the parameters named in `trainable` learn, and every module that has parameters but none
    that learns is in evaluation mode, so the frozen part computes fixed features (batch-norm layers keep their
    running statistics, stochastic depth inside a frozen block stays off); parameterless modules of the learning
    part (the head's dropout) keep training mode. Call it after `model.train()`. On exit every parameter's own
    `requires_grad` is restored (a `train.freeze` stays frozen) and the model is back in training mode."""
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    try:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name] and name in trainable)
        for module in model.modules():
            own = list(module.parameters())
            if own and not any(p.requires_grad for p in own):
                module.eval()
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        model.train()
