"""What a finished training run leaves in MLflow: the model, its checkpoint and its training curves."""

from __future__ import annotations

import csv
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .artifact import TrainedModel
from .config import Params
from .export import FakeProbability
from .plots import training_curves_png


def _requirements() -> list[str]:
    # Stated, not inferred: MLflow's inference imports the model in a subprocess and takes long.
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "torchvision", "numpy")]


def log_model(mlflow, trained: TrainedModel) -> None:
    from mlflow.models import infer_signature

    pre = trained.preprocess
    wrapped = FakeProbability(trained.module).eval()
    size = pre.image_size
    # Batch 2, not 1: a batch-1 example makes torch.export pin the batch size to 1.
    example = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        wrapped,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=_requirements(),
        metadata={
            "label_map": trained.label_map,
            "preprocess": pre.to_dict(),
            "threshold": trained.threshold,
            "output": "probability that the image is fake (label 1)",
            "architecture": trained.architecture,
        },
    )


def log_training_outputs(
    mlflow, params: Params, trained: TrainedModel, best_ckpt: Path, history_path, best: dict
) -> None:
    """The run's best metrics, its checkpoint file (what the registry loads), training curves and the model."""
    mlflow.log_metrics({f"best_{k}": float(v) for k, v in best.items()})
    mlflow.log_artifact(str(best_ckpt), artifact_path="checkpoint")
    if history_path:
        mlflow.log_artifact(str(history_path), artifact_path="training")
        with open(history_path) as f:
            rows = list(csv.DictReader(f))
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "training_curves.png"
            training_curves_png(rows, png)
            mlflow.log_artifact(str(png), artifact_path="training")
    if params.mlflow.log_model:
        log_model(mlflow, trained)
