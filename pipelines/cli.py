"""`dfdetect pipeline ...`: compile, run and submit the Kubeflow pipeline.

It lives with the pipelines and reaches the `dfdetect` command through the `dfdetect.commands` entry point
(pyproject.toml), so the library never imports the pipelines that import it. KFP is imported inside the
commands: every other `dfdetect` command starts without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dfdetect.cli_common import PARAMS_OPT
from dfdetect.cli_common import fail as _fail
from dfdetect.cli_common import params_or_fail as _params
from dfdetect.config import ParamsError
from dfdetect.overrides import apply_overrides
from dfdetect.tracking import tracking_uri as default_uri

app = typer.Typer(
    help="The same pipeline as a Kubeflow Pipelines (v2) pipeline: compile, run locally, submit.", no_args_is_help=True
)
PACKAGE_OPT = typer.Option(
    None,
    "--package",
    help="The compiled pipeline YAML; default pipelines/deepfake_pipeline.yaml (with --monitor: "
    "pipelines/monitor_and_retrain.yaml).",
)
PARAM_OPT = typer.Option(
    [], "--param", help="Override a params.yaml value for this run, e.g. --param train.lr=0.0005 (repeatable)."
)


MONITOR_OPT = typer.Option(
    False,
    "--monitor",
    help="The monitor-and-retrain pipeline (pipelines/monitor_and_retrain.yaml) instead of training.",
)
LOG_OPT = typer.Option(
    None, "--prediction-log", help="With --monitor: the service's prediction log (a folder or s3://bucket/prefix)."
)


def _pipeline_args(params_path: Path, overrides: list[str], monitor: bool = False, **extra) -> dict:
    from .runner import arguments

    try:
        params = apply_overrides(_params(params_path), overrides)
    except ParamsError as exc:
        _fail(str(exc))
    if monitor and not extra.get("prediction_log"):
        _fail("--monitor needs --prediction-log (where the service logs its verdicts: serving.prediction_log)")
    if not monitor:
        extra.pop("prediction_log", None)
    return arguments(params, monitor, **extra)


def _package(package: Path | None, monitor: bool) -> Path:
    package = package or Path("pipelines/monitor_and_retrain.yaml" if monitor else "pipelines/deepfake_pipeline.yaml")
    if not package.exists():
        _fail(
            f"{package}: no compiled pipeline; run `dfdetect pipeline compile{' --monitor' if monitor else ''}` first"
        )
    return package


@app.command("compile")
def pipeline_compile(
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Where to write the IR YAML; default pipelines/deepfake_pipeline.yaml (with --monitor: "
        "pipelines/monitor_and_retrain.yaml).",
    ),
    image: Optional[str] = typer.Option(None, "--image", help="Container image of the components (built from infra/)."),
    monitor: bool = MONITOR_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Write the pipeline IR YAML that the Kubeflow UI uploads; parameter defaults come from params.yaml."""
    from .deepfake_pipeline import DEFAULT_IMAGE
    from .runner import COMPILED, COMPILED_MONITOR, compile_pipeline

    out = out or (COMPILED_MONITOR if monitor else COMPILED)
    typer.echo(str(compile_pipeline(_params(params_path), out, image or DEFAULT_IMAGE, monitor)))


@app.command("run")
def pipeline_run(
    local: bool = typer.Option(
        False, "--local", help="Run here with kfp.local's SubprocessRunner (no Docker, no cluster)."
    ),
    package: Optional[Path] = PACKAGE_OPT,
    data_source: str = typer.Option(
        "dvc", "--data-source", help="'dvc' (the DVC remote at --dvc-rev) or a data folder."
    ),
    dvc_repo: Path = typer.Option(Path("."), "--dvc-repo", help="Git repository whose data.dvc names the data."),
    dvc_rev: str = typer.Option("HEAD", "--dvc-rev", help="Git revision of the data version."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI for every step (default: as `dfdetect train`)."
    ),
    pipeline_root: Path = typer.Option(Path(".kfp"), "--pipeline-root", help="Where local runs keep their artifacts."),
    monitor: bool = MONITOR_OPT,
    prediction_log: Optional[str] = LOG_OPT,
    overrides: list[str] = PARAM_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Run the compiled pipeline on this machine, logging to MLflow; prints the run's outputs as JSON."""
    from .runner import PipelineError, run_local, run_outputs

    if not local:
        _fail("only --local runs here; use `dfdetect pipeline submit --host URL` for a cluster")
    package = _package(package, monitor)
    uri = tracking_uri or default_uri(_params(params_path))
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # tasks run in other folders
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    args = _pipeline_args(
        params_path,
        overrides,
        monitor,
        data_source=data_source,
        dvc_repo=str(dvc_repo.resolve()),
        dvc_rev=dvc_rev,
        tracking_uri=uri,
        prediction_log=prediction_log,
    )
    try:
        run_dir = run_local(package, args, pipeline_root)
    except PipelineError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(run_outputs(run_dir), indent=2))


@app.command("submit")
def pipeline_submit(
    host: str = typer.Option(
        ..., "--host", help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80."
    ),
    package: Optional[Path] = PACKAGE_OPT,
    experiment: str = typer.Option("dfdetect", "--experiment", help="KFP experiment (created if missing)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run name; default dfdetect-<timestamp>."),
    namespace: Optional[str] = typer.Option(
        None, "--namespace", help="Kubeflow profile namespace (multi-user clusters)."
    ),
    dvc_repo: str = typer.Option(
        "", "--dvc-repo", help="Git URL the cluster clones for data.dvc (data from the DVC remote)."
    ),
    dvc_rev: str = typer.Option("HEAD", "--dvc-rev", help="Git revision of the data version."),
    data_source: str = typer.Option("dvc", "--data-source", help="'dvc' or a folder the cluster's pods can read."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI reachable from the cluster."),
    monitor: bool = MONITOR_OPT,
    prediction_log: Optional[str] = LOG_OPT,
    overrides: list[str] = PARAM_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Upload the compiled pipeline and start a run on a Kubeflow cluster."""
    from .runner import PipelineError, submit

    package = _package(package, monitor)
    args = _pipeline_args(
        params_path,
        overrides,
        monitor,
        data_source=data_source,
        dvc_repo=dvc_repo,
        dvc_rev=dvc_rev,
        tracking_uri=tracking_uri,
        prediction_log=prediction_log,
    )
    try:
        typer.echo(json.dumps(submit(host, package, args, experiment, run_name, namespace)))
    except PipelineError as exc:
        _fail(str(exc))
