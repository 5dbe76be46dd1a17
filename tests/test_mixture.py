"""A training mixture: several data sets in one prepared cache, stable splits for sets without split folders,
per-source caps, and training draws with a share per source."""

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import small_params

from dfdetect.config import ParamsError, parse_params
from dfdetect.data import DatasetError, load_split, original_path
from dfdetect.mixture import MixtureSampler, assign_splits, cap_per_class
from dfdetect.prepare import prepare
from dfdetect.sample_data import generate


@pytest.fixture(scope="module")
def unsplit_source(tmp_path_factory):
    """A second data set without split folders: {real,fake}/*.jpg, 30 of each."""
    made = tmp_path_factory.mktemp("unsplit") / "made"
    generate(made, {"train": 30, "val": 0}, size=64, seed=11)
    root = made.parent / "other"
    for class_name in ("real", "fake"):
        shutil.copytree(made / "train" / class_name, root / class_name)
    return root


def mixture_params(source_path, **source):
    return small_params(prepare={"name": "main", "sources": [{"path": str(source_path), "name": "other", **source}]})


def test_prepare_merges_sources_and_remembers_each_image_s_source(sample_root, unsplit_source, tmp_path):
    report = prepare(sample_root, tmp_path / "out", mixture_params(unsplit_source).prepare)
    assert set(report["sources"]) == {"main", "other"}
    other = report["sources"]["other"]
    assert sum(other[s][c] for s in other for c in ("real", "fake")) == 60  # every file of the source, once
    assert other["train"]["real"] > other["val"]["real"] > 0  # split 70/15/15 by file
    assert report["sources"]["main"]["train"] == {"real": 24, "fake": 24}  # the main set keeps its own splits
    rows = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    assert {r["dataset"] for r in rows} == {"main", "other"}
    assert all(r["path"].startswith("@other/") for r in rows if r["dataset"] == "other")
    train = load_split(tmp_path / "out", "train")
    assert sorted(set(train.datasets)) == ["main", "other"] and len(train.datasets) == len(train.labels)
    rel = next(r for r in train.relpaths if r.startswith("@other/"))
    assert original_path(tmp_path / "out", rel) == unsplit_source.resolve() / rel.split("/", 1)[1]
    assert "| other |" in (tmp_path / "out" / "report.md").read_text()


def test_a_source_s_split_does_not_depend_on_the_other_sources(sample_root, unsplit_source, tmp_path):
    prepare(sample_root, tmp_path / "a", mixture_params(unsplit_source).prepare)
    alone = parse_params(
        {
            "prepare": {
                "image_size": 48,
                "min_size": 16,
                "name": "x",
                "sources": [{"path": str(unsplit_source), "name": "other"}],
            }
        }
    )
    prepare(sample_root, tmp_path / "b", alone.prepare)

    def split_of(out):
        return {r["path"]: r["split"] for r in csv.DictReader((out / "manifest.csv").open()) if r["dataset"] == "other"}

    assert split_of(tmp_path / "a") == split_of(tmp_path / "b")


def test_max_per_class_caps_every_split_and_class(sample_root, unsplit_source, tmp_path):
    report = prepare(sample_root, tmp_path / "out", mixture_params(unsplit_source, max_per_class=5).prepare)
    counts = report["sources"]["other"]
    assert all(counts[s][c] <= 5 for s in counts for c in ("real", "fake"))
    assert counts["train"]["real"] == 5
    assert any("max_per_class=5" in n for n in report["notes"])


def test_groups_stay_in_one_split_and_caps_take_whole_groups():
    from pathlib import Path

    from dfdetect.data import ImageFile

    files = [
        ImageFile(Path(f"v{v}_{i}.jpg"), f"real/v{v}_{i}.jpg", "", "real", video=f"real/v{v}")
        for v in range(40)
        for i in range(3)
    ]
    split = assign_splits(files, {"train": 0.6, "val": 0.2, "test": 0.2}, "salt")
    by_video = {}
    for f in split:
        by_video.setdefault(f.video, set()).add(f.split)
    assert all(len(s) == 1 for s in by_video.values()) and {f.split for f in split} == {"train", "val", "test"}
    kept, dropped = cap_per_class(split, 4, "salt")  # whole videos of 3 frames: 2 videos = 6 frames per split
    per_split = {}
    for f in kept:
        per_split.setdefault(f.split, set()).add(f.video)
    assert all(len(v) == 2 for v in per_split.values()) and dropped == len(files) - len(kept)


def test_bad_mixture_params_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ParamsError, match="names must differ"):
        parse_params({"prepare": {"name": "a", "sources": [{"path": "x", "name": "a"}]}})
    with pytest.raises(ParamsError, match="prepare.sources.0.split"):
        parse_params({"prepare": {"sources": [{"path": "x", "split": {"train": 0.9, "val": 0.3}}]}})
    with pytest.raises(ParamsError, match="prepare.sources.0.name"):
        parse_params({"prepare": {"sources": [{"path": "x", "name": "has space"}]}})


def test_a_missing_source_folder_is_named(sample_root, tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*'gone'"):
        prepare(sample_root, tmp_path / "out", mixture_params(tmp_path / "nowhere", name="gone").prepare)
    assert not (tmp_path / "out").exists()


def test_mixture_sampler_gives_each_source_its_share():
    datasets = ["big"] * 900 + ["small"] * 100
    sampler = MixtureSampler(datasets, {"big": 1.0, "small": 1.0}, seed=0)
    assert sampler.counts() == {"big": 500, "small": 500}
    drawn = np.asarray(list(sampler))
    assert len(drawn) == len(sampler) == 1000
    assert (drawn >= 900).sum() == 500  # the small source drawn 5 times over, the big one half
    assert len(set(drawn[drawn >= 900].tolist())) == 100
    again = list(MixtureSampler(datasets, {"big": 1.0, "small": 1.0}, seed=0))
    assert again == drawn.tolist()  # the seed and epoch alone decide: a resumed run draws the same
    sampler.set_epoch(1)
    assert list(sampler) != drawn.tolist()
    ranks = [set(MixtureSampler(datasets, {"small": 3.0}, seed=0, rank=r, world=2)) for r in (0, 1)]
    assert MixtureSampler(datasets, {"small": 3.0}, seed=0).counts() == {"big": 250, "small": 750}
    assert ranks[0] and ranks[1]
    with pytest.raises(DatasetError, match="'nope'"):
        MixtureSampler(datasets, {"nope": 1.0}, seed=0)


def test_training_draws_by_source_weights_and_records_its_sources(sample_root, unsplit_source, tmp_path, monkeypatch):
    from dfdetect.train import train, training_sources

    params = small_params(
        prepare={"name": "main", "sources": [{"path": str(unsplit_source), "name": "other"}]},
        train={"epochs": 1, "source_weights": {"other": 2.0}},
    )
    prepare(sample_root, tmp_path / "prepared", params.prepare)
    result = train(params, tmp_path / "prepared", tmp_path / "models", track=False)
    assert result.completed
    sources = training_sources(tmp_path / "prepared")
    assert set(sources) == {"main", "other"} and sources["main"]["train"] == {"real": 24, "fake": 24}
    assert sources["other"]["version"] == "untracked"
    bad = small_params(train={"epochs": 1, "source_weights": {"nope": 1.0}})
    with pytest.raises(DatasetError, match="nope"):
        train(bad, tmp_path / "prepared", tmp_path / "models2", track=False)
    assert json.loads((tmp_path / "models" / "summary.json").read_text())["epochs_run"] == 1


def test_a_main_data_set_without_split_folders_is_split_by_group(unsplit_source, tmp_path):
    report = prepare(unsplit_source, tmp_path / "out", small_params(prepare={"name": "flat"}).prepare)
    assert set(report["splits"]) == {"train", "val", "test"} and report["files_used"] == 60
    assert any("no split folders" in n for n in report["notes"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images or videos"):
        prepare(tmp_path / "empty", tmp_path / "out2", small_params().prepare)
