"""The trained detector as one typed artifact: what every step that uses a model reads and writes.

A `TrainedModel` is the architecture spec, the weights (in the module), the preprocessing config, the label
map, the decision threshold, the calibration and the provenance of the run that made it. It is stored as a
dfdetect checkpoint (`dfdetect.checkpoint`: a weights-only torch file, loaded without pickle code), which may
also carry the state to resume training; evaluation, calibration, model logging, the registry, serving and
the CLI all load it through `TrainedModel.load` and never read the checkpoint's fields themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import ModelParams
from .labels import LABEL_MAP
from .preprocessing import PreprocessConfig

DEFAULT_THRESHOLD = 0.5  # only for checkpoints written before thresholds were stored


@dataclass(frozen=True)
class TrainedModel:
    """A model ready to score: `module` is in eval mode with its weights (and fitted temperature) loaded."""

    module: nn.Module
    preprocess: PreprocessConfig
    threshold: float = DEFAULT_THRESHOLD
    label_map: dict = field(default_factory=lambda: dict(LABEL_MAP))
    spec: ModelParams | None = None  # the architecture; None only for a module built in memory (tests)
    calibration: dict | None = None  # temperature and validation ECE before / after, when calibrated
    provenance: dict = field(default_factory=dict)  # e.g. best_epoch, val_auc of the run that trained it
    operating_point: dict | None = None  # the threshold's policy and its validation rates (operating_point.choose)
    lineage: dict = field(default_factory=dict)  # e.g. {"pruned": {...}, "distilled_from": [...]}

    @property
    def architecture(self) -> str:
        return self.spec.name if self.spec else type(self.module).__name__

    @classmethod
    def from_state(cls, state: dict) -> "TrainedModel":
        """From a loaded checkpoint dict (see `checkpoint.load`, which validates it)."""
        module, pre = checkpoint.model_from_state(state)
        spec = ModelParams(**{**state["model"], "pretrained": False, "weights_path": None})
        provenance = {k: state[k] for k in ("best_epoch", "best_val_auc", "run_id") if state.get(k) is not None}
        return cls(
            module,
            pre,
            float(state.get("threshold", DEFAULT_THRESHOLD)),
            dict(state["label_map"]),
            spec,
            state.get("calibration"),
            provenance,
            state.get("operating_point"),
            dict(state.get("lineage") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "TrainedModel":
        """Raises checkpoint.CheckpointError naming the file when it is missing, corrupt or not dfdetect's."""
        return cls.from_state(checkpoint.load(path))

    def to_state(self) -> dict:
        """The checkpoint fields of this artifact (without any training-resume state)."""
        if self.spec is None:
            raise ValueError("a TrainedModel built without an architecture spec cannot be saved")
        return {
            "model": self.spec.model_dump(),
            "state_dict": self.module.state_dict(),
            "preprocess": self.preprocess.to_dict(),
            "threshold": float(self.threshold),
            "calibration": self.calibration,
            "operating_point": self.operating_point,
            "lineage": self.lineage,
            **self.provenance,
        }

    def save(self, path: str | Path, training_state: dict | None = None) -> None:
        """Write atomically; `training_state` (optimizer, schedulers, RNGs, history) is kept beside it so that
        a checkpoint written at the end of training can still resume."""
        checkpoint.save(path, {**(training_state or {}), **self.to_state()})

    def with_calibration(
        self, temperature: float, summary: dict, operating_point: dict, shift: float = 0.0
    ) -> "TrainedModel":
        """A copy whose module serves (logit - `shift`) / `temperature`, deciding at the operating point's
        threshold (chosen on the calibrated scores)."""
        import copy

        module = copy.deepcopy(self.module)
        with torch.no_grad():
            module.temperature.fill_(float(temperature))
            module.logit_shift.fill_(float(shift))
        return replace(self, module=module, calibration=summary).with_operating_point(operating_point)

    def with_operating_point(self, point: dict) -> "TrainedModel":
        """A copy deciding at `point['threshold']` (see operating_point.choose)."""
        return replace(self, threshold=float(point["threshold"]), operating_point=dict(point))
