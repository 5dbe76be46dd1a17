"""The MLflow model registry with staged promotion: register -> `challenger`, gated promote -> `champion`, rollback.

Aliases move only under a registry-wide lock (a lock entry that the tracking server's unique names make
exclusive), so two promotions at once cannot interleave. Every move is recorded: in the alias history on the
registered model, in tags on the versions, and in a promotion report logged with the challenger's run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import checkpoint, tracking
from .artifact import TrainedModel
from .config import Params
from .io_utils import atomic_write_json
from .labels import LABEL_MAP
from .model_card import card_description, model_card
from .preprocessing import PreprocessConfig

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "dfdetect.alias_history"
PREVIOUS_TAG = "dfdetect.previous_champion"
CHECKPOINT_ARTIFACT = "checkpoint/best.pt"
TAG_VALUE_LIMIT = 5000  # MLflow's limit on a tag value


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def client_for(params: Params):
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(params)
    tracking.connect(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tracking.check_store(uri, client, params.mlflow.experiment)  # registry moves write artifacts too
    return client


def _not_found(exc) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def get_version(client, name: str, ref: str):
    """A version by number ("3") or alias ("champion"); a clear error when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        if str(ref).isdigit():
            return client.get_model_version(name, str(ref))
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        if _not_found(exc):
            what = f"version {ref}" if str(ref).isdigit() else f"alias '{ref}'"
            raise RegistryError(f"registered model '{name}' has no {what}") from None
        raise


def alias_version(client, name: str, alias: str):
    try:
        return get_version(client, name, alias)
    except RegistryError:
        return None


# --- history ----------------------------------------------------------------------------------------------


def alias_history(client, name: str) -> list[dict]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return []


def record_alias(client, name: str, entry: dict) -> None:
    history = alias_history(client, name) + [entry]
    while len(json.dumps(history)) > TAG_VALUE_LIMIT and len(history) > 1:
        history.pop(0)  # the oldest moves drop out of the tag; version tags and reports keep them
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _lock_tags(client, lock: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException:
        return None  # released meanwhile


def _stale(tags: dict, lease_s: float) -> str:
    """Why a lock may be taken over ('' if it may not): its holder on this host is gone, or its lease expired."""
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        try:
            os.kill(int(tags["pid"]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return f"its holder's process (pid {tags['pid']}) no longer runs"
        except (PermissionError, OverflowError):  # PermissionError: it runs, as another user
            pass
    try:
        held = time.time() - float(tags.get("acquired_at", "0"))
    except ValueError:
        held = float("inf")
    return f"its lease of {lease_s:g}s expired (held {held:.0f}s)" if held > lease_s else ""


@contextmanager
def registry_lock(client, name: str, timeout_s: float, lease_s: float):
    """Exclusive across processes and machines: creating a registered model of a taken name fails.

    The lock records its holder's host, pid and start. A killed holder cannot release it, so a lock whose
    holder process on this host is gone is taken over at once, and any lock once its lease has expired.
    """
    from mlflow.exceptions import MlflowException

    lock = f"{name}.promotion-lock"
    host, pid = socket.gethostname(), os.getpid()
    mine = {"holder": f"{host}:{pid}", "host": host, "pid": str(pid), "acquired_at": repr(time.time())}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags=mine, description=f"Held by a dfdetect promotion or rollback of '{name}'."
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = _lock_tags(client, lock)
        if tags is None:
            continue
        why = _stale(tags, lease_s)
        if why:
            # Delete only the lock judged stale: if it changed meanwhile, another process took it over first.
            # (MLflow has no compare-and-delete, so a narrow window remains between this read and the delete.)
            if _lock_tags(client, lock) == tags:
                log.warning("taking over the registry lock of '%s' held by %s: %s", name, tags.get("holder"), why)
                try:
                    client.delete_registered_model(lock)
                except MlflowException:
                    pass
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"another promotion or rollback of '{name}' holds the lock ({tags.get('holder')}); "
                f"waited {timeout_s:.0f}s"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        if _lock_tags(client, lock) == mine:  # still ours: after a lease expiry it may be another's now
            client.delete_registered_model(lock)
        else:
            log.warning("the registry lock of '%s' was taken over while this process held it", name)


# --- loading ----------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A registered version: the trained artifact with its registry name, version, alias and run."""

    trained: TrainedModel
    name: str
    version: str
    alias: str | None
    run_id: str

    @property
    def model(self) -> nn.Module:
        return self.trained.module

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.trained.preprocess

    @property
    def threshold(self) -> float:
        return self.trained.threshold

    @property
    def label_map(self) -> dict:
        return self.trained.label_map


def load_version(client, name: str, ref: str) -> LoadedModel:
    from mlflow.exceptions import MlflowException

    mv = get_version(client, name, ref)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(mv.run_id, CHECKPOINT_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            raise RegistryError(
                f"version {mv.version} of '{name}' has no dfdetect checkpoint ({CHECKPOINT_ARTIFACT}) "
                f"with its label map and preprocessing: {type(exc).__name__}"
            ) from None
        try:
            trained = TrainedModel.load(path)
        except (checkpoint.CheckpointError, ValueError) as exc:
            raise RegistryError(f"version {mv.version} of '{name}': {exc}") from None
    alias = None if str(ref).isdigit() else str(ref)
    return LoadedModel(trained, name, str(mv.version), alias, mv.run_id)


def load(alias_or_version: str = CHAMPION, name: str | None = None, params: Params | None = None) -> LoadedModel:
    """The registered model, its preprocessing, label map, threshold and version: what serving needs."""
    params = params or Params()
    return load_version(client_for(params), name or params.registry.model_name, alias_or_version)


# --- register ---------------------------------------------------------------------------------------------


def _register_version(mlflow, client, name: str, run, tags: dict):
    """MLflow 3 registers a logged model (`models:/m-...`), not a run path: the model this run logged; with
    `mlflow.log_model` off, the run's checkpoint folder (what `load_version` reads) as the version's source."""
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    logged = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1
    )
    if logged:
        return mlflow.register_model(f"models:/{logged[0].model_id}", name, tags=tags)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id, tags=tags)


def register(
    params: Params,
    model_dir: str | Path,
    metrics_path: str | Path,
    prepared_dir: str | Path | None = None,
    out_path: str | Path | None = None,
) -> dict:
    """Register the evaluated training run's model as a new version and make it the `challenger`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    summary_path, metrics_path = Path(model_dir) / "summary.json", Path(metrics_path)
    if not summary_path.exists():
        raise RegistryError(f"{summary_path}: no training summary; run `dfdetect train` first")
    run_id = json.loads(summary_path.read_text()).get("run_id")
    if not run_id:
        raise RegistryError(
            f"{summary_path}: the training run was not tracked in MLflow (--no-mlflow); nothing to register"
        )
    if not metrics_path.exists():
        raise RegistryError(f"{metrics_path}: the run has no evaluation metrics; run `dfdetect evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    report_path = Path(prepared_dir) / "report.json" if prepared_dir else None
    data_report = json.loads(report_path.read_text()) if report_path and report_path.exists() else None

    client = client_for(params)
    name = params.registry.model_name
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(
            f"run {run_id} not found at {tracking.redact(tracking.tracking_uri(params))}; "
            "was it trained against another tracking server?"
        ) from None
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise RegistryError(
            f"run {run_id} has no {CHECKPOINT_ARTIFACT}; only completed dfdetect training runs can be registered"
        )

    tags = {f"metric.{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    tags.update(
        {
            "eval_split": str(metrics.get("split")),
            "data_version": run.data.tags.get("dfdetect.data_version", "unknown"),
            "git_commit": run.data.tags.get("dfdetect.git_commit", "unknown"),
            "params_hash": run.data.tags.get("dfdetect.params_hash", tracking.params_hash(params)),
            "label_map": json.dumps(LABEL_MAP),
            "checkpoint": CHECKPOINT_ARTIFACT,
        }
    )
    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    mv = _register_version(mlflow, client, name, run, tags)
    card = model_card(name, str(mv.version), run, metrics, data_report)
    card_path = f"model_card/{name}-v{mv.version}.md"
    client.update_model_version(name, str(mv.version), description=card_description(card, card_path))
    client.log_text(run_id, card, card_path)
    previous = alias_version(client, name, CHALLENGER)
    client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
    record_alias(
        client,
        name,
        {
            "alias": CHALLENGER,
            "version": str(mv.version),
            "from": str(previous.version) if previous else None,
            "at": now_iso(),
            "by": "register",
            "reason": f"registered from run {run_id}",
        },
    )
    result = {
        "name": name,
        "version": str(mv.version),
        "run_id": run_id,
        "alias": CHALLENGER,
        "tracking_uri": tracking.redact(tracking.tracking_uri(params)),
    }
    if out_path:
        atomic_write_json(out_path, result)
    log.info("registered %s version %s as %s", name, mv.version, CHALLENGER)
    return result


# --- promote ----------------------------------------------------------------------------------------------


def rollback(params: Params, reason: str) -> dict:
    """Move `champion` back to the version it replaced."""
    client = client_for(params)
    name = params.registry.model_name
    with registry_lock(client, name, params.promotion.lock_timeout_s, params.promotion.lock_lease_s):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"registered model '{name}' has no '{CHAMPION}' to roll back")
        previous = current.tags.get(PREVIOUS_TAG)
        if not previous:
            raise RegistryError(
                f"version {current.version} of '{name}' replaced no earlier champion; nothing to roll back to"
            )
        get_version(client, name, previous)  # still there?
        at = now_iso()
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, str(current.version), "dfdetect.rolled_back", f"{at}: {reason}")
        record_alias(
            client,
            name,
            {
                "alias": CHAMPION,
                "version": previous,
                "from": str(current.version),
                "at": at,
                "by": "rollback",
                "reason": reason,
            },
        )
    log.info("rolled %s '%s' back from v%s to v%s", name, CHAMPION, current.version, previous)
    return {
        "name": name,
        "alias": CHAMPION,
        "version": previous,
        "from": str(current.version),
        "at": at,
        "reason": reason,
    }


def list_versions(params: Params) -> dict:
    client = client_for(params)
    name = params.registry.model_name
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise RegistryError(
                f"no registered model '{name}' at {tracking.redact(tracking.tracking_uri(params))}"
            ) from None
        raise
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    history = alias_history(client, name)
    all_versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version))
    versions = []
    for mv in all_versions:
        versions.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "run_id": mv.run_id,
                "metrics": {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")},
                "status": _status(mv, str((model.aliases or {}).get(CHAMPION)), history, all_versions),
                "promotion": mv.tags.get("dfdetect.promotion.verdict"),  # of the last promotion it took part in
                "rolled_back": mv.tags.get("dfdetect.rolled_back"),
            }
        )
    return {"name": name, "versions": versions, "history": history}


def _status(mv, champion: str, history: list[dict], all_versions) -> str:
    """'champion' for the current one only; a replaced champion says by what and when; others their verdict.

    The promotion verdict tag alone misleads: a champion's tags also record the promotion that replaced it.
    """
    version = str(mv.version)
    if version == champion:
        return CHAMPION
    moves = [h for h in history if h.get("alias") == CHAMPION and str(h.get("from")) == version]
    if moves:
        last = moves[-1]
        how = "rolled back to" if last.get("by") == "rollback" else "replaced by"
        return f"former champion ({how} v{last['version']} on {last['at']})"
    if PREVIOUS_TAG in mv.tags:  # it was promoted once; the move away fell out of the (size-limited) history
        if mv.tags.get("dfdetect.rolled_back"):
            return f"former champion (rolled back {mv.tags['dfdetect.rolled_back']})"
        after = [m for m in all_versions if m.tags.get(PREVIOUS_TAG) == version]
        if after:
            return (
                f"former champion (replaced by v{after[-1].version} on "
                f"{after[-1].tags.get('dfdetect.promotion.at', '?')})"
            )
        return "former champion"
    return mv.tags.get("dfdetect.promotion.verdict") or "-"
