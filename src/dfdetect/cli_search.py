"""`dfdetect tune`, `tune-trial`, `distill` and `prune`: searching for a better recipe and making a trained
model cheaper (dfdetect.tune, dfdetect.distill, dfdetect.pruning). Each writes its models like `dfdetect train`
does, so `dfdetect evaluate`, `register` and `promote` take them as they are."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from .cli_common import PARAMS_OPT, fail, params_or_fail

PREPARED_OPT = typer.Option(Path("prepared"), "--prepared", help="Output folder of `dfdetect prepare`.")
SET_OPT = typer.Option(
    [], "--set", "-S", help="KEY=VALUE over params.yaml for this run, e.g. model.name=custom_cnn (repeatable)."
)
NO_MLFLOW_OPT = typer.Option(False, "--no-mlflow", help="Do not track the run in MLflow.")
HISTORY_OPT = typer.Option(None, "--history", help="Per-epoch curves of the run (CSV).")
METRICS_OPT = typer.Option(None, "--metrics", help="Validation metrics of the best epoch (JSON).")


def _params(path: Path, overrides: list[str]):
    from .config import ParamsError
    from .overrides import apply_overrides

    params = params_or_fail(path)
    try:
        return apply_overrides(params, overrides) if overrides else params
    except ParamsError as exc:
        fail(str(exc))


def _training_errors():
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .models import ModelError
    from .registry import RegistryError
    from .tracking import TrackingError
    from .train import TrainError

    return (DatasetError, ModelError, CheckpointError, TrainError, TrackingError, RegistryError)


def _terminate_as_interrupt(*_):
    raise KeyboardInterrupt  # a pod's SIGTERM ends the running trial as failed, as Ctrl-C does


def tune_command(
    trials: int = typer.Option(
        ...,
        "--trials",
        "-n",
        min=1,
        help="Finished (complete or pruned) trials the study should hold; a resumed study only runs the missing ones. "
        "Sampled values that make no valid recipe are skipped and not counted.",
    ),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0.1, help="Minutes after which no trial starts (a running one finishes)."
    ),
    prepared: Path = PREPARED_OPT,
    out: Path = typer.Option(Path("tune"), "--out", "-o", help="Folder for study.json and trials.csv."),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        envvar="DFDETECT_TUNE_STORAGE",
        help="Optuna storage URL (postgresql+psycopg2://user@host/db or sqlite:///file); default: tune.storage "
        "(null: beside a database tracking URI, else sqlite:///optuna.db).",
    ),
    write_params: bool = typer.Option(
        False, "--write-params", help="Write the best trial's values into --params (comments kept); then `dvc exp run`."
    ),
    no_mlflow: bool = NO_MLFLOW_OPT,
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes that crop faces of suite sets."),
    overrides: list[str] = SET_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Search tune.space with Optuna: each trial trains on the prepared data and reports its validation ROC-AUC
    per epoch (the median pruner stops poor trials); tune.objective picks val_auc or its mean with the suite's
    ROC-AUCs. Each trial is an MLflow run nested under the study's run. Run the same command in more processes
    or pods on one --storage to share the work; run it again to resume."""
    from .config import ParamsError
    from .tune import TuneError, tune, write_best_params

    params = _params(params_path, overrides)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        summary = tune(params, prepared, out, trials, timeout, storage, track=not no_mlflow, workers=workers)
    except (*_training_errors(), TuneError, ParamsError) as exc:
        fail(str(exc))
    if write_params:
        if not summary["best"]:
            fail("no trial completed: nothing to write")
        write_best_params(params_path, summary["best"]["params"])
        typer.secho(f"wrote trial {summary['best']['number']}'s values into {params_path}", err=True)
    brief = {k: summary[k] for k in ("study", "storage", "objective", "best", "baseline", "best_beats_baseline")}
    counts = {k: summary[k] for k in ("finished", "skipped")}
    typer.echo(json.dumps({**brief, **counts, "dvc_exp_run": summary["dvc_exp_run"]}, indent=2))


def tune_trial_command(
    prepared: Path = PREPARED_OPT,
    overrides: list[str] = SET_OPT,
    params_path: Path = PARAMS_OPT,
):
    """One trial with the --set values, for a tuner outside (a Katib Experiment): prints `val_auc=...` after
    each epoch, then the shipped model's `val_auc=...` (after a WiSE-FT mix, not the best epoch's) and
    `objective=...` at the end: the lines Katib's StdOut metrics collector reads (its val_auc strategy is
    `latest`, so the trial is ranked by the model it would register)."""
    from .tune import run_trial

    params = _params(params_path, overrides)

    def report(epoch, row):
        _metric_line(f"epoch={epoch} val_auc={row['val_auc']:.6f} val_loss={row['val_loss']:.6f}")

    try:
        result = run_trial(params, prepared, report)
    except _training_errors() as exc:
        fail(str(exc))
    _metric_line(f"val_auc={result.val_auc:.6f}")
    _metric_line(f"objective={result.value:.6f}")


def _metric_line(metrics: str) -> None:
    """One line for Katib's StdOut collector, led by its UTC time (RFC 3339): the collector orders a trial's
    values by that time, and gives every line without one the same zero time, so `latest` would be any line."""
    typer.echo(f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {metrics}")


def distill_command(
    teacher: list[str] = typer.Option(
        [],
        "--teacher",
        "-t",
        help="Registry alias/version or checkpoint to learn from (repeatable: their mean "
        "P(fake)); default: distill.teachers.",
    ),
    prepared: Path = PREPARED_OPT,
    models: Path = typer.Option(Path("models"), "--models", help="Where the student's best.pt and summary.json go."),
    history: Optional[Path] = HISTORY_OPT,
    metrics: Optional[Path] = METRICS_OPT,
    no_mlflow: bool = NO_MLFLOW_OPT,
    overrides: list[str] = SET_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Train params' model (the student; e.g. --set model.name=custom_cnn) on its labels and on the teachers'
    soft P(fake): loss = (1 - distill.alpha) x BCE(labels) + distill.alpha x T^2 x BCE(soft, at T =
    distill.temperature). A normal run: evaluate, register and promote it like any challenger."""
    from .distill import distill

    params = _params(params_path, overrides)
    if teacher:
        params = params.model_copy(update={"distill": params.distill.model_copy(update={"teachers": list(teacher)})})
    if not params.distill.teachers:
        fail("no teacher: pass --teacher champion (or a checkpoint), or set distill.teachers")
    try:
        result = distill(params, prepared, models, history, metrics, track=not no_mlflow)
    except (*_training_errors(), ValueError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result.__dict__))


def prune_command(
    checkpoint: Optional[Path] = typer.Option(
        Path("models/best.pt"), "--checkpoint", "-c", help="The trained model to prune."
    ),
    model_ref: Optional[str] = typer.Option(
        None, "--model", help="A registry alias or version instead of --checkpoint (e.g. champion)."
    ),
    speedup: float = typer.Option(2.0, "--speedup", min=1.01, help="Cut multiply-accumulates by this factor."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Fine-tuning epochs after pruning."),
    prepared: Path = PREPARED_OPT,
    models: Path = typer.Option(Path("models_pruned"), "--models", help="Where the pruned best.pt goes."),
    history: Optional[Path] = HISTORY_OPT,
    metrics: Optional[Path] = METRICS_OPT,
    no_mlflow: bool = NO_MLFLOW_OPT,
    overrides: list[str] = SET_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Remove whole channels (torch-pruning, L2 magnitude) until the model's multiply-accumulates fall by
    --speedup, fine-tune for --epochs with params' train recipe (e.g. --set train.lr=0.0001), recalibrate, and
    write it as a training run does: it exports to ONNX, registers and serves like any model."""
    from .model_source import load_trained
    from .pruning import PruneError, prune

    params = _params(params_path, overrides)
    params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})
    try:
        trained, source = load_trained(model_ref or checkpoint, params)
        result = prune(params, trained, source, speedup, prepared, models, history, metrics, track=not no_mlflow)
    except (*_training_errors(), PruneError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result.__dict__))
