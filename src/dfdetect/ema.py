"""An exponential moving average of a model's weights (and batch-norm statistics).

Fine-tuning on a few thousand faces is noisy from one step to the next; the average of the recent weights
is the common remedy, at the cost of one copy of the model (on the shared faces it did not measurably
change test ROC-AUC: README "Detection quality"). The decay warms up (as timm's ModelEmaV2 and the
EfficientNet recipes do) so the first epoch's average is not dominated by the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def effective_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        keep = self.effective_decay()
        self.updates += 1
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current.detach(), 1 - keep)
            else:  # counters such as num_batches_tracked
                averaged.copy_(current)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
