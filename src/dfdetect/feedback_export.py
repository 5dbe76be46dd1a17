"""Reviewed verdicts -> a data set: the images the service kept (serving.log_inputs), labelled by their latest
review, in the seed layout `{real,fake}/` that a training mixture reads (prepare.sources splits it by file),
with a manifest of which requests, model versions and reviewers each image came from; optionally versioned
with DVC (`dvc add` + `dvc push`)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import PrepareParams, SourceParams
from .io_utils import atomic_write_bytes, atomic_write_json
from .prediction_log import now_iso, open_store, read_entries, read_feedback

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    pass


def export_feedback(log_uri: str, out: str | Path, dvc: bool = False) -> dict:
    """Write the data set at `out` (replacing an earlier export whole) and return its manifest."""
    store, out = open_store(log_uri), Path(out)
    reviews = read_feedback(store)
    if not reviews:
        raise ExportError(f"{log_uri}: no reviewed verdicts yet (POST /feedback)")
    logged = {e["request_id"]: e for e in read_entries(store)}
    items, not_logged, no_input = [], [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for request_id, review in sorted(reviews.items()):
            entry = logged.get(request_id)
            if entry is None:
                not_logged.append(request_id)  # unknown id, or its log file not flushed yet
                continue
            if not entry.get("input"):
                no_input.append(request_id)  # logged without its image (serving.log_inputs was off)
                continue
            rel = f"{review['label']}/{entry['sha256']}{Path(entry['input']).suffix}"
            atomic_write_bytes(staging / rel, store.get(entry["input"]))
            items.append(
                {
                    "file": rel,
                    "label": review["label"],
                    "request_id": request_id,
                    "reviewer": review.get("reviewer", ""),
                    "note": review.get("note", ""),
                    "reviewed_at": review["time"],
                    "model_version": entry.get("model_version"),
                    "model_verdict": entry.get("verdict"),
                    "fake_probability": entry.get("fake_probability"),
                    "sha256": entry["sha256"],
                }
            )
        if not items:
            raise ExportError(
                f"{log_uri}: {len(reviews)} reviewed verdicts, none with a kept image "
                f"({len(no_input)} logged without their image: serving.log_inputs; {len(not_logged)} not in the log)"
            )
        manifest = {
            "created": now_iso(),
            "source": str(log_uri),
            "count": len(items),
            "by_label": {label: sum(i["label"] == label for i in items) for label in ("real", "fake")},
            "reviewers": sorted({i["reviewer"] for i in items if i["reviewer"]}),
            "skipped": {"not_in_log": not_logged, "without_image": no_input},
            "items": items,
        }
        atomic_write_json(staging / "manifest.json", manifest)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if dvc:
        _dvc("add", out)
        _dvc("push", out.with_name(out.name + ".dvc"))
    return manifest


def export_feedback_or_nothing(log_uri: str, out: str | Path) -> int:
    """The export for a pipeline step: how many items, or 0 and an empty folder when none was reviewed yet."""
    try:
        return export_feedback(log_uri, out)["count"]
    except ExportError as exc:
        log.info("no reviewed data set: %s", exc)
        Path(out).mkdir(parents=True, exist_ok=True)
        return 0


def with_feedback_source(prepare: PrepareParams, folder: str | Path) -> PrepareParams:
    """prepare params with the exported reviews as one more mixture source named `feedback`, when the folder
    holds any image (a first run, with nothing reviewed yet, trains on the data alone)."""
    if not any(p.is_file() and p.name != "manifest.json" for p in Path(folder).rglob("*")):
        return prepare
    source = SourceParams(path=str(folder), name="feedback")
    return prepare.model_copy(update={"sources": [*prepare.sources, source]})


def _replace(new: Path, out: Path) -> None:
    """Swap the finished folder in: the old export stays whole until the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    new.rename(out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _dvc(command: str, target: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", command, target.name], cwd=target.parent, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise ExportError(f"dvc {command} {target}: {(done.stderr or done.stdout).strip()[-1500:]}")
