"""`dfdetect monitor`: the served version's traffic (a window of the prediction log) against the reference
profile stored with it at evaluation; Evidently's report and a verdict (drift or not, and whether the loop
should retrain: drift, or enough reviewed verdicts), logged to MLflow under the served version."""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from pathlib import Path

from .config import Params
from .drift import REFERENCE_ARTIFACT, DriftError, check_drift
from .io_utils import atomic_write_json
from .prediction_log import open_store, parse_time, read_entries, read_feedback

log = logging.getLogger(__name__)


def reference_of(client, run_id: str) -> dict:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, REFERENCE_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise DriftError(
                f"run {run_id} has no {REFERENCE_ARTIFACT}: evaluate the model with this dfdetect version first"
            ) from None
        return json.loads(Path(path).read_text())


def monitor(
    params: Params,
    log_uri: str,
    out_dir: str | Path,
    ref: str | None = None,
    since: str | None = None,
    until: str | None = None,
    track: bool = True,
) -> dict:
    """Compare, write `out_dir/summary.json` (and Evidently's drift.html/drift.json), log, return the summary."""
    from . import registry

    rule, out_dir = params.monitor, Path(out_dir)
    client = registry.client_for(params)
    name = params.registry.model_name
    mv = registry.get_version(client, name, ref or params.serving.alias)
    version = f"{name}/{mv.version}"
    now = dt.datetime.now(dt.timezone.utc)
    since = since or (now - dt.timedelta(hours=rule.window_hours)).isoformat()
    store = open_store(log_uri)
    current = list(read_entries(store, since, until, version))
    start, end = parse_time(since), parse_time(until) if until else now
    reviewed = [r for r in read_feedback(store).values() if start <= parse_time(r["time"]) <= end]
    summary: dict = {"model": name, "version": str(mv.version), "since": since, "until": until or now.isoformat()}
    if len(current) < rule.min_items:
        summary.update(drifted=False, note=f"{len(current)} verdicts logged: fewer than monitor.min_items")
        summary["n_current"] = len(current)
    else:
        reference = reference_of(client, mv.run_id)
        vectors = kept_embeddings(client, name, str(mv.version), store, current, reference)
        summary.update(check_drift(reference, current, rule.drift_share, out_dir, vectors))
    summary["reviewed"] = len(reviewed)
    summary["retrain"] = bool(summary["drifted"] or len(reviewed) >= rule.retrain_min_reviews)
    atomic_write_json(out_dir / "summary.json", summary)
    if track:
        summary["mlflow_run_id"] = _log(params, client, mv, summary, out_dir)
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def kept_embeddings(client, name: str, version: str, store, entries: list[dict], reference: dict):
    """The served model's embeddings of the window's kept images (serving.log_inputs), scored as the service
    saw them, at the layer `reference` was embedded at; None when no image was kept. Uploads the service
    face-cropped (a `face` in the entry) are left out: the log keeps the whole upload, not the crop."""
    import numpy as np

    from .drift import embed, reference_layer
    from .preprocessing import decode_image, resize_square
    from .registry import load_version

    kept = [e for e in entries if e.get("input") and not e.get("face")]
    if not kept:
        return None
    loaded = load_version(client, name, version)
    size, images = loaded.preprocess.image_size, []
    for entry in kept:
        try:
            images.append(resize_square(decode_image(store.get(entry["input"]), entry["input"]), size))
        except Exception as exc:  # a kept file gone or bad (folder or S3 errors alike): left out, and said
            log.warning("kept input %s left out of the embeddings: %s", entry["input"], exc)
    if not images:
        return None
    return embed(loaded.model, np.stack(images), loaded.preprocess, layer=reference_layer(reference, loaded.model))


def _log(params: Params, client, mv, summary: dict, out_dir: Path) -> str:
    """A run in the experiment '<mlflow.experiment>-monitor', tagged with the version; the version's tags point
    at the latest check."""
    from .tracking import setup_mlflow

    monitored = params.model_copy(
        update={"mlflow": params.mlflow.model_copy(update={"experiment": f"{params.mlflow.experiment}-monitor"})}
    )
    mlflow = setup_mlflow(monitored)
    with mlflow.start_run(run_name=f"monitor {mv.name} v{mv.version}") as run:
        mlflow.set_tags({"dfdetect.model_name": mv.name, "dfdetect.model_version": str(mv.version)})
        mlflow.log_params({"window_since": summary["since"], "window_until": summary["until"]})
        numbers = {k: float(summary[k]) for k in ("drift_share", "n_current", "reviewed") if k in summary}
        mlflow.log_metrics({**numbers, "drifted": float(summary["drifted"]), "retrain": float(summary["retrain"])})
        mlflow.log_artifacts(str(out_dir), artifact_path="monitor")
    for key, value in (
        ("monitor.drifted", summary["drifted"]),
        ("monitor.drift_share", summary.get("drift_share", "")),
        ("monitor.run_id", run.info.run_id),
        ("monitor.at", summary["until"]),
    ):
        client.set_model_version_tag(mv.name, str(mv.version), key, str(value))
    return run.info.run_id
