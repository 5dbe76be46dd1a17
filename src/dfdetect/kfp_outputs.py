"""dfdetect's evaluation written into Kubeflow Pipelines' typed artifacts (Metrics, ClassificationMetrics,
Markdown), so the KFP UI shows the same numbers as eval/metrics.json."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path


def _sample(rows: list, most: int) -> list:
    """At most `most` rows, evenly spaced, first and last kept: the KFP UI draws a few hundred points."""
    if len(rows) <= most:
        return rows
    step = (len(rows) - 1) / (most - 1)
    return [rows[round(i * step)] for i in range(most)]


def log_kfp_evaluation(result: dict, evaluation_dir: str | Path, metrics, roc, report) -> None:
    """Write dfdetect's evaluation into KFP artifacts: Metrics, ClassificationMetrics, Markdown."""
    evaluation_dir = Path(evaluation_dir)
    for key, value in result.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))
    with open(evaluation_dir / "plots" / "roc.csv") as f:
        points = _sample(list(csv.DictReader(f)), 200)
    roc.log_roc_curve(
        [float(p["fpr"]) for p in points], [float(p["tpr"]) for p in points], [float(p["threshold"]) for p in points]
    )
    with open(evaluation_dir / "plots" / "confusion.csv") as f:
        pairs = [(r["actual"], r["predicted"]) for r in csv.DictReader(f)]
    classes = ["real", "fake"]
    roc.log_confusion_matrix(
        classes, [[sum(1 for a, p in pairs if a == x and p == y) for y in classes] for x in classes]
    )
    shutil.copy(evaluation_dir / "report.md", report.path)
