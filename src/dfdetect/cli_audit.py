"""`dfdetect predictions ...` and `dfdetect feedback ...`: the service's prediction log read back, and reviewed
items turned into a data set for training (dfdetect.prediction_log, dfdetect.feedback_export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_common import PARAMS_OPT, fail, params_or_fail

LOG_OPT = typer.Option(
    ..., "--log", help="Where the service writes its log (serving.prediction_log): a folder or s3://bucket/prefix."
)

predictions_app = typer.Typer(help="The service's prediction log (audit trail).", no_args_is_help=True)
feedback_app = typer.Typer(help="Reviewers' labels for logged verdicts.", no_args_is_help=True)


def monitor_command(
    log: str = LOG_OPT,
    out: Path = typer.Option(Path("monitor"), "--out", help="Folder for summary.json and Evidently's drift.html/json."),
    version: Optional[str] = typer.Option(None, help="The version (or alias) to check; default serving.alias."),
    since: Optional[str] = typer.Option(None, help="Window start (ISO 8601); default now - monitor.window_hours."),
    until: Optional[str] = typer.Option(None, help="Window end (ISO 8601); default now."),
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Log the check to MLflow under the version."),
    params_file: Path = PARAMS_OPT,
):
    """Is the served version's traffic drifting from what it was evaluated on? Compares a window of the prediction
    log with the reference profile stored with the model (P(fake), verdict rate, image size, brightness; JPEG
    quality where logged) with Evidently. Prints the summary; exit status 1 when the loop should retrain (drift,
    or at least monitor.retrain_min_reviews reviewed verdicts), 0 when not, 2 on an error."""
    from .drift import DriftError
    from .monitor import monitor
    from .registry import RegistryError

    params = params_or_fail(params_file)
    try:
        summary = monitor(params, log, out, version, since, until, track=mlflow)
    except (DriftError, RegistryError, ValueError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(summary, sort_keys=True))
    raise typer.Exit(code=1 if summary["retrain"] else 0)


@predictions_app.command("query")
def query(
    log: str = LOG_OPT,
    since: Optional[str] = typer.Option(None, help="Only verdicts at or after this time (ISO 8601; UTC if no zone)."),
    until: Optional[str] = typer.Option(None, help="Only verdicts at or before this time (ISO 8601)."),
    version: Optional[str] = typer.Option(None, help="Only this model version (`name/version` or the number)."),
):
    """Print the logged verdicts, one JSON line each (request id, time, endpoint, model version, P(fake),
    threshold, verdict, latency, image SHA-256 and size, face box; the kept image's name with log_inputs)."""
    from .prediction_log import open_store, read_entries

    try:
        for entry in read_entries(open_store(log), since, until, version):
            typer.echo(json.dumps(entry, sort_keys=True))
    except ValueError as exc:  # a malformed --since/--until
        fail(f"--since/--until: expected an ISO 8601 time such as 2026-12-03T08:00:00Z ({exc})")


@feedback_app.command("export")
def export(
    log: str = LOG_OPT,
    out: Path = typer.Option(..., "--out", help="The data set folder to write ({real,fake}/ and manifest.json)."),
    dvc: bool = typer.Option(
        False, "--dvc/--no-dvc", help="Then `dvc add` the folder and `dvc push` it to the configured remote."
    ),
):
    """Turn reviewed verdicts whose images were kept (serving.log_inputs) into a data set in the seed layout,
    labelled by the reviewers, with a manifest of the requests and reviewers it came from. A training mixture can
    then list it in prepare.sources."""
    from .feedback_export import ExportError, export_feedback

    try:
        manifest = export_feedback(log, out, dvc)
    except ExportError as exc:
        fail(str(exc))
    typer.echo(json.dumps({k: v for k, v in manifest.items() if k != "items"}))
