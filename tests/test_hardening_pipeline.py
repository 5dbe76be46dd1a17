"""Hardening of the pipeline's lineage and stores (issue 14): what a fresh clone and a copied repository do."""

import shutil
import subprocess

import pytest
import yaml
from conftest import small_params

from dfdetect import tracking

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "dfdetect train",
            "deps": ["src/code.py"],
            "outs": ["models"],
            "metrics": [{"train/metrics.json": {"cache": False}}],
            "plots": [{"train/history.csv": {"cache": False}}],
        },
        "evaluate": {
            "cmd": "dfdetect evaluate",
            "deps": ["models"],
            "outs": ["eval/report", {"eval/plots": {"cache": False}}],
        },
    },
    "plots": ["eval/figures/roc.png", {"Training curves": {"x": "epoch", "y": {"train/history.csv": ["val_auc"]}}}],
}


def _git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_lineage_tells_a_changed_source_tree_from_the_pipeline_s_own_outputs(tmp_path):
    repo = tmp_path / "repo"
    files = {
        "src/code.py": "x = 1\n",
        "dvc.yaml": yaml.safe_dump(DVC_YAML),
        "dvc.lock": "schema: '2.0'\n",
        "train/metrics.json": "{}\n",
        "train/history.csv": "epoch\n",
        "eval/plots/roc.csv": "fpr,tpr\n",
        "eval/figures/roc.png": "png",
        "models_notes.txt": "not an output: only models/ is\n",
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "initial")
    sha = _git(repo, "rev-parse", "HEAD")
    assert tracking.git_commit(repo) == sha

    for rel in ("dvc.lock", "train/metrics.json", "train/history.csv", "eval/plots/roc.csv", "eval/figures/roc.png"):
        (repo / rel).write_text("rewritten by `dvc repro`\n")  # what a first `make run` does
    assert tracking.git_commit(repo) == sha
    assert tracking.git_commit(repo / "src") == sha  # from a subfolder too

    for rel in ("src/code.py", "models_notes.txt", "dvc.yaml"):
        before = (repo / rel).read_text()
        (repo / rel).write_text(before + "# changed\n")
        assert tracking.git_commit(repo) == sha + "-dirty", rel
        (repo / rel).write_text(before)
    _git(repo, "mv", "src/code.py", "src/moved.py")  # a rename is a change of source
    assert tracking.git_commit(repo) == sha + "-dirty"


def test_a_store_copied_from_another_checkout_is_refused_before_it_writes_there(tmp_path, monkeypatch):
    from dfdetect import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = tmp_path / "original"
    original.mkdir()
    params = small_params(mlflow={"tracking_uri": f"sqlite:///{original / 'mlflow.db'}"})
    mlflow = tracking.setup_mlflow(params)  # run from another folder (the repository): artifacts still go by the store
    location = mlflow.get_experiment_by_name(params.mlflow.experiment).artifact_location
    assert location.startswith(str(original) + "/"), location

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    copied = small_params(mlflow={"tracking_uri": f"sqlite:///{copy / 'mlflow.db'}"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it, and it wins
    with pytest.raises(tracking.TrackingError) as err:
        tracking.setup_mlflow(copied)
    message = str(err.value)
    assert f"keeps its artifacts in {location}" in message and f"outside {copy}" in message
    assert "README" in message and "copied" in message
    with pytest.raises(tracking.TrackingError, match="outside"):
        registry.client_for(copied)  # register, promote and rollback write artifacts too
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.setup_mlflow(params)  # the original store is fine
