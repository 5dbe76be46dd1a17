"""The `dfdetect` command line: a thin layer over the library, one command per pipeline step."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import ParamsError, load_params

app = typer.Typer(
    help="Train, evaluate and use deepfake image detectors. Every step reads params.yaml (see README).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
log = logging.getLogger("dfdetect")

PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file (typed schema; see README).")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _params(path: Path):
    try:
        return load_params(path)
    except ParamsError as exc:
        _fail(str(exc))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")):
    _setup_logging(verbose)


@app.command("sample-data")
def sample_data_cmd(
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Folder to write {train,val,test}/{real,fake}/*.jpg into."),
    params_path: Path = PARAMS_OPT,
):
    """Generate the embedded synthetic face-swap data set (deterministic for a given seed and size)."""
    from .sample_data import generate

    params = _params(params_path)
    counts = generate(out, params.sample_data.per_class, params.sample_data.image_size, params.seed)
    typer.echo(json.dumps(counts))


@app.command()
def prepare(
    data: Path = typer.Option(Path("data"), "--data", "-d", help="Data set root in the layout {train,val,test}/{real,fake}/*."),
    out: Path = typer.Option(Path("prepared"), "--out", "-o", help="Folder for manifest.csv, report.md/json and the image cache."),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Processes decoding images."),
    params_path: Path = PARAMS_OPT,
):
    """Validate the data set, write its manifest and report, and decode and resize it once into a cache."""
    from .data import DatasetError
    from .prepare import prepare as run_prepare

    params = _params(params_path)
    try:
        report = run_prepare(data, out, params.prepare, workers=workers)
    except DatasetError as exc:
        _fail(str(exc))
    typer.echo((out / "report.md").read_text())
    if report["notes"]:
        log.warning("; ".join(report["notes"]))


@app.command()
def train(
    prepared: Path = typer.Option(Path("prepared"), "--prepared", help="Output folder of `dfdetect prepare`."),
    models: Path = typer.Option(Path("models"), "--models", help="Where best.pt, last.pt and summary.json go."),
    history: Path = typer.Option(Path("train/history.csv"), "--history", help="Per-epoch curves (DVC plots)."),
    metrics: Path = typer.Option(Path("train/metrics.json"), "--metrics", help="Validation metrics of the best epoch (DVC metrics)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint (e.g. models/last.pt) to continue from; params must match."),
    stop_after_epochs: Optional[int] = typer.Option(None, "--stop-after-epochs", min=1,
                                                   help="End this invocation after N epochs (preemptible jobs); continue with --resume."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not track the run in MLflow."),
    params_path: Path = PARAMS_OPT,
):
    """Train the model named in params.yaml; tracks params, curves and the model in MLflow."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .models import ModelError
    from .train import TrainError
    from .train import train as run_train

    params = _params(params_path)
    try:
        result = run_train(params, prepared, models, history, metrics, resume, stop_after_epochs, track=not no_mlflow)
    except (DatasetError, ModelError, CheckpointError, TrainError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result.__dict__))


@app.command()
def evaluate(
    prepared: Path = typer.Option(Path("prepared"), "--prepared", help="Output folder of `dfdetect prepare`."),
    models: Path = typer.Option(Path("models"), "--models", help="Folder with best.pt and summary.json from `dfdetect train`."),
    out: Path = typer.Option(Path("eval"), "--out", "-o", help="Report, predictions and PNG figures."),
    metrics: Path = typer.Option(Path("eval/metrics.json"), "--metrics", help="Metrics file (DVC metrics)."),
    plots: Path = typer.Option(Path("eval/plots"), "--plots", help="roc.csv, pr.csv, confusion.csv (DVC plots)."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to the training run in MLflow."),
    params_path: Path = PARAMS_OPT,
):
    """Score the best checkpoint on the test split (val when there is none) and write metrics and plots."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .evaluate import evaluate as run_evaluate

    params = _params(params_path)
    try:
        result = run_evaluate(params, prepared, models, out, metrics, plots, track=not no_mlflow)
    except (DatasetError, CheckpointError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result, indent=2))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    checkpoint: Optional[Path] = typer.Option(Path("models/best.pt"), "--checkpoint", "-c", help="A dfdetect checkpoint."),
    model_uri: Optional[str] = typer.Option(None, "--model-uri", help="An MLflow model URI (runs:/ID/model, models:/NAME@alias); overrides --checkpoint."),
):
    """Classify images as real or fake; prints one JSON line per image."""
    from .inference import Predictor
    from .preprocessing import ImageError, decode_image

    try:
        predictor = Predictor.from_mlflow(model_uri) if model_uri else Predictor.from_checkpoint(checkpoint)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    for path in images:
        try:
            img = decode_image(path.read_bytes(), str(path))
        except (ImageError, OSError) as exc:
            typer.echo(json.dumps({"path": str(path), "error": str(exc)}))
            continue
        v = predictor.verdicts([img])[0]
        typer.echo(json.dumps({"path": str(path), "label": v.label, "fake_probability": round(v.fake_probability, 6),
                               "threshold": round(v.threshold, 6)}))


@app.command("models")
def list_models():
    """List the architectures in the model registry."""
    from .models import available_models

    for name in available_models():
        typer.echo(name)


@app.command("check-params")
def check_params(params_path: Path = PARAMS_OPT):
    """Validate params.yaml against the schema and print the effective values."""
    typer.echo(json.dumps(_params(params_path).model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()
