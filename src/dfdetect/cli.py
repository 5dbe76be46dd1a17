"""The `dfdetect` command line: a thin layer over the library, one command per pipeline step."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_common import PARAMS_OPT
from .cli_common import fail as _fail
from .cli_common import params_or_fail as _params

app = typer.Typer(
    help="Train, evaluate and use deepfake image detectors. Every step reads params.yaml (see README).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("dfdetect")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")):
    _setup_logging(verbose)


@app.command("sample-data")
def sample_data_cmd(
    out: Path = typer.Option(
        Path("data"), "--out", "-o", help="Folder to write {train,val,test}/{real,fake}/*.jpg into."
    ),
    params_path: Path = PARAMS_OPT,
):
    """Generate the embedded synthetic face-swap data set (deterministic for a given seed and size)."""
    from .sample_data import generate

    params = _params(params_path)
    counts = generate(out, params.sample_data.per_class, params.sample_data.image_size, params.seed)
    typer.echo(json.dumps(counts))


@app.command("fetch-data")
def fetch_data_cmd(
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Folder to write the data set into."),
    repo: str = typer.Option(
        ".", "--repo", help="Git URL or path of the project whose data.dvc names the data version."
    ),
    rev: str = typer.Option("HEAD", "--rev", help="Git revision (commit, tag, branch) of that data version."),
    path: str = typer.Option("data", "--path", help="The DVC-tracked path inside the repository."),
    remote_url: str = typer.Option(
        "",
        "--remote-url",
        help="Read from this DVC remote instead of the repository's default "
        "(e.g. s3://dvc/dfdetect); S3 credentials from AWS_* variables.",
    ),
    endpoint_url: str = typer.Option(
        "",
        "--endpoint-url",
        envvar="DVC_S3_ENDPOINT_URL",
        help="S3 endpoint of --remote-url, for MinIO or another S3 server (env DVC_S3_ENDPOINT_URL).",
    ),
):
    """Download one data version from the DVC remote without a checkout (what containers and pipeline steps do)."""
    from .data_fetch import fetch_data

    try:
        fetch_data("dvc", repo, rev, out, path, remote_url=remote_url, endpoint_url=endpoint_url)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    files = sum(1 for f in out.rglob("*") if f.is_file())
    typer.echo(json.dumps({"out": str(out), "files": files, "repo": repo, "rev": rev}))


@app.command()
def prepare(
    data: Path = typer.Option(
        Path("data"), "--data", "-d", help="Data set root in the layout {train,val,test}/{real,fake}/*."
    ),
    out: Path = typer.Option(
        Path("prepared"), "--out", "-o", help="Folder for manifest.csv, report.md/json and the image cache."
    ),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Processes decoding images."),
    params_path: Path = PARAMS_OPT,
):
    """Validate the data set, write its manifest and report, and decode and resize it once into a cache."""
    from .data import DatasetError
    from .faces import FaceError
    from .prepare import prepare as run_prepare

    params = _params(params_path)
    try:
        report = run_prepare(data, out, params.prepare, workers=workers)
    except (DatasetError, FaceError) as exc:  # FaceError: the face detector or its model is not available
        _fail(str(exc))
    except OSError as exc:  # e.g. writing the output: a clear line, not a traceback
        _fail(f"{exc.filename or out}: {exc.strerror or exc}")
    typer.echo((out / "report.md").read_text())
    if report["notes"]:
        log.warning("; ".join(report["notes"]))


@app.command()
def train(
    prepared: Path = typer.Option(Path("prepared"), "--prepared", help="Output folder of `dfdetect prepare`."),
    models: Path = typer.Option(Path("models"), "--models", help="Where best.pt, last.pt and summary.json go."),
    history: Path = typer.Option(Path("train/history.csv"), "--history", help="Per-epoch curves (DVC plots)."),
    metrics: Path = typer.Option(
        Path("train/metrics.json"), "--metrics", help="Validation metrics of the best epoch (DVC metrics)."
    ),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Checkpoint (e.g. models/last.pt) to continue from; params must match."
    ),
    stop_after_epochs: Optional[int] = typer.Option(
        None,
        "--stop-after-epochs",
        min=1,
        help="End this invocation after N epochs (preemptible jobs); continue with --resume.",
    ),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not track the run in MLflow."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Data-parallel processes on this machine (torchrun; gloo on CPU, "
        "NCCL on GPUs); train.batch_size is the global batch.",
    ),
    params_path: Path = PARAMS_OPT,
):
    """Train the model named in params.yaml; tracks params, curves and the model in MLflow."""
    import os

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        args = [
            "train",
            "--prepared",
            str(prepared),
            "--models",
            str(models),
            "--history",
            str(history),
            "--metrics",
            str(metrics),
            "--params",
            str(params_path),
        ]
        args += ["--resume", str(resume)] if resume else []
        args += ["--stop-after-epochs", str(stop_after_epochs)] if stop_after_epochs else []
        args += ["--no-mlflow"] if no_mlflow else []
        raise typer.Exit(code=launch(nproc, args))
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .models import ModelError
    from .tracking import TrackingError
    from .train import TrainError
    from .train import train as run_train

    params = _params(params_path)
    try:
        result = run_train(params, prepared, models, history, metrics, resume, stop_after_epochs, track=not no_mlflow)
    except (DatasetError, ModelError, CheckpointError, TrainError, TrackingError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":  # one summary line, from the process that wrote the outputs
        typer.echo(json.dumps(result.__dict__))


@app.command()
def evaluate(
    prepared: Path = typer.Option(Path("prepared"), "--prepared", help="Output folder of `dfdetect prepare`."),
    models: Path = typer.Option(
        Path("models"), "--models", help="Folder with best.pt and summary.json from `dfdetect train`."
    ),
    out: Path = typer.Option(Path("eval"), "--out", "-o", help="Report, predictions and PNG figures."),
    metrics: Path = typer.Option(Path("eval/metrics.json"), "--metrics", help="Metrics file (DVC metrics)."),
    plots: Path = typer.Option(Path("eval/plots"), "--plots", help="roc.csv, pr.csv, confusion.csv (DVC plots)."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to the training run in MLflow."),
    dataset: list[Path] = typer.Option(
        [],
        "--dataset",
        help="Another data set in the seed layout (its test split, or "
        "every split, or {real,fake}/ alone) to score beside evaluate.datasets; "
        "repeatable; one table in the report. Its stills are face-cropped with "
        "--face-crop (or prepare.faces.crop_images); videos always are.",
    ),
    face_crop: bool = typer.Option(
        False,
        "--face-crop",
        help="Crop the largest face of the --dataset sets' stills "
        "(whole photos, portraits) with the model's own framing, as training cropped faces.",
    ),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes that crop faces of the suite's sets."),
    params_path: Path = PARAMS_OPT,
):
    """Score the best checkpoint on the test split (val when there is none) and write metrics and plots; with
    evaluate.robustness, the same under JPEG/blur/downscale; with evaluate.datasets and --dataset, the
    generalisation suite (every set at the validation threshold, in one table)."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .evaluate import evaluate as run_evaluate
    from .tracking import TrackingError

    params = _params(params_path)
    try:
        result = run_evaluate(
            params,
            prepared,
            models,
            out,
            metrics,
            plots,
            track=not no_mlflow,
            datasets=dataset,
            workers=workers,
            face_crop=face_crop,
        )
    except (DatasetError, CheckpointError, ValueError, TrackingError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result, indent=2))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    checkpoint: Optional[Path] = typer.Option(
        Path("models/best.pt"), "--checkpoint", "-c", help="A dfdetect checkpoint."
    ),
    model_uri: Optional[str] = typer.Option(
        None, "--model-uri", help="An MLflow model URI (runs:/ID/model, models:/NAME@alias); overrides --checkpoint."
    ),
    content_credentials: bool = typer.Option(
        True,
        "--content-credentials/--no-content-credentials",
        help="Also check each file for a C2PA manifest and print what it declares (`provenance`: signature "
        "valid or not, signer, AI generation declared or not), beside the model's P(fake), never instead of it.",
    ),
):
    """Classify images as real or fake; prints one JSON line per image. Exits 1 if any input failed
    (each is named on stderr)."""
    from .inference import Predictor
    from .io_utils import read_regular_file
    from .preprocessing import ImageError, decode_image
    from .provenance import check_content_credentials

    try:
        predictor = Predictor.from_mlflow(model_uri) if model_uri else Predictor.from_checkpoint(checkpoint)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    failed = 0
    for path in images:
        try:  # a FIFO, device or folder is refused before it is opened: reading a FIFO would hang
            data = read_regular_file(path)
            img = decode_image(data, str(path))
        except (ImageError, OSError) as exc:
            failed += 1
            typer.echo(json.dumps({"path": str(path), "error": str(exc)}))
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            continue
        v = predictor.verdicts([img])[0]
        typer.echo(
            json.dumps(
                {
                    "path": str(path),
                    "label": v.label,
                    "fake_probability": round(v.fake_probability, 6),
                    "threshold": round(v.threshold, 6),
                    **({"provenance": check_content_credentials(data, decodes=True)} if content_credentials else {}),
                }
            )
        )
    if failed:  # a script must not take "every input failed" for success
        typer.secho(f"error: {failed} of {len(images)} inputs failed", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command()
def explain(
    image: Path = typer.Argument(..., help="The image to explain."),
    checkpoint: Path = typer.Option(Path("models/best.pt"), "--checkpoint", "-c", help="A dfdetect checkpoint."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Where to write the PNG overlay; default IMAGE.gradcam.png."
    ),
    face_crop: bool = typer.Option(
        False, "--face-crop", help="Explain the largest face (prepare.faces settings), as serving.face_crop does."
    ),
    params_path: Path = PARAMS_OPT,
):
    """Grad-CAM heatmap: which regions made the model call the image fake, as a PNG overlay."""
    import numpy as np
    from PIL import Image

    from .artifact import TrainedModel
    from .checkpoint import CheckpointError
    from .explain import explain_image
    from .io_utils import atomic_write_bytes
    from .preprocessing import ImageError, decode_image

    try:
        trained = TrainedModel.load(checkpoint)
        img = decode_image(image.read_bytes(), str(image))
    except (OSError, ImageError, CheckpointError) as exc:
        _fail(str(exc))
    if face_crop:
        from .faces import FaceCropper

        margin = trained.preprocess.face_margin
        found = FaceCropper(_params(params_path).prepare.faces, lambda: margin)(np.asarray(img))
        if found is None:
            _fail(f"{image}: no face found (--face-crop)")
        img = Image.fromarray(found[0])
    result = explain_image(trained.module, trained.preprocess, img)
    out = out or image.with_name(image.name + ".gradcam.png")
    buf = __import__("io").BytesIO()
    Image.fromarray(result["overlay"]).save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    p = result["fake_probability"]
    threshold = trained.threshold
    typer.echo(
        json.dumps(
            {
                "image": str(image),
                "out": str(out),
                "fake_probability": round(p, 6),
                "verdict": "fake" if p >= threshold else "real",
                "threshold": threshold,
            }
        )
    )


@app.command("export")
def export_cmd(
    checkpoint: Optional[Path] = typer.Option(
        Path("models/best.pt"), "--checkpoint", "-c", help="A dfdetect checkpoint."
    ),
    model_ref: Optional[str] = typer.Option(
        None, "--model", help="A registry alias or version instead of --checkpoint (e.g. champion)."
    ),
    out: Path = typer.Option(
        Path("exports"),
        "--out",
        "-o",
        help="Folder for model.onnx, model.int8.onnx, model.int8-static.onnx and export.json.",
    ),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write a dynamically quantised int8 model."),
    int8_static: bool = typer.Option(
        False,
        "--int8-static",
        help="Also write a statically quantised int8 model (activation ranges from --calibration's images).",
    ),
    calibration: Path = typer.Option(
        Path("prepared"), "--calibration", help="Prepared data (`dfdetect prepare`) whose val split calibrates."
    ),
    calibration_images: int = typer.Option(
        256, "--calibration-images", min=1, help="How many of its images (a fixed sample of both classes)."
    ),
    params_path: Path = PARAMS_OPT,
):
    """Export to ONNX (fp32, int8; static int8 on request) and report each one's largest probability
    difference from eager PyTorch."""
    from .data import DatasetError
    from .export import calibration_images as calibration_batch
    from .export import export
    from .model_source import load_trained

    try:
        trained, source = load_trained(model_ref or checkpoint, _params(params_path))
        images = calibration_batch(calibration, trained.preprocess, calibration_images) if int8_static else None
    except (*_registry_errors(), DatasetError, ValueError) as exc:
        _fail(str(exc))
    report = export(trained.module, trained.preprocess, trained.threshold, out, int8, source, images)
    typer.echo(json.dumps(report, indent=2))


@app.command("package")
def package_cmd(
    bentofile: Path = typer.Option(Path("bentofile.yaml"), "--bentofile", help="The Bento build file."),
    version: Optional[str] = typer.Option(None, "--version", help="Bento version; default: BentoML's generated one."),
):
    """Build the Bento of the serving service (`bentoml build`), with the dfdetect wheel inside."""
    import shutil
    import subprocess
    import sys

    from . import __version__

    wheel = Path("dist") / f"dfdetect-{__version__}-py3-none-any.whl"
    steps = [
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", "dist", "."],
        [shutil.which("bentoml") or "bentoml", "build", "-f", str(bentofile), "--output", "tag"]
        + (["--version", version] if version else []),
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            _fail(f"{' '.join(cmd[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if not wheel.exists():
        _fail(f"{wheel}: the wheel was not built")
    typer.echo(done.stdout.strip().splitlines()[-1])


@app.command("architectures")
def list_architectures():
    """List the architectures in the model registry of dfdetect (for model.name)."""
    from .models import available_models

    for name in available_models():
        typer.echo(name)


def _registry_errors():
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .registry import RegistryError
    from .tracking import TrackingError

    return (RegistryError, TrackingError, DatasetError, CheckpointError)


@app.command()
def register(
    models: Path = typer.Option(
        Path("models"), "--models", help="Folder with summary.json (the training run) from `dfdetect train`."
    ),
    metrics: Path = typer.Option(
        Path("eval/metrics.json"), "--metrics", help="Metrics from `dfdetect evaluate`; become version tags."
    ),
    prepared: Path = typer.Option(
        Path("prepared"), "--prepared", help="Output of `dfdetect prepare` (counts for the model card)."
    ),
    out: Path = typer.Option(
        Path("registry/registration.json"), "--out", help="Where to write the registered name and version."
    ),
    params_path: Path = PARAMS_OPT,
):
    """Register the evaluated run's model as a new version and give it the alias `challenger`."""
    params = _params(params_path)
    from .registry import register as run_register

    try:
        result = run_register(params, models, metrics, prepared, out)
    except _registry_errors() as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result))


@app.command()
def promote(
    prepared: Path = typer.Option(
        Path("prepared"), "--prepared", help="The data both models are scored on (its test split)."
    ),
    out: Path = typer.Option(Path("registry"), "--out", help="Folder for promotion.json and promotion.md."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 1 when the gate rejects the challenger."),
    params_path: Path = PARAMS_OPT,
):
    """Re-score `champion` and `challenger` on the same data; move `champion` only if the gate in params passes."""
    params = _params(params_path)
    from .promotion import promote as run_promote

    try:
        report = run_promote(params, prepared, out)
    except _registry_errors() as exc:
        _fail(str(exc))
    typer.echo((out / "promotion.md").read_text())
    if strict and report["verdict"] == "rejected":
        raise typer.Exit(code=1)


@app.command()
def rollback(
    reason: str = typer.Option(..., "--reason", help="Why; recorded in the alias history and on the version."),
    params_path: Path = PARAMS_OPT,
):
    """Move `champion` back to the version the current champion replaced."""
    params = _params(params_path)
    from .registry import rollback as run_rollback

    try:
        typer.echo(json.dumps(run_rollback(params, reason)))
    except _registry_errors() as exc:
        _fail(str(exc))


models_app = typer.Typer(help="The registered versions in the MLflow model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    params_path: Path = PARAMS_OPT,
):
    """Versions, aliases, key metrics, and when and why each alias moved."""
    params = _params(params_path)
    from .registry import list_versions

    try:
        listing = list_versions(params)
    except _registry_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{listing['name']}")
    for col in ("version", "aliases", "created", "roc_auc", "eer", "status", "run"):
        table.add_column(col)
    for v in listing["versions"]:
        table.add_row(
            v["version"],
            ", ".join(v["aliases"]),
            v["created"],
            v["metrics"].get("roc_auc", "-"),
            v["metrics"].get("eer", "-"),
            v["status"],
            v["run_id"][:8],
        )
    history = Table(title="alias history")
    for col in ("at", "alias", "version", "from", "by", "reason"):
        history.add_column(col)
    for h in listing["history"]:
        history.add_row(h["at"], h["alias"], str(h["version"]), str(h.get("from") or "-"), h["by"], h.get("reason", ""))
    console = Console(width=200)
    console.print(table)
    console.print(history)


def _add_plugin_commands() -> None:
    """Command groups that other packages add through the `dfdetect.commands` entry point: `pipeline` lives
    with the Kubeflow pipelines, which import dfdetect, so dfdetect must not import them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="dfdetect.commands"):
        app.add_typer(entry.load(), name=entry.name)


_add_plugin_commands()


def _add_audit_commands() -> None:
    from .cli_audit import feedback_app, monitor_command, predictions_app

    app.add_typer(predictions_app, name="predictions")
    app.add_typer(feedback_app, name="feedback")
    app.command("monitor")(monitor_command)


_add_audit_commands()


def _add_search_commands() -> None:
    from .cli_search import distill_command, prune_command, tune_command, tune_trial_command

    app.command("tune")(tune_command)
    app.command("tune-trial")(tune_trial_command)
    app.command("distill")(distill_command)
    app.command("prune")(prune_command)


_add_search_commands()


def _interrupt(*_):
    raise KeyboardInterrupt


server_app = typer.Typer(
    help="Run the servers a team uses, on 127.0.0.1 (foreground; Ctrl-C stops them all).", no_args_is_help=True
)
app.add_typer(server_app, name="server")


@server_app.command("mlflow")
def server_mlflow(
    root: Path = typer.Option(Path(".servers"), "--root", help="Folder for the server's data, S3 buckets and logs."),
    port: int = typer.Option(5000, "--port", help="MLflow server port."),
    postgres: bool = typer.Option(
        False, "--postgres", help="Back the tracking server with PostgreSQL (started here) instead of SQLite."
    ),
    s3: bool = typer.Option(
        True,
        "--s3/--no-s3",
        help="Store artifacts in S3: starts `rclone serve s3` over ROOT/s3 unless --s3-endpoint is given.",
    ),
    s3_endpoint: Optional[str] = typer.Option(
        None, "--s3-endpoint", help="An existing S3 endpoint (MinIO, AWS); credentials from AWS_* variables."
    ),
    s3_port: int = typer.Option(9000, "--s3-port", help="Port of the local S3 endpoint."),
    bucket: str = typer.Option("mlflow", "--bucket", help="Artifact bucket."),
):
    """MLflow tracking server with SQLite or PostgreSQL and S3 artifacts (proxied: clients need no S3 keys)."""
    import os
    import signal
    import time

    from . import servers

    root = root.resolve()
    started: list = []
    try:
        env: dict = {}
        if s3 and not s3_endpoint:
            key = os.environ.get("AWS_ACCESS_KEY_ID", "dfdetect")
            secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "dfdetect-secret")
            started.append(
                servers.start_s3(root / "s3", key, secret, port=s3_port, buckets=(bucket, "dvc"), log_dir=root)
            )
            env = started[-1].env
            typer.echo(f"S3 endpoint {started[-1].url} over {root / 's3'} (buckets: {bucket}, dvc)")
        elif s3_endpoint:
            env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
        if postgres:
            started.append(servers.start_postgres(root / "postgres", log_dir=root))
            backend = started[-1].url
            typer.echo(f"PostgreSQL at {backend}")
        else:
            root.mkdir(parents=True, exist_ok=True)
            backend = f"sqlite:///{root / 'mlflow.db'}"
        artifacts = f"s3://{bucket}/artifacts" if s3 else str(root / "artifacts")
        started.append(servers.start_mlflow(backend, artifacts, port=port, env=env, log_dir=root))
        typer.echo(
            f"MLflow tracking server: {started[-1].url}  (export MLFLOW_TRACKING_URI={started[-1].url}); logs in {root}"
        )
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the servers as Ctrl-C does
        while all(s.proc.poll() is None for s in started):
            time.sleep(1)
        _fail("a server exited; see its log in " + str(root))
    except servers.ServerError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass
    finally:
        for server in reversed(started):
            server.stop()


@app.command("check-params")
def check_params(params_path: Path = PARAMS_OPT):
    """Validate params.yaml against the schema and print the effective values."""
    typer.echo(json.dumps(_params(params_path).model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()
