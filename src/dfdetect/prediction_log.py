"""The audit trail of the service: every verdict it gives, written off the request path.

Requests hand their entries to a bounded queue (`PredictionLog.record` never blocks: when the queue is full the
entry is dropped and counted). One writer thread gathers entries and writes them as gzip-compressed JSON Lines
files, one per `flush_lines` entries or `flush_seconds`, each written whole under a temporary name and renamed
(or, on S3, one PUT): a service killed mid-write loses at most the entries not yet flushed and never leaves a
corrupt or half file. With `log_inputs` the image itself is kept too, under its SHA-256 (the same writer).

Where: a folder, or `s3://bucket/prefix` (endpoint from `AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL`).
Layout: `predictions/YYYY-MM-DD/predictions-<first entry's time>-<pid>-<n>.jsonl.gz`, `inputs/<sha256>.<ext>`,
`feedback/YYYY-MM-DD/<request id>-<time>.json`. `read_entries` reads it back (`dfdetect predictions query`).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .io_utils import atomic_write_bytes

log = logging.getLogger(__name__)
PREDICTIONS, INPUTS, FEEDBACK = "predictions", "inputs", "feedback"
LOG_SUFFIX = ".jsonl.gz"


class LogStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...  # whole or not at all

    def names(self, prefix: str) -> list[str]: ...

    def get(self, name: str) -> bytes: ...

    def exists(self, name: str) -> bool: ...


class FolderStore:
    """A folder: each file written under a temporary name, then renamed."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def names(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and ".tmp" not in p.name)

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()


class S3Store:
    """An S3 bucket and prefix: one PUT per file (S3 never shows half an object)."""

    def __init__(self, uri: str):
        import boto3

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        # a session of its own: boto3's default one keeps the credentials it first found in the environment
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def names(self, prefix: str) -> list[str]:
        out, strip = [], len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            out += [item["Key"][strip:] for item in page.get("Contents", [])]
        return sorted(out)

    def get(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError:
            return False


def open_store(where: str | Path) -> LogStore:
    return S3Store(str(where)) if str(where).startswith("s3://") else FolderStore(where)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def input_name(sha256: str, ext: str) -> str:
    return f"{INPUTS}/{sha256}{ext}"


class PredictionLog:
    """A bounded queue in front of one writer thread; see the module's docstring."""

    def __init__(
        self,
        store: LogStore,
        max_queue: int = 10_000,
        flush_lines: int = 1000,
        flush_seconds: float = 30.0,
        on_drop: Callable[[], None] = lambda: None,
    ):
        self.store, self.flush_lines, self.flush_seconds, self.on_drop = store, flush_lines, flush_seconds, on_drop
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._files, self.dropped, self.failed = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prediction-log")
        self._thread.start()

    def record(self, entry: dict, image: tuple[bytes, str] | None = None) -> bool:
        """Queue one verdict (and, with log_inputs, the image's bytes and extension); never blocks: False and
        counted when the queue is full."""
        try:
            self._queue.put_nowait((entry, image))
            return True
        except queue.Full:
            self.dropped += 1
            self.on_drop()
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop (the service's shutdown)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        batch: list[dict] = []
        first = 0.0
        while True:
            # wake at least twice a second, so that close() is seen soon whatever flush_seconds is
            wait = min(0.5, self.flush_seconds - (time.monotonic() - first)) if batch else 0.5
            try:
                entry, image = self._queue.get(timeout=max(0.01, wait))
                if image is not None:
                    self._keep_input(entry, *image)
                if not batch:
                    first = time.monotonic()
                batch.append(entry)
            except queue.Empty:
                if self._stop.is_set():
                    break
            if batch and (len(batch) >= self.flush_lines or time.monotonic() - first >= self.flush_seconds):
                self._write(batch)
                batch = []
        if batch:
            self._write(batch)

    def _keep_input(self, entry: dict, data: bytes, ext: str) -> None:
        name = input_name(entry["sha256"], ext)
        try:
            if not self.store.exists(name):  # content-addressed: the same image is kept once
                self.store.put(name, data)
            entry["input"] = name
        except Exception:  # storage down: the verdict is still logged, without its image
            log.exception("could not keep input %s", name)

    def _write(self, batch: list[dict]) -> None:
        stamp = batch[0]["time"].replace(":", "").replace("-", "")
        day = batch[0]["time"][:10]
        self._files += 1
        name = f"{PREDICTIONS}/{day}/{PREDICTIONS}-{stamp}-{os.getpid()}-{self._files:06d}{LOG_SUFFIX}"
        lines = "\n".join(json.dumps(e, sort_keys=True) for e in batch) + "\n"
        data = gzip.compress(lines.encode(), compresslevel=6)  # 9, the default, costs CPU the service shares
        try:
            self.store.put(name, data)
        except Exception:  # the log must never take the service down; the loss is counted and logged
            self.failed += len(batch)
            log.exception("could not write %d prediction log entries to %s", len(batch), name)


def parse_time(value: str) -> datetime:
    """An ISO 8601 time; UTC when it names no zone."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def read_entries(
    store: LogStore, since: str | None = None, until: str | None = None, version: str | None = None
) -> Iterator[dict]:
    """The logged verdicts in time order of their files, filtered by time (ISO 8601, UTC when no zone is given)
    and model version (`name/version` or the version alone)."""
    start, end = (parse_time(since) if since else None), (parse_time(until) if until else None)
    for name in store.names(PREDICTIONS):
        if not name.endswith(LOG_SUFFIX):
            continue
        day = name.split("/")[1] if name.count("/") >= 2 else ""
        if end and day and day > end.date().isoformat():  # a file starts at its first entry: all of it is later
            continue
        for line in gzip.decompress(store.get(name)).decode().splitlines():
            entry = json.loads(line)
            t = parse_time(entry["time"])
            if (start and t < start) or (end and t > end):
                continue
            if version and version not in (entry.get("model_version"), str(entry.get("model_version")).split("/")[-1]):
                continue
            yield entry


def write_feedback(store: LogStore, request_id: str, label: str, note: str = "", reviewer: str = "") -> dict:
    """A reviewer's label for one logged verdict, stored at once as its own file (reviews are few and each one
    counts)."""
    item = {"request_id": request_id, "label": label, "note": note, "reviewer": reviewer, "time": now_iso()}
    stamp = item["time"].replace(":", "").replace("-", "")
    store.put(f"{FEEDBACK}/{item['time'][:10]}/{request_id}-{stamp}.json", json.dumps(item).encode())
    return item


def read_feedback(store: LogStore) -> dict[str, dict]:
    """The latest review of each request id."""
    latest: dict[str, dict] = {}
    for name in store.names(FEEDBACK):
        if name.endswith(".json"):
            item = json.loads(store.get(name))
            if item["request_id"] not in latest or item["time"] >= latest[item["request_id"]]["time"]:
                latest[item["request_id"]] = item
    return latest
