"""`dfdetect tune`: the search space's schema, where the study lives, a two-trial study in PostgreSQL with
nested MLflow runs that resumes, the pruner's stop, `tune-trial` for Katib, and writing the best values back."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, small_params
from typer.testing import CliRunner

from dfdetect import tracking, tune
from dfdetect.cli import app
from dfdetect.config import ParamsError, load_params, parse_params
from dfdetect.overrides import apply_overrides

SPACE = {
    "train.lr": {"type": "float", "low": 0.0005, "high": 0.005, "log": True},
    "model.dropout": {"type": "categorical", "choices": [0.1, 0.3]},
}


def tune_params(tmp_path: Path, **tune_section):
    return small_params(
        train={"epochs": 2},
        model={"dropout": 0.3},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        tune={"space": SPACE, **tune_section},
    )


@pytest.mark.parametrize(
    "dim, message",
    [
        ({"type": "categorical"}, "needs choices"),
        ({"type": "float", "low": 1.0, "high": 0.5}, "low < high"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "low > 0"),
        ({"type": "int", "low": 1.5, "high": 4}, "whole"),
        ({"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}, "not choices"),
    ],
)
def test_a_malformed_dimension_is_refused_by_the_schema(dim, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"tune": {"space": {"train.lr": dim}}})


def test_only_model_and_train_keys_can_be_searched():
    with pytest.raises(ParamsError, match="prepare.image_size: only keys of model, train"):
        parse_params({"tune": {"space": {"prepare.image_size": {"type": "int", "low": 64, "high": 128}}}})


def test_values_the_recipe_schema_refuses_are_named_before_any_training(tmp_path):
    params = tune_params(tmp_path)
    bad = parse_params(
        {
            **params.model_dump(mode="json"),
            "tune": {"space": {"model.dropout": {"type": "float", "low": 0.1, "high": 1.5}}},
        }
    )
    with pytest.raises(tune.TuneError, match=r"tune.space.model.dropout: 1.5 is not a valid value"):
        tune.check_space(bad)
    with pytest.raises(tune.TuneError, match="tune.space is empty"):
        tune.check_space(small_params())


def test_the_study_never_shares_the_tracking_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tune.STORAGE_ENV, raising=False)
    sqlite = tune_params(tmp_path)
    assert tune.storage_url(sqlite) == f"sqlite:///{tmp_path / 'mlflow_optuna.db'}"
    pg = small_params(mlflow={"tracking_uri": "postgresql+psycopg2://u@db:5432/mlflow"})
    assert tune.storage_url(pg) == "postgresql+psycopg2://u@db:5432/mlflow_optuna"
    http = small_params(mlflow={"tracking_uri": "http://mlflow:5000"})
    assert tune.storage_url(http) == tune.DEFAULT_STORAGE
    in_params = small_params(tune={"storage": "sqlite:///from-params.db"})
    assert tune.storage_url(in_params) == "sqlite:///from-params.db"
    monkeypatch.setenv(tune.STORAGE_ENV, "sqlite:///from-env.db")
    assert tune.storage_url(http) == "sqlite:///from-env.db"
    assert tune.storage_url(in_params) == "sqlite:///from-env.db", "the environment wins over params.yaml"
    assert tune.storage_url(http, "sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_a_two_trial_study_in_postgres_nests_its_runs_and_resumes(prepared_small, postgres, tmp_path, monkeypatch):
    import mlflow
    import optuna

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = postgres.url.rsplit("/", 1)[0] + "/study_db"  # a database of its own: created by the tune
    params = tune_params(tmp_path)
    summary = tune.tune(params, prepared_small, tmp_path / "tune", trials=2, storage=storage)

    study = optuna.load_study(study_name="dfdetect", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2
    baseline = study.trials[0]
    assert baseline.params == {"train.lr": 0.002, "model.dropout": 0.3}, "trial 0 is params.yaml's recipe"
    assert summary["baseline"]["number"] == 0 and summary["best"]["value"] >= summary["baseline"]["value"]
    for t in finished:  # the pruner's intermediate value: validation ROC-AUC after each epoch
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        assert 1 <= len(t.intermediate_values) <= 2

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2
    for child in children:
        number = int(child.data.tags["optuna.trial"])
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert [m.step for m in history] == sorted(study.trials[number].intermediate_values)
        assert child.data.params["train.lr"] == str(study.trials[number].params["train.lr"])

    rows = (tmp_path / "tune" / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,epochs") and len(rows) == 3
    assert json.loads((tmp_path / "tune" / "study.json").read_text())["study"] == "dfdetect"

    # Interrupted or not, the same command resumes: only the missing trial runs, under the same parent run.
    tune.tune(params, prepared_small, tmp_path / "tune", trials=3, storage=storage)
    study = optuna.load_study(study_name="dfdetect", storage=storage)
    assert len([t for t in study.trials if t.state.is_finished()]) == 3
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3


def test_a_trial_the_pruner_stops_ends_after_its_epoch_as_pruned(prepared_small, tmp_path, monkeypatch):
    """A pruner that stops everything below ROC-AUC 1.01: the trial ends after epoch 1, pruned, and its MLflow
    run says so."""
    import mlflow
    import optuna

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tune_params(tmp_path)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    runs = tune.StudyRuns(params, study)
    study.optimize(tune.make_objective(params, prepared_small, runs, None), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1], "stopped after its first epoch, not trained to the end"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = client.search_runs([client.get_run(runs.parent).info.experiment_id], "tags.`optuna.state` = 'PRUNED'")
    assert len(child) == 1 and child[0].info.status == "KILLED"


def test_tune_trial_prints_what_katibs_collector_reads(prepared_small, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(tune_params(tmp_path).model_dump(mode="json")))
    result = CliRunner().invoke(
        app,
        ["tune-trial", "--prepared", str(prepared_small), "-p", str(params_file), "--set", "train.lr=0.001"],
    )
    assert result.exit_code == 0, result.output
    lines = [line.split(" ", 1) for line in result.stdout.strip().splitlines() if "=" in line]
    # each metric line leads with its UTC time, which Katib's collector orders a trial's values by
    times = [datetime.fromisoformat(stamp.replace("Z", "+00:00")) for stamp, _ in lines]
    assert all(t.tzinfo is not None for t in times) and times == sorted(times)
    metrics = [text for _, text in lines]
    epochs = [text for text in metrics if text.startswith("epoch=")]
    assert len(epochs) == 2 and all("val_auc=" in text for text in epochs)
    *_, shipped, last = metrics
    objective = float(last.removeprefix("objective="))
    # Katib's `latest` val_auc: the shipped model's, here (no mix) the best epoch's
    assert float(shipped.removeprefix("val_auc=")) == objective
    assert objective == max(float(text.split("val_auc=")[1].split()[0]) for text in epochs)


def test_write_params_keeps_comments_and_changes_only_the_values(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    before = target.read_text()
    tune.write_best_params(target, {"train.lr": 0.00123, "model.dropout": 0.4})
    after = target.read_text()
    assert "# the default recipe: see README" in after, "comments survive"
    params = load_params(target)
    assert params.train.lr == 0.00123 and params.model.dropout == 0.4
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 2, changed


def test_two_workers_share_one_study(prepared_small, postgres, tmp_path, monkeypatch):
    """Two processes started together on one storage: the study gets its trials from both, one baseline,
    and every trial nests under one parent run."""
    import subprocess
    import sys

    import mlflow
    import optuna

    storage = postgres.url.rsplit("/", 1)[0] + "/shared_study"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(tune_params(tmp_path).model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the MLflow store exists before the workers start, as a tracking server's does (two processes creating
    # one SQLite store race in MLflow's own migrations)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.setup_mlflow(tune_params(tmp_path))
    cmd = [str(Path(sys.executable).parent / "dfdetect"), "tune", "--trials", "3", "--prepared", str(prepared_small)]
    workers = [
        subprocess.Popen(
            [*cmd, "-p", str(params_file), "--storage", storage, "--out", str(tmp_path / f"w{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = optuna.load_study(study_name="dfdetect", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 3 <= len(finished) <= 4  # a worker already in a trial when the third finished completes it
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dfdetect").experiment_id
    parents = client.search_runs([experiment], "tags.`dfdetect.kind` = 'tune'")
    assert [p.info.run_id for p in parents] == [study.user_attrs["mlflow_parent_run_id"]]
    children = client.search_runs([experiment], "tags.`dfdetect.kind` = 'tune-trial'")
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_suite_mean_averages_validation_with_each_suite_set(prepared_small, sample_root, tmp_path):
    raw = tune_params(tmp_path).model_dump(mode="json")
    raw["train"]["epochs"] = 1
    raw["evaluate"]["datasets"] = [{"path": str(sample_root), "name": "again"}]
    raw["tune"]["objective"] = "suite_mean"
    params = parse_params(raw)
    suite = tune.load_suite(params)
    assert [name for name, _ in suite] == ["again"]
    result = tune.run_trial(params, prepared_small, suite=suite)
    assert set(result.suite) == {"again"}
    assert result.value == pytest.approx((result.val_auc + result.suite["again"]) / 2)


def test_a_sqlite_study_gets_its_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies' / 'deep' / 'optuna.db'}"
    tune.ensure_database(url)
    assert (tmp_path / "studies" / "deep").is_dir()


def test_a_trial_is_scored_by_the_model_it_ships_not_the_epoch_before_the_mix(prepared_small, tmp_path, monkeypatch):
    from dfdetect import train as train_module

    def mixed_run(params, prepared_dir, out_dir, **kwargs):  # a run whose WiSE-FT mix ranks validation lower
        return train_module.TrainResult(None, 1, 0.9, 0.5, 1, True, False, shipped_val_auc=0.7)

    monkeypatch.setattr(train_module, "train", mixed_run)
    result = tune.run_trial(tune_params(tmp_path), prepared_small)
    assert (result.value, result.val_auc) == (0.7, 0.7)

    def unmixed_run(params, prepared_dir, out_dir, **kwargs):
        return train_module.TrainResult(None, 1, 0.9, 0.5, 1, True, False)

    monkeypatch.setattr(train_module, "train", unmixed_run)
    assert tune.run_trial(tune_params(tmp_path), prepared_small).value == 0.9


def test_a_space_whose_trials_cannot_fine_tune_after_their_probe_is_refused_before_the_study(tmp_path):
    params = apply_overrides(tune_params(tmp_path), ["train.epochs=4", "train.probe_epochs=2", "tune.epochs=2"])
    with pytest.raises(tune.TuneError, match="tune.epochs=2"):
        tune.check_space(params)
    widened = apply_overrides(
        params, ["tune.epochs=null", 'tune.space={"train.epochs": {"type": "int", "low": 2, "high": 5}}']
    )
    with pytest.raises(tune.TuneError, match="tune.space.train.epochs: 2"):
        tune.check_space(widened)


def test_the_pruner_never_judges_a_linear_probe_s_epochs(prepared_small, tmp_path):
    import optuna

    class AlwaysPrune(optuna.pruners.BasePruner):  # prunes at the first value it is shown
        def prune(self, study, trial):
            return True

    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True},
        train={"epochs": 2, "probe_epochs": 1},
        tune={"space": {"model.dropout": {"type": "categorical", "choices": [0.2]}}},
    )
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(tune.make_objective(params, prepared_small, None, None), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [2]  # shown only the fine-tuning epoch, pruned after it


def test_an_end_valid_beside_some_of_the_other_ends_passes_the_check(tmp_path):
    # probe_epochs 3 is valid with train.epochs 5 (not with params.yaml's 2): the space holds valid recipes
    space = {
        "train.epochs": {"type": "int", "low": 2, "high": 5},
        "train.probe_epochs": {"type": "int", "low": 0, "high": 3},
    }
    tune.check_space(apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"]))
    space["train.probe_epochs"]["high"] = 5  # 5 probe epochs leave no fine-tuning epoch with any train.epochs
    with pytest.raises(tune.TuneError, match="tune.space.train.probe_epochs: 5 is not a valid value with any"):
        tune.check_space(apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"]))


def test_sampled_pairs_that_make_no_recipe_are_skipped_and_not_counted(tmp_path, monkeypatch):
    """train.epochs 1 with a probe epoch is no recipe: such trials are skipped, and the study still ends with
    the number of trained trials asked for."""
    space = {
        "train.epochs": {"type": "categorical", "choices": [1, 4]},
        "train.probe_epochs": {"type": "categorical", "choices": [0, 1, 2, 3]},
    }
    params = apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"])
    trained = []

    def fake_trial(recipe, prepared_dir, on_epoch=None, suite=None):  # the counting is under test, not training
        trained.append((recipe.train.epochs, recipe.train.probe_epochs))
        return tune.TrialResult(value=0.5 + 0.01 * len(trained), val_auc=0.5, best_epoch=1)

    monkeypatch.setattr(tune, "run_trial", fake_trial)
    summary = tune.tune(
        params, tmp_path, tmp_path / "out", trials=6, storage=f"sqlite:///{tmp_path / 's.db'}", track=False
    )
    states = [t["state"] for t in summary["trials"]]
    assert states.count("SKIPPED") >= 1, "the seeded sampler drew no invalid pair: the test shows nothing"
    assert states.count("COMPLETE") == 6 and len(trained) == 6
    assert all(epochs > probe for epochs, probe in trained)
    skipped = [t for t in summary["trials"] if t["state"] == "SKIPPED"]
    assert all(t["params"]["train.probe_epochs"] >= t["params"]["train.epochs"] for t in skipped)
    assert "probe_epochs (" in skipped[0]["invalid_recipe"] and "fewer than epochs" in skipped[0]["invalid_recipe"]
    import optuna  # and TPE sees each skip as infeasible, not as a pruned trial that might be good

    study = optuna.load_study(study_name="dfdetect", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert all(t.constraints == {"valid_recipe": 1.0} for t in study.trials if "invalid_recipe" in t.user_attrs)


@pytest.mark.timeout(120)
def test_a_space_of_mostly_invalid_pairs_stops_instead_of_sampling_forever(tmp_path, monkeypatch):
    space = {
        "train.epochs": {"type": "categorical", "choices": [1, 2]},
        "train.probe_epochs": {"type": "categorical", "choices": [0, 1]},
    }
    params = apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"])
    # a sampler that only ever draws the invalid pair (the sampler is not under test, the stop is)
    monkeypatch.setattr(tune, "suggest", lambda trial, space: {"train.epochs": 1, "train.probe_epochs": 1})
    monkeypatch.setattr(tune, "run_trial", lambda *a, **k: pytest.fail("an invalid recipe must not train"))
    monkeypatch.setattr(tune, "MAX_SKIPPED_PER_TRIAL", 2)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(tune.TuneError, match="stopped with 0 of 3 trials finished: 6 sampled combinations"):
        tune.tune(params, tmp_path, tmp_path / "out", trials=3, storage=storage, track=False)
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [t["state"] for t in study["trials"]] == ["SKIPPED"] * 6  # 2 per trial asked for, then it stopped
    assert "fewer than epochs" in (tmp_path / "out" / "trials.csv").read_text()  # each skip says why
    with pytest.raises(tune.TuneError, match="stopped with 0 of 3"):  # resumed, it trains and skips nothing more
        tune.tune(params, tmp_path, tmp_path / "out", trials=3, storage=storage, track=False)
    assert len(json.loads((tmp_path / "out" / "study.json").read_text())["trials"]) == 6


def test_the_end_refused_on_its_own_is_blamed_not_the_ends_it_was_paired_with(tmp_path):
    space = {
        "train.probe_epochs": {"type": "int", "low": 0, "high": 1},
        "train.lr": {"type": "categorical", "choices": [-1.0]},
    }
    params = apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"])
    with pytest.raises(tune.TuneError, match=r"tune.space.train.lr: -1.0 is not a valid value .*greater than 0"):
        tune.check_space(params)


def test_past_the_cap_each_end_is_checked_beside_params_yaml_s_values(tmp_path, monkeypatch):
    space = {
        "train.epochs": {"type": "int", "low": 2, "high": 5},
        "train.probe_epochs": {"type": "int", "low": 0, "high": 3},
    }
    params = apply_overrides(tune_params(tmp_path), [f"tune.space={json.dumps(space)}"])
    tune.check_space(params)  # probe 3 beside epochs 5
    monkeypatch.setattr(tune, "_MAX_CORNERS", 3)  # 4 combinations: too many, so beside params.yaml's epochs 2
    with pytest.raises(tune.TuneError, match="probe_epochs: 3 is not a valid value beside params.yaml's values"):
        tune.check_space(params)
