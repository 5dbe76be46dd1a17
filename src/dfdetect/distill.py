"""`dfdetect distill`: a student trained on its labels and on the soft P(fake) of a teacher (one registered
version or checkpoint, or the mean of several). The run is a normal training run: tracked, checkpointed,
evaluated, registered and gated like any challenger; its lineage names the teachers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifact import TrainedModel
from .config import Params
from .preprocessing import standardize

log = logging.getLogger(__name__)


class Teacher:
    """Frozen models whose mean P(fake) at the distillation temperature are the student's soft targets."""

    def __init__(self, models: list[TrainedModel], temperature: float, device: torch.device):
        if not models:
            raise ValueError("distill.teachers: at least one teacher is needed")
        self.models = [m.module.to(device).eval() for m in models]
        self.preprocess = [m.preprocess for m in models]
        self.temperature = temperature
        for module in self.models:
            module.requires_grad_(False)

    @torch.no_grad()
    def soft_targets(self, images01: torch.Tensor) -> torch.Tensor:
        """Augmented images in [0, 1] (N x 3 x S x S, not modified) -> the teachers' mean soft P(fake)."""
        probs = []
        for module, pre in zip(self.models, self.preprocess):
            x = images01
            if x.shape[-1] != pre.image_size:  # a teacher trained at another size sees its own size
                x = F.interpolate(x, size=(pre.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            logits = module(standardize(x.clone(), pre, inplace=True)).float()
            probs.append(torch.sigmoid(logits / self.temperature))
        return torch.stack(probs).mean(0)


def load_teacher(params: Params, device: torch.device) -> tuple[Teacher, list[str]]:
    """The teachers of params.distill, loaded by `model_source.load_trained`, and where each came from."""
    from .model_source import load_trained

    loaded = [load_trained(ref, params) for ref in params.distill.teachers]
    sources = [source for _, source in loaded]
    log.info(
        "distilling from %s at temperature %.2f, alpha %.2f",
        ", ".join(sources),
        params.distill.temperature,
        params.distill.alpha,
    )
    return Teacher([m for m, _ in loaded], params.distill.temperature, device), sources


def distill(
    params: Params,
    prepared_dir: str | Path,
    model_dir: str | Path,
    history_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
    track: bool = True,
):
    """Train params.model (the student) with the teachers of params.distill; returns train.TrainResult. The
    student is never mixed back toward its ImageNet weights (`train.wise_alpha`): it is trained to follow the
    teacher, which already carries its own mix, and mixing a 96-px student cost 0.022 validation ROC-AUC
    (README "Search and compression")."""
    from . import runtime
    from .train import Trainer, train

    device = runtime.resolve(params.train.device).device
    if params.train.wise_alpha < 1.0:  # the student learns the teacher's function; a mix would move it away
        log.info(
            "distill: the student is not mixed with its ImageNet weights (train.wise_alpha %s ignored)",
            params.train.wise_alpha,
        )
        params = params.model_copy(update={"train": params.train.model_copy(update={"wise_alpha": 1.0})})
    teacher, sources = load_teacher(params, device)
    lineage = {"distilled_from": sources, "alpha": params.distill.alpha, "temperature": params.distill.temperature}
    trainer = Trainer(params, prepared_dir, model_dir, track, teacher=teacher, lineage=lineage)
    return train(params, prepared_dir, model_dir, history_path, metrics_path, track=track, trainer=trainer)
