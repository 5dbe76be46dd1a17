"""Registry: register -> challenger, gated promotion -> champion, rollback, listing, loading; on a SQLite store."""

import json
import subprocess
import sys
import uuid

import pytest
import torch
import yaml

from dfdetect import registry, tracking
from dfdetect.config import parse_params
from dfdetect.registry import CHALLENGER, CHAMPION, RegistryError


@pytest.fixture
def env(tracked_run, monkeypatch, tmp_path):
    """Params naming a registered model of this test alone, in the shared store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tracked_run["params"].model_dump(mode="json")
    raw["registry"] = {"model_name": f"detector-{uuid.uuid4().hex[:8]}"}

    def make(**promotion):
        return parse_params({**raw, "promotion": {**raw["promotion"], **promotion}})

    return {**tracked_run, "make": make, "params": make(), "tmp": tmp_path}


def _register(env, params=None):
    return registry.register(params or env["params"], env["models"], env["metrics"], env["prepared"], env["tmp"] / "reg.json")


def _aliases(env, params=None):
    params = params or env["params"]
    client = registry.client_for(params)
    return {k: str(v) for k, v in client.get_registered_model(params.registry.model_name).aliases.items()}


def test_register_tags_the_version_and_sets_challenger(env):
    result = _register(env)
    assert result["version"] == "1" and json.loads((env["tmp"] / "reg.json").read_text())["version"] == "1"
    client = registry.client_for(env["params"])
    mv = client.get_model_version(result["name"], "1")
    metrics = json.loads(env["metrics"].read_text())
    assert mv.tags["metric.roc_auc"] == str(metrics["roc_auc"])
    assert mv.tags["data_version"] and mv.tags["git_commit"] and len(mv.tags["params_hash"]) == 16
    assert "# Model card" in mv.description and "## Known limits" in mv.description and "train: 24 real, 24 fake" in mv.description
    assert _aliases(env) == {CHALLENGER: "1"}


def test_first_promotion_is_decided_by_the_floors(env):
    _register(env)
    rejected = registry.promote(env["make"](floors={"roc_auc": 1.01}), env["prepared"], env["tmp"])
    assert rejected["verdict"] == "rejected" and _aliases(env) == {CHALLENGER: "1"}  # a failed gate moves nothing
    assert "FAILS" in (env["tmp"] / "promotion.md").read_text()
    promoted = registry.promote(env["make"](floors={"roc_auc": 0.0}), env["prepared"], env["tmp"])
    assert promoted["verdict"] == "promoted" and promoted["champion"] is None
    assert _aliases(env) == {CHALLENGER: "1", CHAMPION: "1"}
    report = json.loads((env["tmp"] / "promotion.json").read_text())
    assert report["challenger"]["metrics"]["roc_auc"] == promoted["challenger"]["metrics"]["roc_auc"]


def test_challenger_must_beat_the_re_evaluated_champion(env):
    _register(env)
    registry.promote(env["make"](floors={}), env["prepared"])
    _register(env)  # version 2: the same weights, so the same score
    needs_gain = registry.promote(env["make"](floors={}, min_improvement=0.01), env["prepared"])
    assert needs_gain["verdict"] == "rejected"
    assert needs_gain["champion"]["metrics"] == needs_gain["challenger"]["metrics"]  # both scored on the same data
    assert _aliases(env)[CHAMPION] == "1"
    client = registry.client_for(env["params"])
    assert client.get_model_version(env["params"].registry.model_name, "1").tags["dfdetect.promotion.challenged_by"] == "2"
    equal_ok = registry.promote(env["make"](floors={}, min_improvement=0.0), env["prepared"])
    assert equal_ok["verdict"] == "promoted" and _aliases(env)[CHAMPION] == "2"
    again = registry.promote(env["make"](floors={}), env["prepared"])
    assert again["verdict"] == "already champion"


def test_rollback_restores_the_previous_champion_and_keeps_history(env):
    _register(env)
    registry.promote(env["make"](floors={}), env["prepared"])
    with pytest.raises(RegistryError, match="replaced no earlier champion"):
        registry.rollback(env["params"], "nothing before v1")
    _register(env)
    registry.promote(env["make"](floors={}), env["prepared"])
    moved = registry.rollback(env["params"], "false positives on new uploads")
    assert (moved["from"], moved["version"]) == ("2", "1") and _aliases(env)[CHAMPION] == "1"
    listing = registry.list_versions(env["params"])
    assert [v["version"] for v in listing["versions"]] == ["1", "2"]
    assert listing["versions"][0]["aliases"] == [CHAMPION]
    assert [(h["by"], h["alias"], str(h["version"])) for h in listing["history"]] == [
        ("register", CHALLENGER, "1"), ("promote", CHAMPION, "1"), ("register", CHALLENGER, "2"),
        ("promote", CHAMPION, "2"), ("rollback", CHAMPION, "1")]
    assert listing["history"][-1]["reason"] == "false positives on new uploads"
    assert listing["versions"][1]["rolled_back"].endswith("false positives on new uploads")


def test_load_gives_model_preprocessing_label_map_and_version(env):
    _register(env)
    registry.promote(env["make"](floors={}), env["prepared"])
    loaded = registry.load(CHAMPION, params=env["params"])
    assert (loaded.version, loaded.alias, loaded.label_map) == ("1", CHAMPION, {"real": 0, "fake": 1})
    assert loaded.preprocess.image_size == 48 and 0 <= loaded.threshold <= 1
    with torch.no_grad():
        assert loaded.model(torch.zeros(2, 3, 48, 48)).shape == (2,)
    assert registry.load("1", params=env["params"]).version == "1"


def test_unknown_alias_or_version_is_named(env):
    _register(env)
    with pytest.raises(RegistryError, match=r"has no alias 'production'"):
        registry.load("production", params=env["params"])
    with pytest.raises(RegistryError, match=r"has no version 7"):
        registry.load("7", params=env["params"])


def test_promote_without_a_challenger(env):
    client = registry.client_for(env["params"])
    client.create_registered_model(env["params"].registry.model_name)
    with pytest.raises(RegistryError, match="has no 'challenger'; run `dfdetect register` first"):
        registry.promote(env["params"], env["prepared"])


def test_a_version_without_a_dfdetect_checkpoint_is_refused(env):
    import mlflow

    mlflow.set_tracking_uri(env["uri"])
    with mlflow.start_run() as run:
        mlflow.log_text("not a model", "model/MLmodel.txt")
    client = registry.client_for(env["params"])
    name = env["params"].registry.model_name
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    with pytest.raises(RegistryError, match="has no dfdetect checkpoint"):
        registry.load("1", params=env["params"])


def test_register_needs_metrics_and_a_tracked_run(env, tmp_path):
    with pytest.raises(RegistryError, match="has no evaluation metrics; run `dfdetect evaluate` first"):
        registry.register(env["params"], env["models"], tmp_path / "absent.json")
    untracked = tmp_path / "models"
    untracked.mkdir()
    (untracked / "summary.json").write_text(json.dumps({"run_id": None}))
    with pytest.raises(RegistryError, match="not tracked in MLflow"):
        registry.register(env["params"], untracked, env["metrics"])


@pytest.mark.timeout(30)
def test_unreachable_tracking_server_fails_fast_without_leaking_credentials(env, monkeypatch):
    from dfdetect.servers import free_port

    uri = f"http://admin:s3cret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError) as err:
        registry.register(env["params"], env["models"], env["metrics"])
    assert "is unreachable" in str(err.value) and "127.0.0.1" in str(err.value)
    assert "s3cret" not in str(err.value) and "admin" not in str(err.value)


def test_params_logged_to_mlflow_never_carry_credentials():
    params = parse_params({"mlflow": {"tracking_uri": "https://bot:hunter2@mlflow.internal"}})
    assert tracking.flat_params(params)["mlflow.tracking_uri"] == "https://***@mlflow.internal"
    assert "hunter2" not in json.dumps(tracking.flat_params(params))


def test_redact_removes_user_and_password():
    assert tracking.redact("https://u:p@mlflow.example.com:8443/x") == "https://***@mlflow.example.com:8443/x"
    assert tracking.redact("postgresql+psycopg2://mlflow:pw@db/mlflow") == "postgresql+psycopg2://***@db/mlflow"
    assert tracking.redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_two_promotions_at_once_leave_one_consistent_state(env):
    _register(env)
    registry.promote(env["make"](floors={}), env["prepared"])
    _register(env)
    params_file = env["tmp"] / "params.yaml"
    params_file.write_text(yaml.safe_dump(env["make"](floors={}).model_dump(mode="json")))
    procs = [subprocess.Popen([sys.executable, "-m", "dfdetect.cli", "promote", "-p", str(params_file), "--prepared",
                               str(env["prepared"]), "--out", str(env["tmp"] / f"out{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    verdicts = sorted(json.loads((env["tmp"] / f"out{i}" / "promotion.json").read_text())["verdict"] for i in range(2))
    assert verdicts == ["already champion", "promoted"]
    assert _aliases(env) == {CHALLENGER: "2", CHAMPION: "2"}
    history = registry.list_versions(env["params"])["history"]
    assert [(h["by"], str(h["version"]), str(h["from"])) for h in history if h["by"] == "promote"] == [
        ("promote", "1", "None"), ("promote", "2", "1")]
    client = registry.client_for(env["params"])
    assert client.get_model_version(env["params"].registry.model_name, "2").tags[registry.PREVIOUS_TAG] == "1"
    names = {m.name for m in client.search_registered_models()}
    assert f"{env['params'].registry.model_name}.promotion-lock" not in names


def test_config_metric_names_match_the_metric_registry():
    from typing import get_args

    from dfdetect.config import MetricName
    from dfdetect.metrics import available_metrics

    assert list(get_args(MetricName)) == available_metrics()
