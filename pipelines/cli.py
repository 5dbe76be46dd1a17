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
PACKAGE_OPT = typer.Option(Path("pipelines/deepfake_pipeline.yaml"), "--package", help="The compiled pipeline YAML.")
PARAM_OPT = typer.Option(
    [], "--param", help="Override a params.yaml value for this run, e.g. --param train.lr=0.0005 (repeatable)."
)


def _pipeline_args(params_path: Path, overrides: list[str], **extra) -> dict:
    from .runner import arguments

    try:
        params = apply_overrides(_params(params_path), overrides)
    except ParamsError as exc:
        _fail(str(exc))
    return arguments(params, **extra)


@app.command("compile")
def pipeline_compile(
    out: Path = typer.Option(
        Path("pipelines/deepfake_pipeline.yaml"), "--out", "-o", help="Where to write the IR YAML."
    ),
    image: Optional[str] = typer.Option(None, "--image", help="Container image of the components (built from infra/)."),
    params_path: Path = PARAMS_OPT,
):
    """Write the pipeline IR YAML that the Kubeflow UI uploads; parameter defaults come from params.yaml."""
    from .deepfake_pipeline import DEFAULT_IMAGE
    from .runner import compile_pipeline

    typer.echo(str(compile_pipeline(_params(params_path), out, image or DEFAULT_IMAGE)))


@app.command("run")
def pipeline_run(
    local: bool = typer.Option(
        False, "--local", help="Run here with kfp.local's SubprocessRunner (no Docker, no cluster)."
    ),
    package: Path = PACKAGE_OPT,
    data_source: str = typer.Option(
        "dvc", "--data-source", help="'dvc' (the DVC remote at --dvc-rev) or a data folder."
    ),
    dvc_repo: Path = typer.Option(Path("."), "--dvc-repo", help="Git repository whose data.dvc names the data."),
    dvc_rev: str = typer.Option("HEAD", "--dvc-rev", help="Git revision of the data version."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI for every step (default: as `dfdetect train`)."
    ),
    pipeline_root: Path = typer.Option(Path(".kfp"), "--pipeline-root", help="Where local runs keep their artifacts."),
    overrides: list[str] = PARAM_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Run the compiled pipeline on this machine, logging to MLflow; prints the run's outputs as JSON."""
    from .runner import PipelineError, run_local, run_outputs

    if not local:
        _fail("only --local runs here; use `dfdetect pipeline submit --host URL` for a cluster")
    if not package.exists():
        _fail(f"{package}: no compiled pipeline; run `dfdetect pipeline compile` first")
    uri = tracking_uri or default_uri(_params(params_path))
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # tasks run in other folders
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    args = _pipeline_args(
        params_path,
        overrides,
        data_source=data_source,
        dvc_repo=str(dvc_repo.resolve()),
        dvc_rev=dvc_rev,
        tracking_uri=uri,
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
    package: Path = PACKAGE_OPT,
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
    overrides: list[str] = PARAM_OPT,
    params_path: Path = PARAMS_OPT,
):
    """Upload the compiled pipeline and start a run on a Kubeflow cluster."""
    from .runner import PipelineError, submit

    if not package.exists():
        _fail(f"{package}: no compiled pipeline; run `dfdetect pipeline compile` first")
    args = _pipeline_args(
        params_path, overrides, data_source=data_source, dvc_repo=dvc_repo, dvc_rev=dvc_rev, tracking_uri=tracking_uri
    )
    try:
        typer.echo(json.dumps(submit(host, package, args, experiment, run_name, namespace)))
    except PipelineError as exc:
        _fail(str(exc))
