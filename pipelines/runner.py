"""Compile the pipeline to the YAML the Kubeflow UI uploads, run it here with kfp.local, or submit it to a cluster."""

from __future__ import annotations

import ast
import json
import re
import urllib.error
import urllib.request
import warnings
from datetime import datetime
from pathlib import Path

from dfdetect.config import Params
from dfdetect.overrides import pipeline_sections

from .deepfake_pipeline import DEFAULT_IMAGE, build_pipeline, min_roc_auc_to_register

COMPILED = Path(__file__).with_name("deepfake_pipeline.yaml")
COMPILED_MONITOR = Path(__file__).with_name("monitor_and_retrain.yaml")


class PipelineError(RuntimeError):
    pass


def compile_pipeline(
    params: Params, out: str | Path = COMPILED, image: str = DEFAULT_IMAGE, monitor: bool = False
) -> Path:
    """The training pipeline, or with `monitor` the monitor-and-retrain one, as the IR YAML the UI uploads."""
    from kfp import compiler

    from dfdetect.io_utils import atomic_write_text

    from .monitor_pipeline import build_monitor_pipeline

    out = Path(out)
    tmp = out.with_name(f".{out.name}.compiling.yaml")
    build = build_monitor_pipeline if monitor else build_pipeline
    compiler.Compiler().compile(build(params, image), str(tmp))
    atomic_write_text(out, stable_header(tmp.read_text()))
    tmp.unlink()
    return out


_HEADER_DEFAULT = re.compile(r"^(#\s+\w+: dict \[Default: )(\{.*\})(\])$")


def _sorted_keys(value):
    """`value` with every dict's keys in sorted order, however deep."""
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def stable_header(text: str) -> str:
    """The compiled YAML with its comment header's dict defaults in sorted key order. KFP writes them from a
    protobuf map, whose order changes from one compile to the next, so every compile rewrote those lines; the
    spec below the header is unchanged."""
    lines = []
    for line in text.split("\n"):
        match = _HEADER_DEFAULT.match(line)
        if match:
            line = f"{match[1]}{_sorted_keys(ast.literal_eval(match[2]))!r}{match[3]}"
        lines.append(line)
    return "\n".join(lines)


def arguments(params: Params, monitor: bool = False, **pipeline_args) -> dict:
    """Pipeline arguments: every params section the pipeline has, plus the data and tracking settings given."""
    args = pipeline_sections(params)
    # not parameters of the pipeline (monitor-and-retrain also reads the served alias and the monitor rule;
    # neither pipeline searches or compresses: tune and distill are dfdetect commands of their own)
    for section in (
        ("sample_data", "tune", "distill") if monitor else ("sample_data", "serving", "monitor", "tune", "distill")
    ):
        args.pop(section)
    args["register_min_roc_auc"] = min_roc_auc_to_register(params)
    return {**args, **{k: v for k, v in pipeline_args.items() if v is not None}}


def run_local(package: str | Path, args: dict, pipeline_root: str | Path) -> Path:
    """Run the compiled pipeline in this interpreter (no Docker); returns the run's folder."""
    from kfp import components, local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(package))
    try:
        with warnings.catch_warnings():
            # Locally the image is this interpreter, by design; kfp warns about custom images and ignored requests.
            warnings.filterwarnings(
                "ignore", message=".*(custom or non-Python base image|have no effect in the current local runner).*"
            )
            pipeline(**args)
    except RuntimeError as exc:
        raise PipelineError(f"local pipeline run failed: {exc}") from None
    new = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise PipelineError(f"the run left no folder under {pipeline_root}")
    return new[-1]


def check_host(host: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the host, when the Kubeflow Pipelines API does not answer."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # up, but behind authentication: kfp.Client handles credentials
            return
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise PipelineError(f"Kubeflow Pipelines at {host} is unreachable ({problem})")


def submit(
    host: str,
    package: str | Path,
    args: dict,
    experiment: str,
    run_name: str | None = None,
    namespace: str | None = None,
) -> dict:
    import kfp

    check_host(host)
    client = kfp.Client(host=host, namespace=namespace)
    run_name = run_name or f"dfdetect-{datetime.now():%Y%m%d-%H%M%S}"
    result = client.create_run_from_pipeline_package(
        str(package), arguments=args, run_name=run_name, experiment_name=experiment, namespace=namespace
    )
    return {"run_id": result.run_id, "run_name": run_name, "experiment": experiment, "host": host}


def run_outputs(run_dir: str | Path) -> dict:
    """What a local run produced, read from its task folders."""
    run_dir = Path(run_dir)
    out = {"run_dir": str(run_dir)}
    metrics = run_dir / "evaluate" / "evaluation" / "metrics.json"
    if metrics.exists():
        out["metrics"] = json.loads(metrics.read_text())
    for task in ("monitor", "export-feedback", "register", "promote"):
        executor = run_dir / task / "executor_output.json"
        if executor.exists():
            out[task] = json.loads(executor.read_text()).get("parameterValues", {}).get("Output")
    return out
