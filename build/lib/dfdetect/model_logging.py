"""What a finished training run leaves in MLflow: the model, its checkpoint and its training curves."""

from __future__ import annotations

import csv
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import Params
from .export import FakeProbability
from .labels import LABEL_MAP
from .plots import training_curves_png


def _requirements() -> list[str]:
    # Stated, not inferred: MLflow's inference imports the model in a subprocess and takes long.
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "torchvision", "numpy")]


def log_model(mlflow, best_ckpt: Path, threshold: float) -> None:
    from mlflow.models import infer_signature

    state = checkpoint.load(best_ckpt)
    net, pre = checkpoint.model_from_state(state)
    wrapped = FakeProbability(net).eval()
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
        metadata={"label_map": LABEL_MAP, "preprocess": pre.to_dict(), "threshold": threshold,
                  "output": "probability that the image is fake (label 1)", "architecture": state["model"]["name"]},
    )


def log_training_outputs(mlflow, params: Params, best_ckpt: Path, history_path, best: dict) -> None:
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
        log_model(mlflow, best_ckpt, best["threshold"])
