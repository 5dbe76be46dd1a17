"""The stored-file helpers: every write lands whole or not at all."""

import csv

import pytest

from dfdetect.io_utils import atomic_write_csv


def test_csv_writer_writes_header_and_rows(tmp_path):
    path = tmp_path / "rows.csv"
    atomic_write_csv(path, [{"a": 1, "b": "x"}, {"a": 2, "b": "y,z"}], ["a", "b"])
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y,z"}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]  # no temporary left beside it


def test_csv_writer_failing_midway_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rows.csv"
    atomic_write_csv(path, [{"a": 1}], ["a"])
    before = path.read_bytes()

    def rows():
        yield {"a": 2}
        yield {"unexpected": 3}  # DictWriter refuses a key outside the fields

    with pytest.raises(ValueError):
        atomic_write_csv(path, rows(), ["a"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
