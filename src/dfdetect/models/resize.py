"""Rebuild a structurally pruned network: the registered architecture, each layer narrowed to the shapes its
tensors have in the checkpoint. A pruned model is then stored like any other (weights only, no pickled
modules) and loads through the same `TrainedModel.load`."""

from __future__ import annotations

import torch
from torch import nn


def _parameter(shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape))


def resize_to(module: nn.Module, state_dict: dict) -> None:
    """Give every convolution, batch norm and linear layer of `module` the widths of its weights in
    `state_dict` (a depthwise convolution stays depthwise), so that `load_state_dict` fits."""
    for name, layer in module.named_modules():
        weight = state_dict.get(f"{name}.weight" if name else "weight")
        if weight is None or not isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            continue
        if isinstance(layer, nn.Conv2d):
            depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            groups = weight.shape[0] if depthwise else layer.groups
            layer.out_channels, layer.in_channels, layer.groups = weight.shape[0], weight.shape[1] * groups, groups
            layer.weight = _parameter(weight.shape)
            if layer.bias is not None:
                layer.bias = _parameter(weight.shape[:1])
        elif isinstance(layer, nn.BatchNorm2d):
            n = weight.shape[0]
            layer.num_features = n
            layer.weight, layer.bias = _parameter((n,)), _parameter((n,))
            layer.running_mean, layer.running_var = torch.zeros(n), torch.ones(n)
        else:
            layer.out_features, layer.in_features = weight.shape
            layer.weight = _parameter(weight.shape)
            if layer.bias is not None:
                layer.bias = _parameter(weight.shape[:1])
