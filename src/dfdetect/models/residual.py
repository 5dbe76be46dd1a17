"""An optional noise-residual branch beside any backbone.

Fixed high-pass filters (three of the steganalysis "rich model" kernels) strip the image content and keep
the fine noise pattern, which a face swap's resampling and blending disturb and which ImageNet filters
tend to smooth over; a small CNN reads the residuals and adds its logit to the backbone's.
"""

from __future__ import annotations

import torch
from torch import nn

_HIGH_PASS = (
    torch.tensor([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]]) / 4,
    torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]])
    / 12,
    torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]) / 2,
)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class ResidualBranch(nn.Module):
    def __init__(self, dropout: float = 0.2, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        kernels = torch.stack(_HIGH_PASS).float().unsqueeze(1)  # 3 x 1 x 5 x 5
        self.register_buffer("high_pass", kernels.repeat(3, 1, 1, 1))  # the three filters on each colour channel
        chans = (3 * len(_HIGH_PASS),) + widths
        self.features = nn.Sequential(*[_block(a, b) for a, b in zip(chans, chans[1:])])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], 1)
        # Starts silent: training begins from the backbone's own (ImageNet) behaviour and adds the branch's evidence.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        residuals = nn.functional.conv2d(x, self.high_pass, padding=2, groups=3)
        pooled = nn.functional.adaptive_avg_pool2d(self.features(residuals), 1).flatten(1)
        return self.fc(self.dropout(pooled)).reshape(-1)
