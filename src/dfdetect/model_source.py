"""A trained model named the way users name one: a checkpoint file, or a registry alias or version."""

from __future__ import annotations

from pathlib import Path

from .artifact import TrainedModel
from .config import Params


def load_trained(ref: str | Path, params: Params) -> tuple[TrainedModel, str]:
    """The model and a label of where it came from (`path` or `name/version`). A path that exists is a
    checkpoint; anything else is looked up in params.registry's model (raises registry.RegistryError)."""
    if Path(ref).is_file():
        return TrainedModel.load(ref), str(ref)
    from .registry import load

    loaded = load(str(ref), params=params)
    return loaded.trained, f"{loaded.name}/{loaded.version}"
