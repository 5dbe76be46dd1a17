"""MLflow set-up and the provenance every run records (data version, git commit, params)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

from .config import Params

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(params: Params) -> str:
    """The environment wins over params.yaml, so a deployment can redirect runs without editing params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri or DEFAULT_TRACKING_URI


def use_tracking_uri(uri: str) -> None:
    """A pipeline step's tracking server, for this process: `tracking_uri` reads the environment first."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


class TrackingError(RuntimeError):
    """The tracking server cannot be used."""


def redact(uri: str) -> str:
    """The URI without user name and password: safe for logs, tags and files."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))  # host[:port] as written


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the server, instead of hanging in MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return
    # urllib resolves the whole netloc as the host: credentials go out of the URL and into a Basic header.
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise TrackingError(f"MLflow tracking URI {redact(uri)}: the port is not a number") from None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: http.client.InvalidURL
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"MLflow tracking server at {redact(uri)} is unreachable ({problem})")


def connect(uri: str) -> None:
    """Bounded MLflow retries (a server that goes away mid-run fails the step in seconds, not minutes),
    then a reachability check: what every MLflow client of dfdetect does first."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    check_reachable(uri)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store (sqlite:///relative or sqlite:////absolute), else None."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path).resolve() if path and path != ":memory:" else None


def check_store(uri: str, client, experiment: str) -> None:
    """Refuse a local SQLite store whose experiment keeps its artifacts outside the store's folder.

    MLflow records absolute artifact paths, so a store copied with its repository still points into the
    original checkout: every run, registration and promotion would write there. `client` is an
    MlflowClient or the mlflow module.
    """
    db = sqlite_file(uri)
    found = client.get_experiment_by_name(experiment) if db else None
    if found is None:
        return
    location = found.artifact_location
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return  # s3://, mlflow-artifacts:/ ...: not a path of this machine
    path = Path(unquote(parts.path) if parts.scheme == "file" else location)
    if not path.is_absolute() or path.resolve().is_relative_to(db.parent):
        return
    raise TrackingError(
        f"MLflow experiment '{experiment}' in {db} keeps its artifacts in {location}, outside {db.parent}: this "
        f"store was copied from another checkout (MLflow records absolute paths), and runs would write into that "
        f"one. Start a fresh store here (move {db.name} and mlruns/ aside), or repoint the copied store's paths "
        "as the README says (Registry: 'Moving or copying an MLflow store')."
    )


def setup_mlflow(params: Params):
    import mlflow  # imported here: a slow import that most commands do not need
    from mlflow.exceptions import MlflowException

    uri, name = tracking_uri(params), params.mlflow.experiment
    connect(uri)
    mlflow.set_tracking_uri(uri)
    db = sqlite_file(uri)
    if db is not None and mlflow.get_experiment_by_name(name) is None:
        # MLflow would put its artifacts under the current folder, wherever that is: keep them beside the store.
        try:
            mlflow.create_experiment(name, artifact_location=str(db.parent / "mlruns" / re.sub(r"[^\w.-]+", "_", name)))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first: fine
                raise
    check_store(uri, mlflow, name)
    mlflow.set_experiment(name)
    return mlflow


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 that DVC recorded for the data folder, or 'untracked'."""
    path = Path(dvc_file)
    if not path.is_file():
        return "untracked"
    try:
        outs = yaml.safe_load(path.read_text()).get("outs", [])
        return str(outs[0]["md5"])
    except (yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError):
        return "unknown"


def _pipeline_outputs(root: Path) -> set[str]:
    """dvc.lock and the outs, metrics and plots that dvc.yaml declares: every pipeline run rewrites them, so
    their changes say nothing about the source the run was made from."""
    paths = {"dvc.lock"}
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return paths
    if not isinstance(spec, dict):
        return paths

    def names(entries):  # each entry is a path or {path: options}
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict):
                yield from entry

    stages = spec.get("stages")
    for stage in stages.values() if isinstance(stages, dict) else []:
        stage = stage.get("do", stage) if isinstance(stage, dict) else {}  # foreach/matrix stages keep theirs in do
        for key in ("outs", "metrics", "plots"):
            paths.update(names(stage.get(key)))
    for plot in spec.get("plots") or []:  # top level: a path, or {name: {y: {path: columns}}}
        paths.update(names([plot]))
        for props in plot.values() if isinstance(plot, dict) else []:
            if isinstance(props, dict) and isinstance(props.get("y"), dict):
                paths.update(props["y"])
    return {str(p).strip("/") for p in paths}


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD, with '-dirty' when tracked source differs from it; the pipeline's own outputs do not count."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head, top, status = (
            git("rev-parse", "HEAD"),
            git("rev-parse", "--show-toplevel"),
            git("status", "--porcelain", "-z", "--untracked-files=no"),
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    entries, changed = status.stdout.split("\0"), []
    while entries:  # "XY path", and after a rename or copy one more entry: the original path
        entry = entries.pop(0)
        if entry:
            changed.append(entry[3:])
            if "R" in entry[:2] or "C" in entry[:2]:
                changed.append(entries.pop(0) if entries else "")
    outputs = _pipeline_outputs(Path(top.stdout.strip() or cwd))  # porcelain paths are relative to the top
    source = [p for p in changed if not any(p == o or p.startswith(o + "/") for o in outputs)]
    return head.stdout.strip() + ("-dirty" if source or status.returncode != 0 else "")


def flat_params(params: Params) -> dict[str, str]:
    """All params as dotted keys, the way MLflow shows them."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    walk("", params.model_dump(mode="json"))
    if flat.get("mlflow.tracking_uri") not in (None, "None"):
        flat["mlflow.tracking_uri"] = redact(flat["mlflow.tracking_uri"])
    return flat


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
