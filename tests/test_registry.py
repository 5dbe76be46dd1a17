"""Registry: register -> challenger, gated promotion -> champion, rollback, listing, loading; on a SQLite store."""

import json
import subprocess
import sys
import time
import uuid

import pytest
import torch
import yaml

from dfdetect import model_card, promotion, registry, tracking
from dfdetect.config import ParamsError, parse_params
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
    return registry.register(
        params or env["params"], env["models"], env["metrics"], env["prepared"], env["tmp"] / "reg.json"
    )


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
    assert (
        "# Model card" in mv.description
        and "## Known limits" in mv.description
        and "train: 24 real, 24 fake" in mv.description
    )
    assert _aliases(env) == {CHALLENGER: "1"}


def test_first_promotion_is_decided_by_the_floors(env):
    _register(env)
    rejected = promotion.promote(env["make"](floors={"roc_auc": 1.01}), env["prepared"], env["tmp"])
    assert rejected["verdict"] == "rejected" and _aliases(env) == {CHALLENGER: "1"}  # a failed gate moves nothing
    assert "FAILS" in (env["tmp"] / "promotion.md").read_text()
    promoted = promotion.promote(env["make"](floors={"roc_auc": 0.0}), env["prepared"], env["tmp"])
    assert promoted["verdict"] == "promoted" and promoted["champion"] is None
    assert _aliases(env) == {CHALLENGER: "1", CHAMPION: "1"}
    report = json.loads((env["tmp"] / "promotion.json").read_text())
    assert report["challenger"]["metrics"]["roc_auc"] == promoted["challenger"]["metrics"]["roc_auc"]


def test_challenger_must_beat_the_re_evaluated_champion(env):
    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
    _register(env)  # version 2: the same weights, so the same score
    needs_gain = promotion.promote(env["make"](floors={}, min_improvement=0.01), env["prepared"])
    assert needs_gain["verdict"] == "rejected"
    assert needs_gain["champion"]["metrics"] == needs_gain["challenger"]["metrics"]  # both scored on the same data
    assert _aliases(env)[CHAMPION] == "1"
    client = registry.client_for(env["params"])
    assert (
        client.get_model_version(env["params"].registry.model_name, "1").tags["dfdetect.promotion.challenged_by"] == "2"
    )
    equal_ok = promotion.promote(env["make"](floors={}, min_improvement=0.0), env["prepared"])
    assert equal_ok["verdict"] == "promoted" and _aliases(env)[CHAMPION] == "2"
    again = promotion.promote(env["make"](floors={}), env["prepared"])
    assert again["verdict"] == "already champion"


def test_rollback_restores_the_previous_champion_and_keeps_history(env):
    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
    with pytest.raises(RegistryError, match="replaced no earlier champion"):
        registry.rollback(env["params"], "nothing before v1")
    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
    moved = registry.rollback(env["params"], "false positives on new uploads")
    assert (moved["from"], moved["version"]) == ("2", "1") and _aliases(env)[CHAMPION] == "1"
    listing = registry.list_versions(env["params"])
    assert [v["version"] for v in listing["versions"]] == ["1", "2"]
    assert listing["versions"][0]["aliases"] == [CHAMPION]
    assert [(h["by"], h["alias"], str(h["version"])) for h in listing["history"]] == [
        ("register", CHALLENGER, "1"),
        ("promote", CHAMPION, "1"),
        ("register", CHALLENGER, "2"),
        ("promote", CHAMPION, "2"),
        ("rollback", CHAMPION, "1"),
    ]
    assert listing["history"][-1]["reason"] == "false positives on new uploads"
    assert listing["versions"][1]["rolled_back"].endswith("false positives on new uploads")


def test_load_gives_model_preprocessing_label_map_and_version(env):
    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
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
        promotion.promote(env["params"], env["prepared"])


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
    promotion.promote(env["make"](floors={}), env["prepared"])
    _register(env)
    params_file = env["tmp"] / "params.yaml"
    params_file.write_text(yaml.safe_dump(env["make"](floors={}).model_dump(mode="json")))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dfdetect.cli",
                "promote",
                "-p",
                str(params_file),
                "--prepared",
                str(env["prepared"]),
                "--out",
                str(env["tmp"] / f"out{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    verdicts = sorted(json.loads((env["tmp"] / f"out{i}" / "promotion.json").read_text())["verdict"] for i in range(2))
    assert verdicts == ["already champion", "promoted"]
    assert _aliases(env) == {CHALLENGER: "2", CHAMPION: "2"}
    history = registry.list_versions(env["params"])["history"]
    assert [(h["by"], str(h["version"]), str(h["from"])) for h in history if h["by"] == "promote"] == [
        ("promote", "1", "None"),
        ("promote", "2", "1"),
    ]
    client = registry.client_for(env["params"])
    assert client.get_model_version(env["params"].registry.model_name, "2").tags[registry.PREVIOUS_TAG] == "1"
    names = {m.name for m in client.search_registered_models()}
    assert f"{env['params'].registry.model_name}.promotion-lock" not in names


def test_config_metric_names_match_the_metric_registry():
    from typing import get_args

    from dfdetect.config import MetricName
    from dfdetect.metrics import available_metrics

    assert list(get_args(MetricName)) == available_metrics()


# --- hardening (issue 14): credentials in the URI, the promotion lock, the listing ----------------------


def test_a_tracking_uri_with_credentials_is_reachable_and_its_secret_never_printed(caplog):
    import base64
    import logging
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dfdetect.servers import free_port

    seen = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level(logging.DEBUG)
    try:
        tracking.check_reachable(f"http://admin:s3cret@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/health", "Basic " + base64.b64encode(b"admin:s3cret").decode())]  # the server gets them
    with pytest.raises(tracking.TrackingError) as err:  # and a real failure still names the host, not the secret
        tracking.check_reachable(f"http://admin:s3cret@127.0.0.1:{free_port()}", timeout=2)
    assert "127.0.0.1" in str(err.value) and "s3cret" not in str(err.value) and "admin" not in str(err.value)
    assert "s3cret" not in caplog.text


HOLDER = """
import sys, time
from dfdetect import promotion, registry
from dfdetect.config import ParamsError, parse_params
params = parse_params({"mlflow": {"tracking_uri": sys.argv[1]}})
with registry.registry_lock(registry.client_for(params), sys.argv[2], 5, 900):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(env):
    """A real promotion-lock holder in another process, as a promote in progress is."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, env["uri"], env["params"].registry.model_name], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(120)
def test_a_lock_left_by_a_killed_promotion_is_taken_over_at_once(env, caplog):
    import logging

    holder = _hold_lock(env)
    quick = env["make"](lock_timeout_s=1)
    try:  # a live holder within its lease is respected
        with pytest.raises(RegistryError, match="holds the lock"):
            registry.rollback(quick, "while another promotion runs")
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock stays behind
        holder.wait()
    caplog.set_level(logging.INFO, logger="dfdetect.registry")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="has no 'champion' to roll back"):  # i.e. it got the lock
        registry.rollback(quick, "after the kill")
    assert time.monotonic() - started < 30
    assert f"pid {holder.pid}" in caplog.text and "no longer runs" in caplog.text
    names = {m.name for m in registry.client_for(quick).search_registered_models()}
    assert f"{quick.registry.model_name}.promotion-lock" not in names


@pytest.mark.timeout(120)
def test_a_lock_past_its_lease_is_taken_over_even_from_a_live_holder(env, caplog):
    import logging

    holder = _hold_lock(env)
    try:
        caplog.set_level(logging.INFO, logger="dfdetect.registry")
        time.sleep(2.5)
        with pytest.raises(RegistryError, match="has no 'champion' to roll back"):
            registry.rollback(env["make"](lock_timeout_s=1, lock_lease_s=2), "the lease ran out")
        assert "lease of 2s expired" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_lock_lease_is_a_typed_param():
    assert parse_params({}).promotion.lock_lease_s == 900
    with pytest.raises(ParamsError, match="promotion.lock_lease_s"):
        parse_params({"promotion": {"lock_lease_s": 0}})


def test_models_list_tells_former_champions_from_the_champion(env, tmp_path):
    from typer.testing import CliRunner

    from dfdetect.cli import app

    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
    _register(env)
    promotion.promote(env["make"](floors={}), env["prepared"])
    status = {v["version"]: v["status"] for v in registry.list_versions(env["params"])["versions"]}
    assert status["2"] == "champion"
    assert status["1"].startswith("former champion (replaced by v2 on 20")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(env["params"].model_dump(mode="json")))
    shown = CliRunner().invoke(app, ["models", "list", "-p", str(params_file)], terminal_width=250)
    assert shown.exit_code == 0, shown.output
    row1 = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "former champion (replaced by v2" in row1 and "promoted" not in row1
    registry.rollback(env["params"], "worse on new uploads")
    status = {v["version"]: v["status"] for v in registry.list_versions(env["params"])["versions"]}
    assert status["1"] == "champion" and status["2"].startswith("former champion (rolled back to v1 on 20")


def test_dataset_floors_refuse_a_challenger_that_loses_on_another_set(env, sample_root):
    _register(env)
    raw = env["params"].model_dump(mode="json")

    def with_floors(floors):
        return parse_params(
            {
                **raw,
                "evaluate": {**raw["evaluate"], "datasets": [{"path": str(sample_root), "name": "other"}]},
                "promotion": {**raw["promotion"], "floors": {}, "dataset_floors": floors},
            }
        )

    with pytest.raises(RegistryError, match="'nope'"):  # refused before anything is scored or moved
        promotion.promote(with_floors({"nope": {"roc_auc": 0.5}}), env["prepared"])
    rejected = promotion.promote(
        with_floors({"other": {"roc_auc": 1.01, "real_fpr": 1.0}}), env["prepared"], env["tmp"]
    )
    assert rejected["verdict"] == "rejected" and _aliases(env) == {CHALLENGER: "1"}
    assert any(c.startswith("floor other roc_auc >= 1.01") and c.endswith("FAILS") for c in rejected["checks"])
    assert any(c.startswith("floor other real_fpr <= 1.0") and c.endswith("holds") for c in rejected["checks"])
    assert "The challenger on the suite sets" in (env["tmp"] / "promotion.md").read_text()
    promoted = promotion.promote(with_floors({"other": {"roc_auc": 0.0, "real_fpr_ratio": 2.0}}), env["prepared"])
    assert promoted["verdict"] == "rejected"  # no attribute groups on this set: the ratio is not measured, so it fails
    assert any("real_fpr_ratio" in c and "not measured" in c for c in promoted["checks"])
    promoted = promotion.promote(with_floors({"other": {"roc_auc": 0.0}}), env["prepared"])
    assert promoted["verdict"] == "promoted" and _aliases(env)[CHAMPION] == "1"
    assert promoted["challenger_suite"]["other"]["n_real"] > 0


def test_the_model_card_lists_training_sources_and_the_generalisation_table(env):
    metrics = json.loads(env["metrics"].read_text())
    metrics["datasets"] = {"elsewhere": {"n_real": 10, "n_fake": 10, "roc_auc": 0.61, "real_fpr": 0.3}}
    (env["tmp"] / "metrics.json").write_text(json.dumps(metrics))
    result = registry.register(env["params"], env["models"], env["tmp"] / "metrics.json", env["prepared"])
    card = registry.client_for(env["params"]).get_model_version(result["name"], result["version"]).description
    assert "## Training sources" in card and "| data |" in card  # the prepared data's one source, with its version
    assert "| elsewhere | 10 | 10 |" in card and "0.6100" in card
    # what a verdict means: the policy and its rates on validation, and on the evaluated split
    assert "## Operating point" in card and "equal error rate on validation: threshold" in card
    assert f"on the {metrics['split']} split at that threshold:" in card and "of real faces flagged" in card


def test_a_long_card_is_cut_at_a_line_for_the_registry():
    card = "# Model card\n" + "".join(f"| line {i} | {'x' * 80} |\n" for i in range(200))
    cut = model_card.card_description(card, "model_card/m-v1.md")
    assert len(cut) <= model_card.DESCRIPTION_LIMIT and "model_card/m-v1.md" in cut
    assert cut.split("\n\n(cut here")[0] in card and model_card.card_description("short", "x") == "short"
