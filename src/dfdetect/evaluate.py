"""`dfdetect evaluate`: score the trained model on the test split; metrics, plots and a report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from . import runtime, tracking
from .artifact import TrainedModel
from .config import EvaluateParams, Params, SuiteSet
from .data import DatasetError, PreparedSplit, batch_loader, load_meta, load_split, original_path
from .drift import embed, feature_layer, reference_profile
from .inference import predict_scores
from .io_utils import atomic_write_csv, atomic_write_json, atomic_write_text
from .labels import CLASS_NAMES
from .metrics import compute_all, eer_and_threshold, reliability, video_level
from .plots import confusion_png, group_rates_png, pr_png, reliability_png, robustness_png, roc_png
from .preprocessing import PreprocessConfig, decode_image
from .robustness import robustness_table
from .robustness import table_markdown as robustness_markdown
from .suite import flat_metrics, score_row, score_suite, table_markdown

log = logging.getLogger(__name__)


def choose_split(prepared_dir: Path, wanted: str) -> tuple[str, list[str]]:
    available = load_meta(prepared_dir)["splits"]
    if wanted in available:
        return wanted, []
    if wanted == "test" and "val" in available:
        return "val", [
            "the data set has no 'test' split: these metrics are on 'val', which also chose the "
            "best epoch and the threshold, so they are optimistic"
        ]
    raise ValueError(f"evaluate.split={wanted!r} is not in the prepared data (have {sorted(available)})")


def split_for(prepared_dir: Path, split: str, pre: PreprocessConfig) -> PreparedSplit:
    """The split as this model's preprocessing sees it: the cache when sizes agree, else the original files."""
    data = load_split(prepared_dir, split)
    if data.images.shape[1] == pre.image_size:
        return data
    log.info(
        "model expects %dpx, cache holds %dpx: decoding %d originals",
        pre.image_size,
        data.images.shape[1],
        len(data.relpaths),
    )
    arrays = [pre.square(decode_image(original_path(prepared_dir, rel).read_bytes(), rel)) for rel in data.relpaths]
    return PreparedSplit(np.stack(arrays), data.labels, data.relpaths, data.videos, data.datasets)


def suite_sets(params: Params, extra: list[str | Path] = (), face_crop: bool = False) -> list[SuiteSet]:
    """evaluate.datasets and the command line's --dataset paths (their stills face-cropped with `face_crop` or
    prepare.faces.crop_images)."""
    more = [SuiteSet(path=str(p), face_crop=face_crop or params.prepare.faces.crop_images) for p in extra]
    return list(EvaluateParams(datasets=[*params.evaluate.datasets, *more]).datasets)


def score_model(
    model, pre: PreprocessConfig, data: PreparedSplit, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, float]:
    """P(fake) of every image, in fp32 so that metrics do not depend on the machine's precision."""
    rt = runtime.resolve(device, "fp32", False)
    return predict_scores(model.to(rt.device), batch_loader(data, 128, shuffle=False), pre, rt)


def evaluate(
    params: Params,
    prepared_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    plots_dir: str | Path,
    track: bool = True,
    datasets: list[str | Path] = (),
    workers: int = 1,
    face_crop: bool = False,
) -> dict:
    """Metrics of the best checkpoint on the evaluation split, its plots and report; the robustness table and
    the table over `datasets` (and evaluate.datasets) when asked."""
    prepared_dir, model_dir, out_dir, plots_dir = Path(prepared_dir), Path(model_dir), Path(out_dir), Path(plots_dir)
    for spec in suite_sets(params, datasets, face_crop):  # a typo fails now, before any output is replaced
        if not Path(spec.path).is_dir():
            raise DatasetError(f"{spec.path}: data set folder of the suite set '{spec.label}' not found")
    trained = TrainedModel.load(model_dir / "best.pt")
    model, pre = trained.module, trained.preprocess
    split, notes = choose_split(prepared_dir, params.evaluate.split)
    data = split_for(prepared_dir, split, pre)
    scores, labels, loss = score_model(model, pre, data, params.train.device)

    threshold = trained.threshold if params.evaluate.threshold == "val" else float(params.evaluate.threshold)
    results = compute_all(labels, scores, threshold)
    results.update(
        {
            "loss": loss,
            "threshold": threshold,
            "eer_threshold": eer_and_threshold(labels, scores)[1],
            "fpr": float((scores[labels == 0] >= threshold).mean()) if (labels == 0).any() else float("nan"),
            "n_real": int((labels == 0).sum()),
            "n_fake": int((labels == 1).sum()),
        }
    )
    if len(set(data.groups)) < len(data.groups):  # frames of videos: also score whole videos
        v_labels, v_scores = video_level(data.groups, labels, scores)
        video = compute_all(v_labels, v_scores, threshold, ["roc_auc", "average_precision", "accuracy"])
        results.update({f"video_{k}": v for k, v in video.items()})
        results["n_videos"] = len(v_labels)
    metrics = {"split": split, **{k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}}
    # what the threshold is: the policy chosen on validation (its rates there), or the fixed evaluate.threshold
    metrics["operating_point"] = (
        trained.operating_point
        if params.evaluate.threshold == "val"
        else {"policy": "fixed (evaluate.threshold)", "threshold": threshold}
    )
    if notes:
        metrics["note"] = " ".join(notes)

    def score(split_data: PreparedSplit) -> np.ndarray:
        return score_model(model, pre, split_data, params.train.device)[0]

    # the suite is scored before any output is replaced: a set that fails leaves no half-new outputs
    sets = suite_sets(params, datasets, face_crop)
    suite = (
        score_suite(sets, score, pre.image_size, params.prepare.faces.with_margin(pre.face_margin), threshold, workers)
        if sets
        else {}
    )

    predicted = (scores >= threshold).astype(int)
    fpr, tpr, roc_thr = skm.roc_curve(labels, scores)
    prec, rec, _ = skm.precision_recall_curve(labels, scores)
    matrix = skm.confusion_matrix(labels, predicted, labels=[0, 1])
    plots_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(
        plots_dir / "roc.csv",
        [{"fpr": f, "tpr": t, "threshold": min(1.0, h)} for f, t, h in zip(fpr, tpr, roc_thr)],
        ["fpr", "tpr", "threshold"],
    )
    atomic_write_csv(
        plots_dir / "pr.csv", [{"recall": r, "precision": p} for r, p in zip(rec, prec)], ["recall", "precision"]
    )
    atomic_write_csv(
        plots_dir / "confusion.csv",
        [{"actual": CLASS_NAMES[a], "predicted": CLASS_NAMES[p]} for a, p in zip(labels, predicted)],
        ["actual", "predicted"],
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(
        out_dir / "predictions.csv",
        [
            {"path": p, "video": v, "label": int(y), "fake_probability": round(float(s), 6), "predicted": int(q)}
            for p, v, y, s, q in zip(data.relpaths, data.groups, labels, scores, predicted)
        ],
        ["path", "video", "label", "fake_probability", "predicted"],
    )
    figures = out_dir / "figures"
    roc_png(fpr, tpr, results["roc_auc"], figures / "roc.png")
    pr_png(rec, prec, results["average_precision"], figures / "pr.png")
    confusion_png(matrix, CLASS_NAMES, figures / "confusion.png")
    bins = reliability(labels, scores)
    atomic_write_csv(plots_dir / "calibration.csv", bins, ["bin", "predicted", "observed", "count"])
    reliability_png(bins, results["ece"], figures / "reliability.png")
    extra = ""

    if params.evaluate.robustness:
        table = robustness_table(score, data, threshold)
        metrics["robustness"] = {cond: row["roc_auc"] for cond, row in table.items()}
        atomic_write_json(out_dir / "robustness.json", table)
        robustness_png(table, figures / "robustness.png")
        extra += "\n" + robustness_markdown(f"Robustness ('{split}' split, threshold {threshold:.4f})", table)
    if data.datasets and len(set(data.datasets)) > 1:  # a mixture: the same split, per source
        names = np.asarray(data.datasets)
        metrics["sources"] = {
            name: score_row(
                labels[names == name],
                scores[names == name],
                threshold,
                [g for g, n in zip(data.groups, names) if n == name],
            )
            for name in sorted(set(data.datasets))
        }
        extra += "\n" + table_markdown(f"'{split}' split by source (threshold {threshold:.4f})", metrics["sources"])
    if suite:
        metrics["datasets"] = suite
        for name, row in suite.items():  # the fairness view of sets whose file names carry groups
            if row.get("groups"):
                group_rates_png(name, row["groups"], figures / f"groups_{name}.png")
        atomic_write_json(out_dir / "datasets.json", suite)
        extra += "\n" + table_markdown(f"Generalisation suite (threshold {threshold:.4f}, from validation)", suite)
    atomic_write_text(out_dir / "report.md", report_markdown(metrics, matrix, trained) + extra)
    # what the drift monitor compares the service's traffic with, logged with the model's run
    layer = feature_layer(model)
    profile = reference_profile(
        prepared_dir,
        data.relpaths,
        data.images,
        scores,
        threshold,
        lambda images: embed(model, images, pre, layer=layer),
        embedding_layer=layer,
    )
    atomic_write_json(out_dir / "reference_profile.json", profile)
    atomic_write_json(metrics_path, metrics)

    if track:
        log_to_mlflow(params, model_dir, metrics, out_dir)
    return metrics


def report_markdown(metrics: dict, matrix: np.ndarray, trained: TrainedModel) -> str:
    lines = [f"# Evaluation on '{metrics['split']}'", ""]
    if "note" in metrics:
        lines += [f"**Note:** {metrics['note']}", ""]
    lines += [
        f"Model `{trained.architecture}` from epoch {trained.provenance.get('best_epoch', '?')}; "
        f"{metrics['n_real']} real and {metrics['n_fake']} fake images; decision threshold {metrics['threshold']:.4f}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("roc_auc", "average_precision", "eer", "accuracy", "precision", "recall", "f1", "ece", "loss"):
        lines.append(f"| {key} | {metrics[key]:.4f} |")
    if "n_videos" in metrics:  # video level: the mean frame score of each of the n_videos videos
        lines += [
            f"| {key} ({metrics['n_videos']} videos) | {metrics[key]:.4f} |"
            for key in metrics
            if key.startswith("video_")
        ]
    lines += [
        "",
        "Confusion matrix (rows: actual, columns: predicted):",
        "",
        "| | real | fake |",
        "|---|---|---|",
        f"| real | {matrix[0, 0]} | {matrix[0, 1]} |",
        f"| fake | {matrix[1, 0]} | {matrix[1, 1]} |",
    ]
    return "\n".join(lines) + "\n"


def log_to_mlflow(params: Params, model_dir: Path, metrics: dict, out_dir: Path) -> None:
    summary_path = model_dir / "summary.json"
    run_id = json.loads(summary_path.read_text()).get("run_id") if summary_path.exists() else None
    mlflow = tracking.setup_mlflow(params)
    with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name="evaluate"):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for cond, auc in metrics.get("robustness", {}).items():
            mlflow.log_metric(f"robustness/{cond}/roc_auc", float(auc))
        mlflow.log_metrics(flat_metrics(metrics.get("datasets", {})))
        mlflow.log_metrics(flat_metrics(metrics.get("sources", {}), prefix="source"))
        mlflow.set_tag("dfdetect.eval_split", metrics["split"])
        mlflow.log_artifacts(str(out_dir / "figures"), artifact_path="evaluation")
        mlflow.log_artifact(str(out_dir / "report.md"), artifact_path="evaluation")
        mlflow.log_artifact(str(out_dir / "reference_profile.json"), artifact_path="evaluation")
