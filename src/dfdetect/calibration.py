"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation so that sigmoid(logit / T) is a
calibrated P(fake). T is monotonic, so ranking metrics (ROC-AUC, AP) do not change; the threshold is
recomputed on the calibrated scores."""

from __future__ import annotations

import copy

import numpy as np

from . import runtime
from .artifact import TrainedModel
from .config import OperatingPointParams
from .data import PreparedSplit, batch_loader
from .inference import predict_logits
from .metrics import expected_calibration_error, roc_auc
from .operating_point import choose


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the validation log loss of sigmoid(logits / T) (convex in 1/T), against Platt's
    targets (N+ + 1) / (N+ + 2) for fakes and 1 / (N- + 2) for reals instead of 1 and 0: a validation set the
    model separates perfectly would otherwise drive T to its bound and serve P(fake) = 1.0 for any face past
    the threshold, a certainty 200 validation images cannot support. With thousands, the targets are 0 and 1
    to within 1e-3."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    n_fake, n_real = float(y.sum()), float(len(y) - y.sum())
    target = np.where(y == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - target * s))

    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


def _rounded(value: float) -> float | None:
    return round(value, 6) if np.isfinite(value) else None  # one class in validation: no ROC-AUC


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def calibrate(
    trained: TrainedModel,
    val: PreparedSplit,
    device: str = "auto",
    point: OperatingPointParams = OperatingPointParams(),
) -> TrainedModel:
    """Fit T on `val` for `trained`, in memory: a copy with T in its module, the operating point chosen again
    on the calibrated scores and the calibration summary (temperature, validation ECE before and after)."""
    rt = runtime.resolve(device, "fp32", False)
    current = float(trained.module.temperature)
    scorer = copy.deepcopy(trained.module).to(rt.device)  # scoring sets eval mode and a device: never the caller's
    logits, labels, _ = predict_logits(scorer, batch_loader(val, 128, shuffle=False), trained.preprocess, rt)
    del scorer
    raw = logits.astype(np.float64) * current  # undo a temperature fitted before: refitting starts from scratch
    t = fit_temperature(raw, labels)
    before, after = sigmoid(raw), sigmoid(raw / t)
    chosen = choose(labels, after, point)
    summary = {
        "temperature": round(t, 6),
        "val_ece_before": round(expected_calibration_error(labels, before), 6),
        "val_ece_after": round(expected_calibration_error(labels, after), 6),
        "val_roc_auc": _rounded(roc_auc(labels, after, None)),  # of the model shipped (mixed: train.wise_alpha)
        "threshold": chosen["threshold"],
    }
    return trained.with_calibration(t, summary, chosen)
