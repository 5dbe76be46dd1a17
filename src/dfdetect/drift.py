"""Drift: do the uploads still look like the data the served model was evaluated on?

`evaluate` stores a reference profile with the model (`evaluation/reference_profile.json` in its MLflow run):
per image of the evaluated split, P(fake), the verdict at the model's threshold, the original width and height,
and the brightness of the model's input. The service logs the same columns for every upload
(dfdetect.prediction_log), plus the JPEG quality where it can be read. `check_drift` compares a window of the
log with the profile column by column with Evidently (Kolmogorov-Smirnov for numbers, a z-test for the verdict
rate) and calls it drift when at least `drift_share` of the columns moved. Where the service kept the images
(serving.log_inputs), the model's own embeddings count as one more column: a classifier that tells the
reference's embeddings from the window's (cross-validated ROC-AUC) is the test, as Evidently's model-based
embedding drift does."""

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
EMBEDDING_DIMS = 16  # the penultimate features, projected: small enough to store with the profile
EMBEDDING_AUC = 0.65  # a domain classifier this good at telling the two apart: the embeddings moved


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


def _scoring_layers(module) -> list[tuple[str, object]]:
    """(name, layer) of every layer that could be a model's scoring head: linear layers, else (a patch model)
    one-channel convolutions, in registration order."""
    from torch import nn

    named = list(module.named_modules())
    return [(n, m) for n, m in named if isinstance(m, nn.Linear)] or [
        (n, m) for n, m in named if isinstance(m, nn.Conv2d) and m.out_channels == 1
    ]


def feature_layer(module) -> str:
    """The name of the layer whose input is the model's embedding: the backbone's scoring head (`net`'s last one
    of a Detector), so an added branch's head (model.residual_branch) is never taken for the model's."""
    backbone = getattr(module, "net", None)
    if backbone is not None:
        return f"net.{_last_scoring_layer(backbone)}"
    return _last_scoring_layer(module)


def legacy_feature_layer(module) -> str:
    """The layer drift references written before `embedding_layer` was stored were embedded at: the last scoring
    layer of the whole model (a residual-branch model's branch head). Reading new windows there keeps them
    comparable with those references."""
    return _last_scoring_layer(module)


def reference_layer(reference: dict, module) -> str:
    """Where to embed a window compared with `reference`: the layer it names, else (a reference older than that
    field) where such references were embedded."""
    return reference.get("embedding_layer") or legacy_feature_layer(module)


def _last_scoring_layer(module) -> str:
    heads = _scoring_layers(module)
    if not heads:
        raise ValueError(f"{type(module).__name__} has no linear layer or one-channel convolution to read features at")
    return heads[-1][0]


def embed(module, images: np.ndarray, preprocess, batch_size: int = 64, layer: str | None = None) -> np.ndarray:
    """The model's penultimate features (the input of `layer`, by default `feature_layer(module)`: its scoring
    head; of a patch model, the input of its 1 x 1 scoring convolution averaged over the map) of N x S x S x 3
    uint8 images, projected to EMBEDDING_DIMS by a fixed random matrix (seeded by the feature width, so reference
    and window are projected alike without storing it)."""
    import torch

    from .preprocessing import normalize

    name = layer or feature_layer(module)
    try:
        head = module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(module).__name__} has no layer {name!r} to read features at") from None
    captured = []

    def keep(_module, args):
        features = args[0].detach().float()
        captured.append((features.mean(dim=(2, 3)) if features.dim() == 4 else features).cpu())

    hook = head.register_forward_pre_hook(keep)
    was_training, device = module.training, next(module.parameters()).device
    module.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
                before = len(captured)
                module(normalize(x.to(device), preprocess))
                del captured[before + 1 :]  # a model of several scales (model.scales): its first scale's features
    finally:
        hook.remove()
        module.train(was_training)
    features = torch.cat(captured).numpy().astype(np.float64)
    rng = np.random.default_rng(features.shape[1])
    projection = rng.normal(size=(features.shape[1], EMBEDDING_DIMS)) / np.sqrt(features.shape[1])
    return features @ projection


def embedding_drift(reference: np.ndarray, current: np.ndarray) -> dict:
    """Can a classifier tell the window's embeddings from the reference's? Cross-validated ROC-AUC of a logistic
    regression on equal numbers of each (0.5: indistinguishable); drift at EMBEDDING_AUC or more."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(reference), len(current))
    if n < 5:
        return {"classifier_auc": None, "drifted": False, "note": f"{n} embedded images: too few to judge"}
    rng = np.random.default_rng(0)
    x = np.vstack(
        [reference[rng.choice(len(reference), n, replace=False)], current[rng.choice(len(current), n, replace=False)]]
    )
    y = np.r_[np.zeros(n), np.ones(n)]
    folds = min(5, n)
    auc = float(
        np.mean(
            cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), x, y, cv=folds, scoring="roc_auc")
        )
    )
    return {"classifier_auc": round(auc, 6), "drifted": auc >= EMBEDDING_AUC, "n": n}


def reference_profile(
    prepared_dir: Path,
    relpaths: list[str],
    images: np.ndarray,
    scores,
    threshold: float,
    embeddings=None,
    embedding_layer: str | None = None,
) -> dict:
    """The evaluated split as the drift check's reference (at most MAX_REFERENCE_ROWS images, seeded sample);
    `embeddings(images) -> N x EMBEDDING_DIMS` adds the model's embeddings of the sampled images, read at
    `embedding_layer` (stored, so the monitor embeds the service's traffic at the same layer)."""
    sizes = {}
    manifest = Path(prepared_dir) / "manifest.csv"
    if manifest.exists():
        with manifest.open(newline="") as f:
            sizes = {r["path"]: (r.get("width"), r.get("height")) for r in csv.DictReader(f)}
    pick = np.arange(len(relpaths))
    if len(pick) > MAX_REFERENCE_ROWS:
        pick = np.sort(np.random.default_rng(0).choice(pick, MAX_REFERENCE_ROWS, replace=False))
    light = brightness(images[pick])
    vectors = embeddings(images[pick]) if embeddings else None
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
                **({"embedding": [round(float(v), 5) for v in vectors[k]]} if vectors is not None else {}),
            }
        )
    profile = {"threshold": float(threshold), "n": len(relpaths), "rows": rows}
    if vectors is not None and embedding_layer:
        profile["embedding_layer"] = embedding_layer
    return profile


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


def check_drift(
    reference: dict,
    current: list[dict],
    drift_share: float,
    out_dir: str | Path,
    current_embeddings: np.ndarray | None = None,
) -> dict:
    """Evidently's drift report of `current` (log entries) against the reference profile: drift.html and
    drift.json in `out_dir`, and the summary returned (drifted or not, the share of drifted columns, each
    column's p-value); with `current_embeddings` (of kept images) and a profile that has them, the embeddings
    count as one more column."""
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
    reference_embeddings = [r["embedding"] for r in ref_rows if r.get("embedding")]
    if current_embeddings is not None and len(current_embeddings) and reference_embeddings:
        moved = embedding_drift(np.asarray(reference_embeddings), np.asarray(current_embeddings))
        per_column["embeddings"] = moved
        if moved["classifier_auc"] is not None:  # one more column in the share
            share = (share * len(columns) + float(moved["drifted"])) / (len(columns) + 1)
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
