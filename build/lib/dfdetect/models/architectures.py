"""The shipped architectures. Each gives one logit per image (N or N x 1): the evidence for "fake"."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from .registry import register_model


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@register_model("custom_cnn")
class CustomCNN(nn.Module):
    """Four conv blocks with batch norm, adaptive average pooling and a dropout head (about 0.43 M params)."""

    def __init__(self, dropout: float = 0.3, widths=(32, 64, 128, 256)):
        super().__init__()
        blocks, c_in = [], 3
        for w in widths:
            blocks.append(_conv_block(c_in, w))
            c_in = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, 128), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(128, 1))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@register_model("resnet50", imagenet_weights=tvm.ResNet50_Weights.IMAGENET1K_V2)
def resnet50(dropout: float = 0.3) -> nn.Module:
    net = tvm.resnet50(weights=None)
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, 1))
    return net


@register_model("efficientnet_b0", imagenet_weights=tvm.EfficientNet_B0_Weights.IMAGENET1K_V1)
def efficientnet_b0(dropout: float = 0.3) -> nn.Module:
    net = tvm.efficientnet_b0(weights=None)
    net.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.classifier[1].in_features, 1))
    return net
