"""The prediction log (audit trail): written off the request path, whole files only, read back and filtered;
reviews stored beside it and exported as a data set. The HTTP side is in tests/test_serving_audit.py."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dfdetect.feedback_export import ExportError, export_feedback
from dfdetect.prediction_log import (
    FolderStore,
    PredictionLog,
    open_store,
    read_entries,
    read_feedback,
    write_feedback,
)


def entry(i: int, version: str = "det/1", time_: str = "2026-12-03T08:00:00.000+00:00") -> dict:
    return {
        "request_id": f"{i:032x}",
        "time": time_,
        "model_version": version,
        "sha256": f"{i:064x}",
        "verdict": "real",
    }


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_entries_are_written_as_whole_compressed_files_and_read_back_filtered(tmp_path):
    store = FolderStore(tmp_path)
    log = PredictionLog(store, flush_lines=3, flush_seconds=60)
    for i in range(7):
        t = f"2026-12-0{1 + i % 3}T08:00:00.000+00:00"
        assert log.record(entry(i, "det/1" if i < 5 else "det/2", t))
    log.close()  # 3 + 3 + the last one, flushed at close
    files = sorted(tmp_path.rglob("*.jsonl.gz"))
    assert len(files) == 3 and all(f.parts[-3] == "predictions" for f in files)
    assert sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in files) == 7
    every = list(read_entries(store))
    assert sorted(e["request_id"] for e in every) == [f"{i:032x}" for i in range(7)]
    assert {e["request_id"] for e in read_entries(store, version="2")} == {f"{5:032x}", f"{6:032x}"}
    since = list(read_entries(store, since="2026-12-02T00:00:00", version="det/1"))
    assert sorted(e["time"][:10] for e in since) == ["2026-12-02", "2026-12-02", "2026-12-03"]  # i = 1, 4, 2
    assert list(read_entries(store, until="2026-11-30")) == []


def test_a_file_is_written_every_flush_seconds_while_verdicts_come(tmp_path):
    log = PredictionLog(FolderStore(tmp_path), flush_lines=1000, flush_seconds=0.2)
    log.record(entry(1))
    wait_for(lambda: list(tmp_path.rglob("*.jsonl.gz")))
    log.close()


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path):
    gate = threading.Event()

    class SlowStore(FolderStore):
        def put(self, name, data):
            gate.wait(10)
            super().put(name, data)

    drops = []
    log = PredictionLog(
        SlowStore(tmp_path), max_queue=2, flush_lines=1, flush_seconds=60, on_drop=lambda: drops.append(1)
    )
    started = time.monotonic()
    accepted = [log.record(entry(i)) for i in range(50)]
    assert time.monotonic() - started < 1.0  # the store is stuck: recording still returns at once
    assert accepted.count(False) == log.dropped == len(drops) >= 40
    gate.set()
    log.close()
    assert len(list(read_entries(FolderStore(tmp_path)))) == accepted.count(True)


def test_inputs_are_kept_once_under_their_hash(tmp_path):
    store = FolderStore(tmp_path)
    log = PredictionLog(store, flush_lines=10, flush_seconds=60)
    for i in range(3):
        log.record({**entry(i), "sha256": "ab" * 32}, (b"same image", ".jpg"))
    log.close()
    assert [p.name for p in (tmp_path / "inputs").iterdir()] == ["ab" * 32 + ".jpg"]
    assert {e["input"] for e in read_entries(store)} == {f"inputs/{'ab' * 32}.jpg"}


WRITER = """
import sys, time
from dfdetect.prediction_log import FolderStore, PredictionLog
log = PredictionLog(FolderStore(sys.argv[1]), flush_lines=50, flush_seconds=60)
i = 0
while True:
    log.record({"request_id": f"{i:032x}", "time": "2026-12-03T08:00:00.000+00:00", "sha256": "x" * 64,
                "pad": "p" * 2000})
    i += 1
    if i % 50 == 0:
        time.sleep(0.001)
"""


def test_a_killed_writer_leaves_only_complete_files(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], start_new_session=True)
    try:
        wait_for(lambda: len(list(tmp_path.rglob("*.jsonl.gz"))) >= 5, 60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-write, most likely: it writes files back to back
        proc.wait(10)
    files = list(tmp_path.rglob("*.jsonl.gz"))
    for f in files:  # every file that has the final name is whole: it decompresses and each line parses
        lines = gzip.decompress(f.read_bytes()).decode().splitlines()
        assert len(lines) == 50 and all(json.loads(line)["sha256"] == "x" * 64 for line in lines)
    assert len(list(read_entries(FolderStore(tmp_path)))) == 50 * len(files)  # temporaries are not read


def test_feedback_keeps_the_latest_review_and_exports_a_data_set(tmp_path):
    store = FolderStore(tmp_path / "log")
    log = PredictionLog(store, flush_lines=100, flush_seconds=60)
    for i in range(3):
        log.record({**entry(i), "sha256": f"{i:064x}", "fake_probability": 0.9}, (f"image {i}".encode(), ".jpg"))
    log.record(entry(3))  # logged without its image
    log.close()
    with pytest.raises(ExportError, match="no reviewed verdicts"):
        export_feedback(str(tmp_path / "log"), tmp_path / "out")
    write_feedback(store, f"{0:032x}", "real", reviewer="ana")
    time.sleep(0.002)
    write_feedback(store, f"{0:032x}", "fake", note="blending at the jaw", reviewer="ben")  # the later review wins
    write_feedback(store, f"{1:032x}", "real", reviewer="ana")
    write_feedback(store, f"{3:032x}", "fake")
    write_feedback(store, f"{9:032x}", "fake")  # never logged
    assert read_feedback(store)[f"{0:032x}"]["label"] == "fake"
    manifest = export_feedback(str(tmp_path / "log"), tmp_path / "out")
    out = tmp_path / "out"
    assert manifest["count"] == 2 and manifest["by_label"] == {"real": 1, "fake": 1}
    assert (out / "fake" / f"{0:064x}.jpg").read_bytes() == b"image 0"
    assert (out / "real" / f"{1:064x}.jpg").read_bytes() == b"image 1"
    assert manifest["reviewers"] == ["ana", "ben"]
    assert manifest["skipped"] == {"not_in_log": [f"{9:032x}"], "without_image": [f"{3:032x}"]}
    assert json.loads((out / "manifest.json").read_text())["items"][0]["note"] == "blending at the jaw"
    write_feedback(store, f"{1:032x}", "fake")  # relabelled: a second export replaces the first whole
    export_feedback(str(tmp_path / "log"), out)
    assert not (out / "real").exists() and len(list((out / "fake").iterdir())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_open_store_picks_s3_for_s3_uris(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://audit/serving/prod")
    assert type(store).__name__ == "S3Store" and (store.bucket, store.prefix) == ("audit", "serving/prod")
    assert isinstance(open_store(Path("/tmp/x")), FolderStore)


def test_export_with_dvc_is_pulled_by_a_fresh_clone(tmp_path):
    """`feedback export --dvc`: the data set is added and pushed, so a fresh clone of the repo pulls it."""
    repo, remote = tmp_path / "repo", tmp_path / "remote"

    def sh(*cmd, cwd=repo):
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    repo.mkdir()
    dvc = (sys.executable, "-m", "dvc")
    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    sh(*dvc, "remote", "add", "-d", "local", str(remote))
    store = FolderStore(tmp_path / "log")
    log = PredictionLog(store, flush_lines=10, flush_seconds=60)
    log.record({**entry(1), "sha256": "cd" * 32}, (b"kept image", ".jpg"))
    log.close()
    write_feedback(store, f"{1:032x}", "fake", reviewer="ana")
    export_feedback(str(tmp_path / "log"), repo / "feedback", dvc=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "reviewed data"], cwd=repo, check=True, env={**os.environ, **env})
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh(*dvc, "pull", cwd=clone)
    assert (clone / "feedback" / "fake" / f"{'cd' * 32}.jpg").read_bytes() == b"kept image"
    assert json.loads((clone / "feedback" / "manifest.json").read_text())["reviewers"] == ["ana"]


def test_reviewed_data_joins_the_training_mixture_only_when_it_has_images(tmp_path, sample_root):
    from conftest import small_params

    from dfdetect.feedback_export import with_feedback_source
    from dfdetect.prepare import prepare
    from dfdetect.sample_data import generate

    empty = tmp_path / "empty"
    empty.mkdir()
    base = small_params().prepare
    assert with_feedback_source(base, empty) == base  # nothing reviewed yet: the data alone
    reviewed = tmp_path / "reviewed"  # as an export lays it out: {real,fake}/, other images than the data's
    generate(tmp_path / "uploads", {"train": 10}, size=64, seed=99)
    for label in ("real", "fake"):
        (reviewed / label).mkdir(parents=True)
        for path in (tmp_path / "uploads" / "train" / label).iterdir():
            (reviewed / label / path.name).write_bytes(path.read_bytes())
    mixed = with_feedback_source(base, reviewed)
    assert [s.label for s in mixed.sources] == ["feedback"]
    prepare(sample_root, tmp_path / "prepared", mixed)
    manifest = (tmp_path / "prepared" / "manifest.csv").read_text()
    assert manifest.count("feedback,") >= 20  # every reviewed image is in the mixture, named by its source
