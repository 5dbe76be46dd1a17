"""`dfdetect tune`: an Optuna study over the search space of params.yaml (`tune.space`).

Each trial trains the recipe with the trial's values on the prepared data (no MLflow model: only its curves)
and is a nested MLflow run under the study's parent run. The median pruner stops a trial whose validation
ROC-AUC after an epoch is below the median of earlier trials at that epoch. The study lives in a SQL database
(PostgreSQL or SQLite), so several processes or pods can work on one study and an interrupted study resumes
where it stopped. Trial 0 of a new study is params.yaml's own recipe: every later trial is compared with it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from . import tracking
from .config import Params, SearchDimension
from .io_utils import atomic_write_bytes, atomic_write_csv, atomic_write_json
from .overrides import apply_overrides

log = logging.getLogger(__name__)
DEFAULT_STORAGE = "sqlite:///optuna.db"
STORAGE_ENV = "DFDETECT_TUNE_STORAGE"


class TuneError(ValueError):
    pass


INVALID_RECIPE = "invalid_recipe"  # the user attribute of a trial skipped because its values make no valid recipe
MAX_SKIPPED_PER_TRIAL = 10  # a study stops after skipping this many invalid combinations per trial asked for


# --- where the study lives ----------------------------------------------------------------------------------


def storage_url(params: Params, explicit: str | None = None) -> str:
    """--storage, else $DFDETECT_TUNE_STORAGE (the environment wins over params.yaml, as for MLflow's URI),
    else tune.storage, else beside a database tracking URI, else sqlite:///optuna.db. Never the tracking
    database itself: MLflow and Optuna both keep an alembic_version table, so they cannot share one database."""
    chosen = explicit or os.environ.get(STORAGE_ENV) or params.tune.storage
    if chosen:
        return chosen
    uri = tracking.tracking_uri(params)
    db = tracking.sqlite_file(uri)
    if db is not None:
        return f"sqlite:///{db.with_name(db.stem + '_optuna.db')}"
    if uri.startswith(("postgresql", "mysql")):
        parts = urlsplit(uri)
        return urlunsplit(parts._replace(path=(parts.path.rstrip("/") or "/mlflow") + "_optuna"))
    return DEFAULT_STORAGE


def ensure_database(url: str) -> None:
    """Create a PostgreSQL database named by `url` when the server lacks it; a SQLite file's folder."""
    db = tracking.sqlite_file(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if not url.startswith("postgresql"):
        return
    import sqlalchemy

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = sqlalchemy.create_engine(urlunsplit(parts._replace(path="/postgres")), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            if not found:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                log.info("created the study database %s", name)
    except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError) as exc:
        if "already exists" not in str(exc):  # another worker created it first: fine
            raise
    finally:
        admin.dispose()


def open_study(params: Params, storage: str):
    """The study (created, or loaded to resume), with heartbeats: a worker killed mid-trial leaves a trial
    that another worker marks failed and retries once."""
    import optuna
    import sqlalchemy

    t = params.tune
    ensure_database(storage)
    for attempt in range(5):
        try:
            rdb = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
            break
        except sqlalchemy.exc.DBAPIError:
            # workers starting together race to create Optuna's tables: the loser finds them on a retry
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    sampler = (
        optuna.samplers.TPESampler(seed=params.seed)
        if t.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=params.seed)
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=t.pruner_startup_trials, n_warmup_steps=t.pruner_warmup_epochs
    )
    return optuna.create_study(
        storage=rdb, study_name=t.study, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )


# --- the search space ---------------------------------------------------------------------------------------


def _current(params: Params, key: str):
    node = params.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


_MAX_CORNERS = 4096  # combinations of the ends checked before a study; beyond, each end is checked alone


def check_space(params: Params) -> None:
    """Every key of tune.space is a parameter, and each of its ends (or choices) makes a valid recipe beside some
    combination of the other dimensions' ends, tune.epochs applied. An end that is valid only beside some of the
    others' (train.probe_epochs 3 needs train.epochs above 3) passes: a trial that draws an invalid pair is
    skipped, not counted (see `make_objective`). Past _MAX_CORNERS combinations, each end is checked beside
    params.yaml's values of the others instead."""
    space = params.tune.space
    if not space:
        raise TuneError("tune.space is empty: declare what to search in params.yaml (see README 'Tuning')")
    ends = {key: _ends(dim) for key, dim in space.items()}
    alone = {(key, repr(v)): _refusal(params, {key: v}) for key, values in ends.items() for v in values}
    if math.prod(len(v) for v in ends.values()) > _MAX_CORNERS:
        for (key, value), reason in alone.items():
            if reason:
                raise TuneError(
                    f"tune.space.{key}: {value} is not a valid value beside params.yaml's values of the other keys "
                    f"(too many combinations of the space's ends to try each, tune.epochs applied): {reason}"
                )
        return
    valid: set[tuple] = set()
    first_refusal: dict[tuple, str] = {}
    for combo in itertools.product(*ends.values()):
        combo = dict(zip(ends, combo))
        reason = _refusal(params, combo)
        held = [(key, repr(value)) for key, value in combo.items()]
        if reason is None:
            valid.update(held)
        for end in held:
            first_refusal.setdefault(end, reason)
    stranded = [end for end in alone if end not in valid]
    if not stranded:
        return
    base_refusal = _refusal(params, {})
    if not valid and base_refusal:
        raise TuneError(f"tune.epochs={params.tune.epochs}: the trials' recipe is not valid ({base_refusal})")
    # blame an end that is refused on its own first: it, not the others' ends it was paired with, is the fault
    key, value = next((end for end in stranded if alone[end]), stranded[0])
    reason = alone[(key, value)] or first_refusal[(key, value)]
    raise TuneError(
        f"tune.space.{key}: {value} is not a valid value with any of the other dimensions' ends "
        f"(tune.epochs applied): {reason}"
    )


def _refusal(params: Params, values: dict) -> str | None:
    """Why params with these trial values (and tune.epochs) is no recipe, on one line; None when it is one."""
    try:
        trial_params(params, values)
    except ValueError as exc:
        return _one_line(exc)
    return None


def _one_line(exc: Exception) -> str:
    """A (multi-line) ParamsError as one line: for the log, study.json and trials.csv."""
    return " ".join(str(exc).split())


def _ends(dim: SearchDimension) -> list:
    if dim.type == "categorical":
        return list(dim.choices)
    return [int(dim.low), int(dim.high)] if dim.type == "int" else [dim.low, dim.high]


def suggest(trial, space: dict[str, SearchDimension]) -> dict:
    """The trial's value for every dimension, by Optuna's sampler."""
    values = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def baseline(params: Params) -> dict | None:
    """params.yaml's values of the space, when all of them lie inside it (trial 0 of a new study)."""
    values = {}
    for key, dim in params.tune.space.items():
        value = _current(params, key)
        inside = value in dim.choices if dim.type == "categorical" else dim.low <= value <= dim.high
        if not inside:
            log.info("params.yaml's %s=%r is outside tune.space: no baseline trial", key, value)
            return None
        values[key] = value
    return values


def trial_params(params: Params, values: dict) -> Params:
    """params.yaml with the trial's values (and tune.epochs as train.epochs)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    if params.tune.epochs:
        overrides.append(f"train.epochs={params.tune.epochs}")
    return apply_overrides(params, overrides)


# --- one trial ----------------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    value: float  # the objective
    val_auc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    suite: dict[str, float] = field(default_factory=dict)


def run_trial(params: Params, prepared_dir: str | Path, on_epoch=None, suite: list | None = None) -> TrialResult:
    """Train params' recipe in a temporary folder and score it: the validation ROC-AUC of the model it ships
    (the best epoch's, or its WiSE-FT mix's), and with `suite` (loaded suite sets, see `load_suite`) its mean
    with each set's ROC-AUC. `on_epoch(epoch, row)` sees each epoch's history row (and may stop the trial by
    raising)."""
    from .train import train

    work = Path(tempfile.mkdtemp(prefix="dfdetect-trial-"))
    try:
        history: list[dict] = []

        def record(epoch, row):
            history.append(row)
            if on_epoch:
                on_epoch(epoch, row)

        result = train(params, prepared_dir, work, track=False, on_epoch=record)
        scores = score_suite_sets(work / "best.pt", suite) if suite else {}
        # the shipped model's ranking: after a WiSE-FT mix (train.wise_alpha) that is not the best epoch's
        val_auc = result.model_val_auc
        value = float(np.mean([val_auc, *scores.values()])) if scores else val_auc
        return TrialResult(value, val_auc, result.best_epoch, history, scores)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_suite(params: Params, workers: int = 1) -> list:
    """evaluate.datasets with both classes, loaded once for every trial: [(name, SuiteData)]."""
    from .evaluate import suite_sets
    from .suite import load_suite_set

    loaded = []
    for spec in suite_sets(params):
        data = load_suite_set(spec, params.prepare.image_size, params.prepare.faces, workers)
        if len(set(data.split.labels.tolist())) == 2:
            loaded.append((spec.label, data))
        else:
            log.info("suite set %s has one class: no ROC-AUC, left out of the objective", spec.label)
    if not loaded:
        raise TuneError("tune.objective suite_mean needs evaluate.datasets with a set of both classes")
    return loaded


def score_suite_sets(checkpoint_path: Path, suite: list) -> dict[str, float]:
    from .artifact import TrainedModel
    from .evaluate import score_model
    from .metrics import roc_auc

    trained = TrainedModel.load(checkpoint_path)
    out = {}
    for name, data in suite:
        scores, labels, _ = score_model(trained.module, trained.preprocess, data.split)
        out[name] = roc_auc(labels, scores, 0.5)
    return out


# --- MLflow: a parent run per study, a nested run per trial -------------------------------------------------


class StudyRuns:
    """The study's parent MLflow run (its id kept in the study, so every worker and every resumption nests
    under the same one) and a child run per trial, written through the client (no process-wide active run)."""

    def __init__(self, params: Params, study):
        mlflow = tracking.setup_mlflow(params)
        self.client = mlflow.MlflowClient()
        self.experiment_id = mlflow.get_experiment_by_name(params.mlflow.experiment).experiment_id
        self.parent = study.user_attrs.get("mlflow_parent_run_id") or self._converge_on_parent(params, study)

    def _converge_on_parent(self, params: Params, study) -> str:
        """Workers that start together may each create a parent run: all of them then keep the oldest one
        (by start time, then id), the others delete their own, and the study records it."""
        # the storage's id of the study: a study deleted and created again under its name gets a new parent
        tags = {"dfdetect.kind": "tune", "optuna.study": study.study_name, "optuna.study_id": str(study._study_id)}
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune-{study.study_name}",
            tags={
                **tags,
                "dfdetect.git_commit": tracking.git_commit(),
                "dfdetect.data_version": tracking.data_version(),
            },
        )
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`dfdetect.kind` = 'tune' and tags.`optuna.study` = '{study.study_name}' and "
            f"tags.`optuna.study_id` = '{tags['optuna.study_id']}'",
            order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
        )
        parent = found[0].info.run_id
        if parent != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        else:
            self.client.log_dict(parent, params.tune.model_dump(mode="json"), "tune.json")
        study.set_user_attr("mlflow_parent_run_id", parent)
        return parent

    def start_trial(self, number: int, values: dict, params: Params) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={"mlflow.parentRunId": self.parent, "optuna.trial": str(number), "dfdetect.kind": "tune-trial"},
        )
        flat = tracking.flat_params(params)
        self.client.log_batch(run.info.run_id, params=_params_batch(flat))
        return run.info.run_id

    def log_epoch(self, run_id: str, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, row["epoch"]) for k, v in row.items() if k != "epoch"]
        self.client.log_batch(run_id, metrics=metrics)

    def end_trial(self, run_id: str, state: str, result: TrialResult | None) -> None:
        if result is not None:
            self.client.log_metric(run_id, "objective", result.value)
            for name, auc in result.suite.items():
                self.client.log_metric(run_id, f"suite_{name}_roc_auc", auc)
        self.client.set_tag(run_id, "optuna.state", state)
        self.client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))

    def summarise(self, summary: dict) -> None:
        if summary.get("best"):
            self.client.log_metric(self.parent, "best_value", summary["best"]["value"])
            self.client.set_tag(self.parent, "best_trial", str(summary["best"]["number"]))
        self.client.log_dict(self.parent, summary, "study.json")


def _params_batch(flat: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in flat.items()]


# --- the study ----------------------------------------------------------------------------------------------


def make_objective(params: Params, prepared_dir: str | Path, runs: StudyRuns | None, suite: list | None):
    import optuna

    def objective(trial) -> float:
        values = suggest(trial, params.tune.space)
        try:
            recipe = trial_params(params, values)
        except ValueError as exc:  # each end is valid alone, this pair is not (train.epochs <= train.probe_epochs)
            reason = _one_line(exc)
            log.warning("trial %d: %s is not a valid recipe, skipped: %s", trial.number, values, reason)
            trial.set_user_attr(INVALID_RECIPE, reason)  # not counted toward the study's trials
            trial.set_constraint("valid_recipe", 1.0)  # TPE ranks it infeasible, below every pruned trial
            raise optuna.TrialPruned(f"not a valid recipe: {exc}") from None
        run_id = runs.start_trial(trial.number, values, recipe) if runs else None
        log.info("trial %d: %s", trial.number, values)

        def report(epoch, row):
            if runs:
                runs.log_epoch(run_id, row)
            if epoch <= recipe.train.probe_epochs:  # a linear probe's epochs are not comparable with fine-tuning's
                return
            trial.report(row["val_auc"], epoch)  # the pruner's intermediate value, also with suite_mean
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_auc {row['val_auc']:.4f} after epoch {epoch} is below the median")

        try:
            result = run_trial(recipe, prepared_dir, report, suite)
        except optuna.TrialPruned:
            if runs:
                runs.end_trial(run_id, "PRUNED", None)
            raise
        except BaseException:
            if runs:
                runs.end_trial(run_id, "FAIL", None)
            raise
        trial.set_user_attr("val_auc", result.val_auc)
        trial.set_user_attr("best_epoch", result.best_epoch)
        if result.suite:
            trial.set_user_attr("suite_roc_auc", result.suite)
        if runs:
            trial.set_user_attr("mlflow_run_id", run_id)
            runs.end_trial(run_id, "COMPLETE", result)
        return result.value

    return objective


def finished(study) -> int:
    """Trials that trained to the end or until the pruner stopped them; skipped invalid recipes do not count."""
    from optuna.trial import TrialState

    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(INVALID_RECIPE not in t.user_attrs for t in ended)


def skipped(study) -> int:
    """Trials whose sampled values made no valid recipe (each end valid, the pair not)."""
    return sum(INVALID_RECIPE in t.user_attrs for t in study.get_trials(deepcopy=False))


def _past_skip_cap(skipped_count: int, trials: int) -> bool:
    """The rule that stops a study of mostly invalid combinations: MAX_SKIPPED_PER_TRIAL skips per trial asked."""
    return skipped_count >= MAX_SKIPPED_PER_TRIAL * trials


def _stop_when_done(trials: int):
    """Optuna callback: stop this worker once the study (all workers) holds `trials` finished trials, or once
    it has skipped MAX_SKIPPED_PER_TRIAL x `trials` invalid combinations (a space of mostly invalid pairs)."""

    def callback(study, _trial) -> None:
        if finished(study) >= trials or _past_skip_cap(skipped(study), trials):
            study.stop()

    return callback


def summary_of(study, params: Params, storage: str) -> dict:
    """Every trial (state, values, intermediate val_auc per epoch, objective), the best one, and the baseline."""
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append(
            {
                "number": t.number,
                "state": "SKIPPED" if INVALID_RECIPE in t.user_attrs else t.state.name,
                "value": t.value,
                "params": t.params,
                "val_auc_per_epoch": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "baseline": bool(t.user_attrs.get("baseline")),
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
                **{k: v for k, v in t.user_attrs.items() if k != "baseline"},
            }
        )
    complete = [t for t in trials if t["state"] == TrialState.COMPLETE.name and t["value"] is not None]
    best = max(complete, key=lambda t: t["value"]) if complete else None
    base = next((t for t in complete if t["baseline"]), None)
    return {
        "study": study.study_name,
        "storage": tracking.redact(storage),
        "objective": params.tune.objective,
        "trials": trials,
        "finished": sum(t["state"] in (TrialState.COMPLETE.name, TrialState.PRUNED.name) for t in trials),
        "skipped": sum(t["state"] == "SKIPPED" for t in trials),
        "best": best,
        "baseline": base,
        "best_beats_baseline": bool(
            best and base and best["number"] != base["number"] and best["value"] > base["value"]
        ),
        "dvc_exp_run": ("dvc exp run " + " ".join(f"-S '{k}={json.dumps(v)}'" for k, v in best["params"].items()))
        if best
        else None,
    }


def write_outputs(summary: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / "study.json", summary)
    keys = sorted({k for t in summary["trials"] for k in t["params"]})
    rows = [
        {
            "number": t["number"],
            "state": t["state"],
            "value": "" if t["value"] is None else t["value"],
            "epochs": len(t["val_auc_per_epoch"]),
            **{k: t["params"].get(k, "") for k in keys},
            "skipped_because": t.get(INVALID_RECIPE, ""),
        }
        for t in summary["trials"]
    ]
    atomic_write_csv(out_dir / "trials.csv", rows, ["number", "state", "value", "epochs", *keys, "skipped_because"])


def write_best_params(params_path: Path, values: dict) -> None:
    """The best trial's values into params.yaml, comments and order kept (ruamel round trip), atomically."""
    import io

    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip mode
    yaml.preserve_quotes, yaml.width = True, 4096  # quotes and long lines as the user wrote them
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_path.read_text())
    for key, value in values.items():
        node, parts = doc, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    buf = io.StringIO()
    yaml.dump(doc, buf)
    atomic_write_bytes(params_path, buf.getvalue().encode())


def tune(
    params: Params,
    prepared_dir: str | Path,
    out_dir: str | Path,
    trials: int,
    timeout_min: float | None = None,
    storage: str | None = None,
    track: bool = True,
    workers: int = 1,
) -> dict:
    """Run the study until it holds `trials` finished (complete or pruned) trials, or `timeout_min` passes
    (no trial starts after it); sampled values that make no valid recipe are skipped and not counted. Returns
    and writes the summary (out_dir/study.json, out_dir/trials.csv)."""
    import optuna

    check_space(params)
    url = storage_url(params, storage)
    study = open_study(params, url)
    if not study.trials:
        base = baseline(params)
        if base:  # workers starting together: the first one's baseline stands, the others skip theirs
            study.enqueue_trial(base, user_attrs={"baseline": True}, skip_if_exists=True)
    done = finished(study)
    log.info("study %s in %s: %d of %d trials finished", study.study_name, tracking.redact(url), done, trials)
    runs = StudyRuns(params, study) if track else None
    suite = load_suite(params, workers) if params.tune.objective == "suite_mean" else None
    if done < trials and not _past_skip_cap(skipped(study), trials):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(
            make_objective(params, prepared_dir, runs, suite),
            # a bound, should a trial end neither finished nor skipped (Optuna fails a NaN objective quietly)
            n_trials=(trials - done) * (1 + MAX_SKIPPED_PER_TRIAL),
            timeout=timeout_min * 60 if timeout_min else None,
            # other workers on the same study count too: stop when the study as a whole has enough
            callbacks=[_stop_when_done(trials)],
            catch=(),
        )
    summary = summary_of(study, params, url)
    write_outputs(summary, Path(out_dir))
    if runs:
        runs.summarise(summary)
    if summary["finished"] < trials and _past_skip_cap(summary["skipped"], trials):
        raise TuneError(
            f"study {study.study_name} stopped with {summary['finished']} of {trials} trials finished: "
            f"{summary['skipped']} sampled combinations of tune.space were no valid recipe (the reasons are in "
            f"{Path(out_dir) / 'study.json'}); narrow the space so that fewer pairs conflict"
        )
    if summary["best"]:
        log.info(
            "best trial %d: %.4f %s", summary["best"]["number"], summary["best"]["value"], summary["best"]["params"]
        )
    return summary
