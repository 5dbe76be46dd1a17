"""Glue that orchestrators (the KFP components) share: params from pipeline parameters, data fetching,
and writing dfdetect's results into KFP's typed artifacts. The steps themselves stay in their modules."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import yaml

from .config import Params, ParamsError, parse_params

SECTIONS = ("seed", "sample_data", "prepare", "model", "train", "evaluate", "registry", "promotion", "mlflow")


def params_from(sections: dict) -> Params:
    """Params from pipeline parameters (sections as dicts); the same schema and errors as params.yaml."""
    return parse_params(sections, "pipeline parameters")


def pipeline_sections(params: Params) -> dict:
    """Params as KFP parameter values: KFP has no null, so unset (None) keys are left to the schema's defaults."""

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return drop_none(params.model_dump(mode="json"))


def use_tracking(tracking_uri: str) -> None:
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri


def apply_overrides(params: Params, overrides: list[str]) -> Params:
    """`train.lr=0.0005`-style overrides (values parsed as YAML), validated against the schema."""
    raw = params.model_dump(mode="json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--param {item!r}: expected KEY=VALUE, e.g. train.lr=0.0005")
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(
                    f"--param {key}: unknown parameter (no section {part!r}); sections are {list(SECTIONS)}"
                )
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return parse_params(raw, "--param overrides")


def fetch_data(
    source: str,
    dvc_repo: str,
    dvc_rev: str,
    dest: str | Path,
    path_in_repo: str = "data",
    remote_url: str = "",
    endpoint_url: str = "",
) -> None:
    """The data set: from the DVC remote at a git revision of `dvc_repo` (source 'dvc'), or from a folder.

    `remote_url` (and `endpoint_url`, for S3 servers such as MinIO) replace the repository's default remote,
    so a container reads the team's bucket while the repository names another; credentials come from the
    usual AWS variables.
    """
    dest = Path(dest)
    if source == "dvc":
        if not dvc_repo:
            raise ValueError("data_source is 'dvc' but dvc_repo is empty: give the git URL or path of the project")
        from dvc.api import DVCFileSystem

        config = None
        if remote_url:
            remote = {"url": remote_url, **({"endpointurl": endpoint_url} if endpoint_url else {})}
            config = {"core": {"remote": "fetch"}, "remote": {"fetch": remote}}
        fs = DVCFileSystem(url=dvc_repo, rev=dvc_rev or None, config=config)
        try:
            fs.get(path_in_repo, str(dest), recursive=True)
        except FileNotFoundError as exc:
            where = remote_url or "the repository's default remote"
            raise FileNotFoundError(
                f"{path_in_repo!r} of {dvc_repo}@{dvc_rev or 'HEAD'} is not in {where}: {exc}"
            ) from None
    else:
        if not Path(source).is_dir():
            raise ValueError(f"data_source {source!r}: not 'dvc' and not a folder")
        shutil.copytree(source, dest, dirs_exist_ok=True)


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
