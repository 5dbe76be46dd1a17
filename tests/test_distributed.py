"""Data-parallel training: 2 processes on the CPU (gloo), launched by `dfdetect train --nproc 2`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dfdetect import checkpoint
from dfdetect.prepare import prepare
from dfdetect.sample_data import generate
from dfdetect.train import train

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
EPOCHS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # The mechanics of data-parallel training, not a recipe: the compact CNN at 64 px keeps three runs short.
    raw["prepare"]["image_size"] = 64
    raw["model"].update(name="custom_cnn", pretrained=False, dropout=0.3)
    raw["train"].update(
        epochs=EPOCHS, batch_size=32, early_stopping_patience=0, lr=0.002, precision="auto", channels_last="auto"
    )
    # A recipe that converges within the epochs: the raw weights validated (a weight average over ~150 steps
    # lags far behind them) and no self-blends, so two runs are compared where they settle, not mid-climb
    raw["train"]["ema_decay"] = 0.0
    raw["train"]["wise_alpha"] = 1.0  # no ImageNet weights to mix back toward
    raw["train"]["sbi"]["mode"] = "none"
    raw["mlflow"]["log_model"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    from dfdetect.config import parse_params

    params = parse_params(raw)
    generate(root / "data", {"train": 300, "val": 100}, size=64, seed=5)
    prepare(root / "data", root / "prepared", params.prepare)
    return root, params


def ddp(root, env, *extra):
    cmd = [
        str(BIN / "dfdetect"),
        "train",
        "--nproc",
        "2",
        "--prepared",
        "prepared",
        "--models",
        "models-ddp",
        "--history",
        "ddp-history.csv",
        "--metrics",
        "ddp-metrics.json",
        "-p",
        "params.yaml",
        *extra,
    ]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def test_two_processes_train_one_run_close_to_a_single_process(setup):
    import mlflow

    root, params = setup
    single = train(params, root / "prepared", root / "models-single", track=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = ddp(root, env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["completed"] and result["epochs_run"] == EPOCHS and result["run_id"]

    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("dfdetect").experiment_id]
    )
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # exactly one run: rank 0's
    assert len(mlflow.MlflowClient(uri).get_metric_history(result["run_id"], "val_auc")) == EPOCHS
    state = checkpoint.load(root / "models-ddp" / "last.pt")
    assert state["world"] == 2 and len(state["rng"]["ranks"]) == 2
    assert abs(result["best_val_auc"] - single.best_val_auc) < 0.1, (result["best_val_auc"], single.best_val_auc)


def test_resume_continues_with_the_same_number_of_processes(setup):
    root, _ = setup
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    first = ddp(root, env, "--no-mlflow", "--stop-after-epochs", "3", "--models", "models-resume")
    assert first.returncode == 0, first.stderr[-3000:]
    # the later --models wins: typer keeps the last value of a repeated option
    resumed = ddp(root, env, "--no-mlflow", "--models", "models-resume", "--resume", "models-resume/last.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["epochs_run"] == EPOCHS
    single = subprocess.run(
        [
            str(BIN / "dfdetect"),
            "train",
            "--prepared",
            "prepared",
            "--models",
            "models-resume",
            "--no-mlflow",
            "-p",
            "params.yaml",
            "--resume",
            "models-resume/last.pt",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 2 and "processes: checkpoint 2, now 1" in single.stderr
