"""Platt scaling (Platt, 1999; with a shift, temperature scaling of Guo et al., 2017): a temperature T and a
shift c fitted on validation so that sigmoid((logit - c) / T) is a calibrated P(fake). The map is monotonic,
so ranking metrics (ROC-AUC, AP) do not change; the threshold is recomputed on the calibrated scores."""

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


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling: the temperature T > 0 and shift c for which sigmoid((logits - c) / T) has the lowest
    validation log loss (convex in 1/T and c/T). The shift matters when training saw the classes in another
    proportion than validation holds: self-blends (train.sbi) turn reals into fakes, so the model learns a
    prior of about 3 fakes to 1 and its logits sit about ln 3 too high, which no temperature undoes.
    Against Platt's targets (N+ + 1) / (N+ + 2) for fakes and 1 / (N- + 2) for reals instead of 1 and 0: a
    validation set the model separates perfectly would otherwise drive T to its bound and serve P(fake) = 1.0
    for any face past the threshold, a certainty 200 validation images cannot support. With thousands, the
    targets are 0 and 1 to within 1e-3."""
    from scipy.optimize import minimize
    from scipy.special import expit

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    n_fake, n_real = float(y.sum()), float(len(y) - y.sum())
    target = np.where(y == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))

    def loss_and_gradient(ab: np.ndarray) -> tuple[float, np.ndarray]:
        s = ab[0] * z + ab[1]  # a = 1 / T, b = -c / T
        error = expit(s) - target
        return float(np.mean(np.logaddexp(0.0, s) - target * s)), np.array([np.mean(error * z), np.mean(error)])

    bounds = [(np.exp(-5.0), np.exp(5.0)), (-50.0, 50.0)]
    a, b = minimize(loss_and_gradient, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds).x
    return float(1.0 / a), float(-b / a)


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
    """Fit T and the shift on `val` for `trained`, in memory: a copy serving (logit - shift) / T, the operating
    point chosen again on the calibrated scores and the calibration summary (temperature, shift, validation ECE
    before and after)."""
    rt = runtime.resolve(device, "fp32", False)
    current_t, current_shift = float(trained.module.temperature), float(trained.module.logit_shift)
    scorer = copy.deepcopy(trained.module).to(rt.device)  # scoring sets eval mode and a device: never the caller's
    logits, labels, _ = predict_logits(scorer, batch_loader(val, 128, shuffle=False), trained.preprocess, rt)
    del scorer
    raw = logits.astype(np.float64) * current_t + current_shift  # undo an earlier fit: refitting starts afresh
    t, shift = fit_platt(raw, labels)
    before, after = sigmoid(raw), sigmoid((raw - shift) / t)
    chosen = choose(labels, after, point)
    summary = {
        "temperature": round(t, 6),
        "logit_shift": round(shift, 6),
        "val_ece_before": round(expected_calibration_error(labels, before), 6),
        "val_ece_after": round(expected_calibration_error(labels, after), 6),
        "val_roc_auc": _rounded(roc_auc(labels, after, None)),  # of the model shipped (mixed: train.wise_alpha)
        "threshold": chosen["threshold"],
    }
    return trained.with_calibration(t, summary, chosen, shift)
