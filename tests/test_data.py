"""Data tests: layout, schema of the manifest, balance, corrupt files and leakage."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import small_params

from dfdetect.data import DatasetError, discover, load_split
from dfdetect.labels import FAKE, REAL
from dfdetect.prepare import MANIFEST_FIELDS, prepare
from dfdetect.sample_data import generate


def test_labels_come_from_the_fixed_map_not_folder_order(sample_root):
    files, _ = discover(sample_root)
    # "fake" sorts before "real": a sort-order label map would make fake 0.
    assert {f.class_name: f.label for f in files} == {"fake": FAKE, "real": REAL}
    assert FAKE == 1 and REAL == 0


def test_manifest_schema_and_report(prepared_small, sample_root):
    rows = list(csv.DictReader((prepared_small / "manifest.csv").open()))
    assert list(rows[0].keys()) == MANIFEST_FIELDS
    assert len(rows) == 80
    for row in rows[:5]:
        data = (sample_root / row["path"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (int(row["width"]), int(row["height"])) == (64, 64)
        assert row["label"] == str(FAKE if row["class"] == "fake" else REAL)
    report = json.loads((prepared_small / "report.json").read_text())
    assert report["splits"]["train"] == {"real": 24, "fake": 24, "total": 48, "fake_fraction": 0.5, "videos": 0}
    assert "| train | 24 | 24 | 48 | 0.50 |" in (prepared_small / "report.md").read_text()


def test_cache_holds_resized_images_with_labels(prepared_small):
    split = load_split(prepared_small, "val")
    assert split.images.shape == (16, 48, 48, 3) and split.images.dtype == np.uint8
    assert sorted(split.labels.tolist()) == [0] * 8 + [1] * 8
    for path, label in zip(split.relpaths, split.labels):
        assert ("/fake/" in path) == (label == FAKE)


def test_sample_data_is_deterministic_and_balanced(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, {"train": 3, "val": 2}, size=48, seed=5)
    generate(b, {"train": 3, "val": 2}, size=48, seed=5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert len(list((a / "train" / "fake").iterdir())) == len(list((a / "train" / "real").iterdir())) == 3
    generate(tmp_path / "c", {"train": 3, "val": 2}, size=48, seed=6)
    assert (a / files_a[0]).read_bytes() != (tmp_path / "c" / files_a[0]).read_bytes()


def test_missing_split_is_named(data_copy):
    shutil.rmtree(data_copy / "val")
    with pytest.raises(DatasetError, match=r"data/val: missing split folder 'val'"):
        discover(data_copy)


def test_missing_test_split_is_noted(data_copy, tmp_path):
    shutil.rmtree(data_copy / "test")
    report = prepare(data_copy, tmp_path / "out", small_params().prepare)
    assert set(report["splits"]) == {"train", "val"}
    assert any("no 'test' split" in n for n in report["notes"])


def test_empty_class_is_named(data_copy):
    for f in (data_copy / "train" / "fake").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"train/fake: empty class"):
        discover(data_copy)


def test_corrupt_jpeg_is_listed_and_excluded(data_copy, tmp_path):
    victim = sorted((data_copy / "train" / "real").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    (data_copy / "train" / "fake" / "notes.png").write_text("not an image")
    report = prepare(data_copy, tmp_path / "out", small_params(prepare={"max_bad_fraction": 0.05}).prepare)
    assert report["files_found"] == 81 and report["files_used"] == 79
    assert any(victim.name in p and "not a readable image" in p for p in report["unreadable"])
    rows = {r["path"]: r["status"] for r in csv.DictReader((tmp_path / "out" / "manifest.csv").open())}
    assert rows[f"train/real/{victim.name}"] == "unreadable"
    assert "train/fake/notes.png" in rows


def test_too_many_corrupt_files_is_fatal_and_keeps_previous_output(data_copy, tmp_path):
    out = tmp_path / "out"
    prepare(data_copy, out, small_params().prepare)
    before = (out / "manifest.csv").read_bytes()
    for f in sorted((data_copy / "train" / "real").iterdir())[:10]:
        f.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"10 of 80 files are unreadable, above prepare.max_bad_fraction=0.05"):
        prepare(data_copy, out, small_params().prepare)
    assert (out / "manifest.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_leakage_across_splits_is_fatal_by_default(data_copy, tmp_path):
    src = sorted((data_copy / "train" / "fake").iterdir())[0]
    shutil.copy(src, data_copy / "test" / "fake" / "copied.jpg")
    with pytest.raises(DatasetError, match=r"leakage.*\n.*train/fake/.*test/fake/copied.jpg"):
        prepare(data_copy, tmp_path / "out", small_params().prepare)
    report = prepare(data_copy, tmp_path / "out", small_params(prepare={"allow_leakage": True}).prepare)
    assert len(report["leaks_across_splits"]) == 1


def test_drop_leaks_keeps_the_earliest_copy_and_lists_the_rest(data_copy, tmp_path):
    src = sorted((data_copy / "train" / "fake").iterdir())[0]
    shutil.copy(src, data_copy / "test" / "fake" / "copied.jpg")
    shutil.copy(src, data_copy / "val" / "fake" / "copied_too.jpg")
    report = prepare(data_copy, tmp_path / "out", small_params(prepare={"drop_leaks": True}).prepare)
    assert sorted(p.split(":")[0] for p in report["leaked_dropped"]) == [
        "test/fake/copied.jpg",
        "val/fake/copied_too.jpg",
    ]
    assert report["leaks_across_splits"] == [] and report["splits"]["train"]["fake"] == 24
    rows = {r["path"]: r["status"] for r in csv.DictReader((tmp_path / "out" / "manifest.csv").open())}
    assert rows["test/fake/copied.jpg"] == "leaked" and rows[src.relative_to(data_copy).as_posix()] == "ok"
    assert "dropped from the later one" in (tmp_path / "out" / "report.md").read_text()


def test_small_images_and_duplicates_are_excluded(data_copy, tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10), "white").save(data_copy / "val" / "real" / "tiny.png")
    src = sorted((data_copy / "val" / "real").glob("*.jpg"))[0]
    shutil.copy(src, data_copy / "val" / "real" / "dupe.jpg")
    report = prepare(data_copy, tmp_path / "out", small_params().prepare)
    assert any("tiny.png: 10x10 is under the minimum side of 16px" in p for p in report["too_small"])
    assert len(report["duplicates_within_split"]) == 1
    assert report["splits"]["val"]["real"] == 8


def test_missing_data_folder(tmp_path):
    with pytest.raises(DatasetError, match="data folder not found"):
        discover(tmp_path / "nothing")


# --- hardening (issue 14): files that are not regular files, and I/O errors while reading --------------


def _unreadable_entries(folder):
    """A FIFO (opening it would block), a broken symbolic link, and a file whose read fails with EIO."""
    import os

    os.mkfifo(folder / "pipe.jpg")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "eio.jpg").symlink_to("/proc/self/mem")  # stat says regular file; read() fails: Input/output error
    return [
        "pipe.jpg: not a regular file (a FIFO)",
        "gone.png: cannot be read (a broken symbolic link)",
        "eio.jpg: cannot be read (Input/output error)",
    ]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_fifos_broken_links_and_io_errors_are_counted_and_listed_as_unreadable(data_copy, tmp_path):
    expected = _unreadable_entries(data_copy / "train" / "real")
    report = prepare(data_copy, tmp_path / "out", small_params(prepare={"max_bad_fraction": 0.05}).prepare)
    assert report["files_found"] == 83 and report["files_used"] == 80
    for message in expected:
        assert any(p.endswith("train/real/" + message) for p in report["unreadable"]), (message, report["unreadable"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert (
        "## Unreadable or truncated (excluded): 3" in markdown and "pipe.jpg: not a regular file (a FIFO)" in markdown
    )
    rows = {r["path"]: r["status"] for r in csv.DictReader((tmp_path / "out" / "manifest.csv").open())}
    assert rows["train/real/pipe.jpg"] == rows["train/real/eio.jpg"] == "unreadable"


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_prepare_cli_turns_unreadable_files_into_a_clear_error(data_copy, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from dfdetect.cli import app

    _unreadable_entries(data_copy / "val" / "fake")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(small_params(prepare={"max_bad_fraction": 0.0}).model_dump(mode="json")))
    result = CliRunner().invoke(
        app, ["prepare", "-p", str(params_file), "--data", str(data_copy), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert "3 of 83 files are unreadable" in result.stderr and "val/fake/eio.jpg: cannot be read" in result.stderr
