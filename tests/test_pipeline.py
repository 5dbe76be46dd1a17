"""The Kubeflow pipeline: compiled YAML up to date, local runs with kfp.local, submission to a (recording) API."""

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from conftest import REPO, last_json
from typer.testing import CliRunner

from dfdetect.cli import app
from dfdetect.config import load_params
from pipelines.deepfake_pipeline import DEFAULT_IMAGE
from pipelines.runner import PipelineError, check_host, compile_pipeline

runner = CliRunner()
COMMITTED = REPO / "pipelines" / "deepfake_pipeline.yaml"
COMMITTED_MONITOR = REPO / "pipelines" / "monitor_and_retrain.yaml"


@pytest.mark.parametrize("monitor, committed", [(False, COMMITTED), (True, COMMITTED_MONITOR)])
def test_committed_yaml_is_up_to_date(tmp_path, monitor, committed):
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "p.yaml", DEFAULT_IMAGE, monitor)
    # As text, comment header included: its dict defaults are written in sorted order (stable_header)
    assert fresh.read_text() == committed.read_text(), (
        f"stale: run `dfdetect pipeline compile{' --monitor' if monitor else ''}` and commit {committed.name}"
    )


def test_the_compiled_header_lists_dict_defaults_in_sorted_order():
    from pipelines.runner import stable_header

    text = "# Inputs:\n#    train: dict [Default: {'b': 1, 'a': {'d': [2], 'c': '^x\\\\.4$'}}]\nspec: 1"
    assert (
        stable_header(text)
        == "# Inputs:\n#    train: dict [Default: {'a': {'c': '^x\\\\.4$', 'd': [2]}, 'b': 1}]\nspec: 1"
    )


def test_monitor_pipeline_checks_first_and_retrains_only_under_its_condition(tmp_path):
    spec = yaml.safe_load(
        compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "m.yaml", DEFAULT_IMAGE, True).read_text()
    )
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"monitor", "condition-1"}  # nothing but the check runs unless it says so
    assert "monitor" in tasks["condition-1"]["dependentTasks"] and "triggerPolicy" in tasks["condition-1"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert {"export-feedback", "fetch-data", "prepare-with-feedback", "train", "evaluate"} <= set(inner)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert "prediction_log" in defaults and defaults["monitor"]["defaultValue"]["drift_share"] == 0.5


def test_suite_sets_become_pipeline_arguments_without_nulls_and_parse_back():
    from dfdetect.config import parse_params
    from dfdetect.overrides import params_from, pipeline_sections

    params = parse_params({"evaluate": {"datasets": [{"path": "/data/utk", "attributes": r"^(?P<age>\d+)_"}]}})
    sections = pipeline_sections(params)
    entry = sections["evaluate"]["datasets"][0]
    assert "name" not in entry and "group_pattern" not in entry  # KFP has no null: unset fields are left out
    assert params_from({"evaluate": sections["evaluate"]}).evaluate == params.evaluate


def test_compiled_pipeline_has_typed_steps_condition_and_params_defaults(tmp_path):
    spec = yaml.safe_load(
        compile_pipeline(
            load_params(REPO / "params.yaml"), tmp_path / "p.yaml", "registry.local/dfdetect:9"
        ).read_text()
    )
    tasks = spec["root"]["dag"]["tasks"]
    assert {"fetch-data", "prepare", "train", "evaluate", "condition-1"} <= set(tasks)
    assert "triggerPolicy" in tasks["condition-1"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"register", "promote"}
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["roc"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert (
        spec["components"]["comp-train"]["outputDefinitions"]["artifacts"]["model_dir"]["artifactType"]["schemaTitle"]
        == "system.Model"
    )
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.local/dfdetect:9"}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert defaults["train"]["defaultValue"]["lr"] == params["train"]["lr"]
    assert defaults["model"]["defaultValue"]["name"] == params["model"]["name"]
    assert defaults["register_min_roc_auc"]["defaultValue"] == params["promotion"]["floors"]["roc_auc"]


class RecordingKFP(BaseHTTPRequestHandler):
    """Answers the Kubeflow Pipelines v2beta1 calls kfp.Client makes, and records them."""

    requests: list = []

    def _reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        self._reply({"multi_user": False} if "healthz" in self.path else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.endswith("/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif self.path.endswith("/runs"):
            self._reply(
                {"run_id": "run-1", "display_name": body["display_name"], "experiment_id": body["experiment_id"]}
            )
        else:
            self._reply({})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    RecordingKFP.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingKFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", RecordingKFP.requests
    server.shutdown()
    server.server_close()


def test_submit_uploads_the_spec_with_experiment_run_name_and_parameters(kfp_api):
    host, requests = kfp_api
    result = runner.invoke(
        app,
        [
            "pipeline",
            "submit",
            "--host",
            host,
            "--package",
            str(COMMITTED),
            "--experiment",
            "faces-v2",
            "--run-name",
            "nightly",
            "--dvc-repo",
            "https://git.example/dfdetect.git",
            "--dvc-rev",
            "v1.2",
            "--param",
            "train.lr=0.0007",
            "-p",
            str(REPO / "params.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["run_id"] == "run-1"
    posted = {path: body for method, path, body in requests if method == "POST"}
    assert posted["/apis/v2beta1/experiments"]["display_name"] == "faces-v2"
    run = posted["/apis/v2beta1/runs"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipelineInfo"] == yaml.safe_load(COMMITTED.read_text())["pipelineInfo"]
    values = run["runtime_config"]["parameters"]
    assert (
        values["train"]["lr"] == 0.0007
        and values["train"]["epochs"] == yaml.safe_load((REPO / "params.yaml").read_text())["train"]["epochs"]
    )
    assert values["dvc_repo"] == "https://git.example/dfdetect.git" and values["dvc_rev"] == "v1.2"


@pytest.mark.timeout(30)
def test_unreachable_host_is_named_quickly():
    from dfdetect.servers import free_port

    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PipelineError, match=f"Kubeflow Pipelines at {host} is unreachable"):
        check_host(host)


def test_unknown_parameter_is_refused_before_anything_runs(kfp_api):
    host, requests = kfp_api
    result = runner.invoke(
        app,
        [
            "pipeline",
            "submit",
            "--host",
            host,
            "--package",
            str(COMMITTED),
            "--param",
            "train.learning_rate=0.1",
            "-p",
            str(REPO / "params.yaml"),
        ],
    )
    assert result.exit_code == 2 and "train.learning_rate: unknown key" in result.output
    result = runner.invoke(
        app,
        [
            "pipeline",
            "submit",
            "--host",
            host,
            "--package",
            str(COMMITTED),
            "--param",
            "trainer.lr=0.1",
            "-p",
            str(REPO / "params.yaml"),
        ],
    )
    assert result.exit_code == 2 and "unknown parameter (no section 'trainer')" in result.output
    assert requests == []


def _small_params(tmp_path, suite=(), **promotion):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["image_size"] = 48
    params["train"].update(epochs=2, batch_size=16)
    params["evaluate"]["datasets"] = list(suite)
    params["promotion"].update(promotion)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def promoted_run(sample_root, tmp_path_factory):
    """One local run of the training pipeline on a fresh SQLite store, its version promoted: what the
    training-run test checks and the monitor-and-retrain test starts from (one run serves both)."""
    import mlflow

    home = tmp_path_factory.mktemp("local-run")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    # A floor on a suite set: the promote step must get the suite (evaluate) and the face crop (prepare) too.
    suite = [{"path": str(sample_root), "name": "again"}]
    params = _small_params(home, suite, floors={}, dataset_floors={"again": {"roc_auc": 0.5}})
    base = ["--data-source", str(sample_root), "--tracking-uri", uri, "-p", str(params)]
    base += ["--param", "promotion.floors={}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        result = runner.invoke(
            app,
            ["pipeline", "run", "--local", "--package", str(COMMITTED), "--pipeline-root", str(home / "root"), *base],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    # Read now: the monitor test registers more versions in the same store.
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias("dfdetect-detector", "champion").version
    return {"home": home, "uri": uri, "base": base, "outputs": last_json(result.output), "champion": str(champion)}


@pytest.mark.slow
def test_local_run_trains_evaluates_registers_and_promotes(promoted_run):
    outputs = promoted_run["outputs"]
    assert outputs["register"] == "1" and outputs["promote"] == "promoted"
    assert 0.0 <= outputs["metrics"]["roc_auc"] <= 1.0 and outputs["metrics"]["split"] == "test"
    assert promoted_run["champion"] == "1"
    run_dir = promoted_run["home"] / "root" / outputs["run_dir"].split("/")[-1]
    evaluate = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    assert "confusionMatrix" in evaluate["artifacts"]["roc"]["artifacts"][0]["metadata"]
    report = (run_dir / "promote" / "report").read_text()
    assert report.startswith("# Promotion of dfdetect-detector version 1")
    assert re.search(r"floor again roc_auc >= 0.5: [01]\.\d+ holds", report), report


@pytest.mark.slow
def test_a_failing_step_stops_the_run_names_it_and_registers_nothing(sample_root, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(sample_root, broken)
    shutil.rmtree(broken / "val")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(
        app,
        [
            "pipeline",
            "run",
            "--local",
            "--package",
            str(COMMITTED),
            "--data-source",
            str(broken),
            "--tracking-uri",
            uri,
            "--pipeline-root",
            str(tmp_path / "root"),
            "-p",
            str(_small_params(tmp_path)),
        ],
    )
    assert result.exit_code == 2
    assert "local pipeline run failed" in result.output and "'prepare'" in result.output
    assert mlflow.MlflowClient(uri).search_registered_models() == []


def _log_from_reference(tracking_uri: str, model_name: str, folder, shift: bool) -> str:
    """A prediction log of the champion's traffic: rows drawn from its own reference profile, or shifted
    (darker, four times larger images, mostly called fake)."""
    import mlflow
    import numpy as np

    from dfdetect.monitor import reference_of
    from dfdetect.prediction_log import FolderStore, PredictionLog, now_iso

    client = mlflow.MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias(model_name, "champion")
    rows = reference_of(client, champion.run_id)["rows"]
    rng = np.random.default_rng(0)
    log = PredictionLog(FolderStore(folder), flush_lines=1000, flush_seconds=60)
    for i, k in enumerate(rng.integers(0, len(rows), 40)):
        row = dict(rows[k])
        if shift:
            row.update(brightness=row["brightness"] * 0.3, width=row["width"] * 4, height=row["height"] * 4)
            row.update(verdict="fake", fake_probability=0.97)
        log.record({**row, "request_id": f"{i:032x}", "time": now_iso(), "model_version": f"{model_name}/1"})
    log.close()
    return str(folder)


@pytest.mark.slow
def test_local_monitor_and_retrain_registers_a_challenger_on_drift_and_nothing_without(promoted_run, monkeypatch):
    import mlflow

    home, uri, base = promoted_run["home"], promoted_run["uri"], promoted_run["base"]
    monkeypatch.chdir(home)
    client = mlflow.MlflowClient(uri)

    def monitor_run(log: str) -> dict:
        result = runner.invoke(
            app,
            ["pipeline", "run", "--local", "--monitor", "--package", str(COMMITTED_MONITOR), "--prediction-log", log]
            + ["--pipeline-root", str(home / "m")]
            + [*base, "--param", "monitor.min_items=10"],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return last_json(result.output)

    quiet = monitor_run(_log_from_reference(uri, "dfdetect-detector", home / "quiet", shift=False))
    assert quiet["monitor"] is False and "register" not in quiet
    assert [str(v.version) for v in client.search_model_versions("name='dfdetect-detector'")] == ["1"]
    drifted = monitor_run(_log_from_reference(uri, "dfdetect-detector", home / "drifted", shift=True))
    assert drifted["monitor"] is True and drifted["export-feedback"] == 0 and drifted["register"] == "2"
    assert {str(v.version) for v in client.search_model_versions("name='dfdetect-detector'")} == {"1", "2"}
    assert drifted["promote"] in ("promoted", "rejected")  # the usual gate decided
