"""Checkpoints: everything needed to resume training or to use the model, loaded without pickle code."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from .config import ModelParams
from .io_utils import atomic_write_bytes
from .labels import LABEL_MAP, check_label_map
from .models import create_model
from .models.catalog import NEUTRAL_CALIBRATION
from .preprocessing import PreprocessConfig

FORMAT = "dfdetect-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or lacks what dfdetect needs."""


def save(path: str | Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "label_map": LABEL_MAP, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("format", "label_map", "model", "state_dict", "preprocess") if k not in state]
    if missing or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (missing {missing or ['format']})")
    check_label_map(state["label_map"])
    return state


def with_calibration_buffers(weights: dict) -> dict:
    """A Detector's weights with the calibration buffers that older checkpoints lack: temperature (before
    calibration) and logit_shift (before the shift, a temperature alone), at their neutral values."""
    weights = dict(weights)
    for name, value in NEUTRAL_CALIBRATION.items():
        weights.setdefault(name, torch.tensor(value))
    return weights


def model_from_state(state: dict) -> tuple[nn.Module, PreprocessConfig]:
    """Rebuild the architecture (never ImageNet weights: the checkpoint has all of them) and load weights."""
    params = ModelParams(**{**state["model"], "pretrained": False, "weights_path": None})
    model = create_model(params)
    weights = with_calibration_buffers(state["state_dict"])
    if (state.get("lineage") or {}).get("pruned"):  # fewer channels than the architecture's: take the file's
        from .models.resize import resize_to

        resize_to(model, weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise CheckpointError(
            f"weights do not fit the '{params.name}' architecture of this dfdetect version ({first_line})"
        ) from None
    model.eval()
    return model, PreprocessConfig.from_dict(state["preprocess"])
