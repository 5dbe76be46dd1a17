"""Scoring images with a trained model: the one code path of evaluation, `dfdetect predict` and serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import runtime
from .artifact import TrainedModel
from .labels import CLASS_NAMES, FAKE, check_label_map
from .preprocessing import PreprocessConfig, normalize, to_model_input


def predict_scores(
    model: nn.Module, loader, pre: PreprocessConfig, rt: runtime.Runtime
) -> tuple[np.ndarray, np.ndarray, float]:
    """P(fake) for every batch of a loader of uint8 images, with the labels and the mean loss."""
    logits, labels, loss = predict_logits(model, loader, pre, rt)
    return 1 / (1 + np.exp(-logits.astype(np.float64))), labels, loss


def predict_logits(
    model: nn.Module, loader, pre: PreprocessConfig, rt: runtime.Runtime
) -> tuple[np.ndarray, np.ndarray, float]:
    """The model's logits (temperature applied) for every batch of uint8 images, the labels, the mean loss."""
    model.eval()
    scores, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for images, y in loader:
            x = normalize(images.to(rt.device), pre).contiguous(memory_format=rt.memory_format())
            with rt.autocast():
                logits = model(x).float()
            loss_sum += F.binary_cross_entropy_with_logits(logits, y.to(rt.device).float(), reduction="sum").item()
            scores.append(logits.cpu().numpy())
            labels.append(y.numpy())
    labels_arr = np.concatenate(labels)
    return np.concatenate(scores), labels_arr, loss_sum / max(1, len(labels_arr))


@dataclass
class Verdict:
    label: str
    fake_probability: float
    threshold: float

    @property
    def is_fake(self) -> bool:
        return self.label == CLASS_NAMES[FAKE]


class Predictor:
    """A model with its preprocessing and threshold; `score` takes PIL images and returns P(fake)."""

    def __init__(
        self,
        model: nn.Module,
        pre: PreprocessConfig,
        threshold: float,
        source: str,
        probabilities: bool = False,
        rt: runtime.Runtime | None = None,
    ):
        self.rt = rt or runtime.resolve("cpu", "fp32", False)
        self.model = model.to(self.rt.device)
        if not probabilities:
            self.model.eval()  # an exported MLflow model is already in eval mode and refuses .eval()
        self.pre, self.threshold, self.source = pre, float(threshold), source
        self._outputs_probabilities = probabilities

    @classmethod
    def from_trained(cls, trained: TrainedModel, source: str, device: str = "cpu") -> "Predictor":
        return cls(
            trained.module, trained.preprocess, trained.threshold, source, rt=runtime.resolve(device, "fp32", False)
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "Predictor":
        return cls.from_trained(TrainedModel.load(path), str(path), device)

    @classmethod
    def from_mlflow(cls, model_uri: str) -> "Predictor":
        """A model logged by `dfdetect train` (runs:/..., models:/...), with its stored metadata."""
        import mlflow

        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        meta = mlflow.models.get_model_info(model_uri).metadata or {}
        missing = [k for k in ("label_map", "preprocess") if k not in meta]
        if missing:
            raise ValueError(f"{model_uri}: model lacks {missing} in its MLflow metadata; was it logged by dfdetect?")
        check_label_map(meta["label_map"])
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        return cls(
            model,
            PreprocessConfig.from_dict(meta["preprocess"]),
            meta.get("threshold", 0.5),
            model_uri,
            probabilities=True,
        )

    def score(self, images: list[Image.Image]) -> np.ndarray:
        x = to_model_input(images, self.pre).to(self.rt.device)
        with torch.no_grad():
            out = self.model(x).float()
        return (out if self._outputs_probabilities else torch.sigmoid(out)).cpu().numpy()

    def verdicts(self, images: list[Image.Image]) -> list[Verdict]:
        return [Verdict(CLASS_NAMES[int(p >= self.threshold)], float(p), self.threshold) for p in self.score(images)]
