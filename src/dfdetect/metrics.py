"""Detection metrics, each defined once in a registry (label 1 = fake, scores = P(fake))."""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn import metrics as skm

# name -> fn(labels, scores, threshold) -> float
_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, float], float]] = {}


def register_metric(name: str):
    def decorator(fn):
        _METRICS[name] = fn
        return fn

    return decorator


def _both_classes(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) == 2


@register_metric("accuracy")
def accuracy(labels, scores, threshold):
    return float(skm.accuracy_score(labels, scores >= threshold))


@register_metric("precision")
def precision(labels, scores, threshold):
    return float(skm.precision_score(labels, scores >= threshold, zero_division=0))


@register_metric("recall")
def recall(labels, scores, threshold):
    return float(skm.recall_score(labels, scores >= threshold, zero_division=0))


@register_metric("f1")
def f1(labels, scores, threshold):
    return float(skm.f1_score(labels, scores >= threshold, zero_division=0))


@register_metric("roc_auc")
def roc_auc(labels, scores, threshold):
    return float(skm.roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


@register_metric("average_precision")
def average_precision(labels, scores, threshold):
    return float(skm.average_precision_score(labels, scores)) if _both_classes(labels) else float("nan")


def eer_and_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Equal error rate (where false positive and false negative rates meet) and the score there."""
    if not _both_classes(labels):
        return float("nan"), 0.5
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    i = int(np.nanargmin(np.abs((1 - tpr) - fpr)))
    return float((fpr[i] + 1 - tpr[i]) / 2), float(min(1.0, thresholds[i]))


@register_metric("eer")
def eer(labels, scores, threshold):
    return eer_and_threshold(labels, scores)[0]


@register_metric("ece")
def ece(labels, scores, threshold):
    return expected_calibration_error(labels, scores)


def expected_calibration_error(labels, scores, bins: int = 15) -> float:
    """Expected calibration error of P(fake): the share-weighted gap between the mean predicted probability
    and the observed fake rate in equal-width probability bins."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    which = np.minimum((scores * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    return float(total)


def reliability(labels, scores, bins: int = 10) -> list[dict]:
    """Per probability bin: mean predicted P(fake), observed fake rate, count (the reliability diagram)."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    which = np.minimum((scores * bins).astype(int), bins - 1)
    return [
        {
            "bin": b,
            "predicted": float(scores[which == b].mean()),
            "observed": float(labels[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def compute_all(labels, scores, threshold: float = 0.5, names: list[str] | None = None) -> dict[str, float]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(labels) != len(scores) or len(labels) == 0:
        raise ValueError(f"need as many labels as scores, and at least one; got {len(labels)} and {len(scores)}")
    return {name: _METRICS[name](labels, scores, threshold) for name in (names or list(_METRICS))}


def available_metrics() -> list[str]:
    return list(_METRICS)


def video_level(groups: list[str], labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (label, score) per video: the mean of its frame scores, as the common benchmark protocol does."""
    index: dict[str, int] = {}
    for g in groups:
        index.setdefault(g, len(index))
    ids = np.array([index[g] for g in groups])
    counts = np.bincount(ids)
    video_scores = np.bincount(ids, weights=scores) / counts
    video_labels = np.zeros(len(index), dtype=np.int64)
    video_labels[ids] = labels
    mixed = np.bincount(ids, weights=labels) / counts
    if not np.all((mixed == 0) | (mixed == 1)):
        raise ValueError("a video has frames with both labels: its frames must share one class")
    return video_labels, video_scores
