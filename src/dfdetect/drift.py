"""Drift: do the uploads still look like the data the served model was evaluated on?

`evaluate` stores a reference profile with the model (`evaluation/reference_profile.json` in its MLflow run):
per image of the evaluated split, P(fake), the verdict at the model's threshold, the original width and height,
and the brightness of the model's input. The service logs the same columns for every upload
(dfdetect.prediction_log), plus the JPEG quality where it can be read. `check_drift` compares a window of the
log with the profile column by column with Evidently (Kolmogorov-Smirnov for numbers, a z-test for the verdict
rate) and calls it drift when at least `drift_share` of the columns moved."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from .io_utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
REFERENCE_ARTIFACT = "evaluation/reference_profile.json"
NUMERIC = ["fake_probability", "width", "height", "brightness", "jpeg_quality"]
CATEGORICAL = ["verdict"]
MAX_REFERENCE_ROWS = 5000


class DriftError(RuntimeError):
    pass


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean pixel value of each model input (N x S x S x 3 uint8), 0-1: the same measure in evaluate and serving."""
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


def jpeg_quality(img) -> int | None:
    """An estimate of a JPEG's quality (1-100) from its luminance quantisation table (the IJG scaling); None
    for other formats."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    mean_step = float(np.mean(tables[0]))
    # IJG: table = base * scale / 100 with base mean ~57.6; scale = 5000/q (q < 50) or 200 - 2q
    scale = mean_step / 57.625 * 100
    quality = 5000 / scale if scale > 100 else (200 - scale) / 2
    return int(np.clip(round(quality), 1, 100))


def reference_profile(prepared_dir: Path, relpaths: list[str], images: np.ndarray, scores, threshold: float) -> dict:
    """The evaluated split as the drift check's reference (at most MAX_REFERENCE_ROWS images, seeded sample)."""
    sizes = {}
    manifest = Path(prepared_dir) / "manifest.csv"
    if manifest.exists():
        with manifest.open(newline="") as f:
            sizes = {r["path"]: (r.get("width"), r.get("height")) for r in csv.DictReader(f)}
    pick = np.arange(len(relpaths))
    if len(pick) > MAX_REFERENCE_ROWS:
        pick = np.sort(np.random.default_rng(0).choice(pick, MAX_REFERENCE_ROWS, replace=False))
    light = brightness(images[pick])
    rows = []
    for k, i in enumerate(pick):
        w, h = sizes.get(relpaths[i], (None, None))
        rows.append(
            {
                "fake_probability": float(scores[i]),
                "verdict": "fake" if scores[i] >= threshold else "real",
                "width": int(w) if w else None,
                "height": int(h) if h else None,
                "brightness": round(float(light[k]), 6),
            }
        )
    return {"threshold": float(threshold), "n": len(relpaths), "rows": rows}


def _frame(rows: list[dict], columns: list[str]):
    import pandas as pd

    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def comparable_columns(reference: list[dict], current: list[dict]) -> tuple[list[str], list[str]]:
    """The columns both sides have values for (a column missing on one side cannot drift)."""

    def present(rows, column):
        return sum(r.get(column) is not None for r in rows) >= max(1, len(rows) // 2)

    numeric = [c for c in NUMERIC if present(reference, c) and present(current, c)]
    categorical = [c for c in CATEGORICAL if present(reference, c) and present(current, c)]
    return numeric, categorical


def check_drift(reference: dict, current: list[dict], drift_share: float, out_dir: str | Path) -> dict:
    """Evidently's drift report of `current` (log entries) against the reference profile: drift.html and
    drift.json in `out_dir`, and the summary returned (drifted or not, the share of drifted columns, each
    column's p-value)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref_rows = reference["rows"]
    if not ref_rows or not current:
        raise DriftError(f"nothing to compare: {len(ref_rows)} reference rows, {len(current)} logged verdicts")
    numeric, categorical = comparable_columns(ref_rows, current)
    if not numeric and not categorical:
        raise DriftError("the reference profile and the log share no column to compare")
    columns = numeric + categorical
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    snapshot = Report([DataDriftPreset(drift_share=drift_share)]).run(
        current_data=Dataset.from_pandas(_frame(current, columns), data_definition=definition),
        reference_data=Dataset.from_pandas(_frame(ref_rows, columns), data_definition=definition),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / "drift.html"))
    report = snapshot.dict()
    atomic_write_text(out_dir / "drift.json", json.dumps(report, default=str, indent=1))
    share, per_column = None, {}
    for metric in report["metrics"]:
        name, value = metric["metric_name"], metric["value"]
        if name.startswith("DriftedColumnsCount"):
            share = float(value["share"])
        elif name.startswith("ValueDrift"):
            column = metric["config"]["column"]
            threshold = float(metric["config"].get("threshold", 0.05))
            per_column[column] = {"p_value": float(value), "drifted": float(value) < threshold}
    if share is None:
        raise DriftError("Evidently's report has no drifted-columns share (another Evidently version?)")
    summary = {
        "drifted": share >= drift_share,
        "drift_share": round(share, 6),
        "threshold": drift_share,
        "columns": per_column,
        "n_reference": len(ref_rows),
        "n_current": len(current),
        "current_fake_rate": round(float(np.mean([r.get("verdict") == "fake" for r in current])), 6),
        "reference_fake_rate": round(float(np.mean([r.get("verdict") == "fake" for r in ref_rows])), 6),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
