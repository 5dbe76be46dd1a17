"""MLflow set-up and the provenance every run records (data version, git commit, params)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from .config import Params

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(params: Params) -> str:
    """The environment wins over params.yaml, so a deployment can redirect runs without editing params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri or DEFAULT_TRACKING_URI


class TrackingError(RuntimeError):
    """The tracking server cannot be used."""


def redact(uri: str) -> str:
    """The URI without user name and password: safe for logs, tags and files."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the server, instead of hanging in MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(f"MLflow tracking server at {redact(uri)} is unreachable ({problem})")


def connect(uri: str) -> None:
    """Bounded MLflow retries (a server that goes away mid-run fails the step in seconds, not minutes),
    then a reachability check: what every MLflow client of dfdetect does first."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    check_reachable(uri)


def setup_mlflow(params: Params):
    import mlflow  # imported here: a slow import that most commands do not need

    uri = tracking_uri(params)
    connect(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(params.mlflow.experiment)
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


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


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
