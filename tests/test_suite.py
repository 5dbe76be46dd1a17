"""The generalisation suite: rows computed right on hand-made cases, faces cropped as training does, videos
scored per video, per-group false-positive rates, and the table through `evaluate`."""

import json
import shutil

import numpy as np
import pytest
from conftest import make_face_videos
from PIL import Image
from skimage import data as skdata

from dfdetect.config import FacesParams, ParamsError, SuiteSet, parse_params
from dfdetect.data import DatasetError
from dfdetect.suite import flat_metrics, group_rates, load_suite_set, score_row, table_markdown


def test_rows_report_the_rates_each_kind_of_set_allows():
    only_fakes = score_row(np.array([1, 1, 1, 1]), np.array([0.9, 0.8, 0.2, 0.7]), 0.5)
    assert only_fakes == {"n_real": 0, "n_fake": 4, "fake_recall": 0.75}
    only_reals = score_row(np.array([0, 0, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3, 0.4]), 0.5)
    assert only_reals == {"n_real": 5, "n_fake": 0, "real_fpr": 0.2}
    both = score_row(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.6, 0.7]), 0.5)
    assert (
        both["roc_auc"] == 1.0 and both["accuracy"] == 0.75 and both["real_fpr"] == 0.5 and both["fake_recall"] == 1.0
    )


def test_video_rows_score_the_mean_of_each_video():
    labels = np.array([0, 0, 1, 1, 1, 1])
    scores = np.array([0.2, 0.4, 0.9, 0.3, 0.6, 0.6])  # videos: r (0.3), f1 (0.6), f2 (0.6)
    row = score_row(labels, scores, 0.5, ["r", "r", "f1", "f1", "f2", "f2"])
    assert row["n_videos"] == 3 and row["video_roc_auc"] == 1.0
    assert row["video_fake_recall"] == 1.0 and row["video_real_fpr"] == 0.0
    assert row["fake_recall"] == 0.75  # frames: 0.3 is a miss


def test_group_rates_per_attribute_and_the_spread():
    files = [f"{age}_{g}_{r}_x.jpg" for age, g, r in [(20, 0, 0)] * 20 + [(30, 1, 1)] * 20 + [(40, 1, 2)] * 5]
    labels = np.zeros(45, dtype=int)
    scores = np.array([0.9] * 2 + [0.1] * 18 + [0.9] * 8 + [0.1] * 12 + [0.9] * 5)
    out = group_rates(
        files,
        labels,
        scores,
        0.5,
        r"^(?P<age>\d+)_(?P<gender>\d)_(?P<race>\d)_",
        {"gender": {"0": "male", "1": "female"}},
    )
    gender = out["gender"]
    assert gender["groups"]["male"] == {"n": 20, "n_real": 20, "n_fake": 0, "real_fpr": 0.1}
    assert gender["groups"]["female"] == {"n": 25, "n_real": 25, "n_fake": 0, "real_fpr": 13 / 25}
    assert gender["real_fpr_ratio"] == round((13 / 25) / 0.1, 4)
    race = out["race"]
    assert race["groups"]["2"]["n"] == 5 and race["real_fpr_max"] == 0.4  # 5 images: listed, not in the spread
    assert flat_metrics({"utk": {"n_real": 45, "groups": out}})["dataset/utk/gender/female/real_fpr"] == 13 / 25
    zero = group_rates(files[:40], labels[:40], np.array([0.1] * 20 + [0.9] * 20), 0.5, r"^\d+_(?P<g>\d)", {})
    assert zero["g"]["real_fpr_ratio"] is None  # no finite ratio when one group has no false positive


def test_a_numeric_attribute_is_rated_per_band_in_the_order_of_its_edges():
    # ages 1, 2 (under 3), 5 and 12 (3 to under 13), 13 (13 to under 60: an edge opens its band), 70 (60 and over)
    ages = [1, 2] * 15 + [5, 12] * 15 + [13] * 25 + [70] * 5
    files = [f"{age}_0_0_x.jpg" for age in ages]
    scores = np.array([0.9] * 15 + [0.1] * 15 + [0.9] * 3 + [0.1] * 27 + [0.9] * 5 + [0.1] * 20 + [0.9] * 5)
    pattern = r"^(?P<age>\d+)_(?P<gender>\d)_"
    out = group_rates(files, np.zeros(len(files), int), scores, 0.5, pattern, {}, {"age": [3, 13, 60]})
    age = out["age"]
    assert list(age["groups"]) == ["under 3", "3 to under 13", "13 to under 60", "60 and over"]
    assert [r["n"] for r in age["groups"].values()] == [30, 30, 25, 5]
    assert age["groups"]["under 3"]["real_fpr"] == 0.5 and age["groups"]["3 to under 13"]["real_fpr"] == 0.1
    assert age["real_fpr_ratio"] == 5.0  # 0.5 / 0.1: the 5 images of 60 and over are listed, too few to judge
    assert list(out["gender"]["groups"]) == ["0"]  # attributes without bands keep one group per value
    stored = json.loads(json.dumps(out, sort_keys=True))  # as metrics.json keeps it: keys sorted as text
    assert list(stored["age"]["groups"])[0] == "13 to under 60"
    table = table_markdown("suite", {"utk": {"n_real": len(files), "groups": stored}})
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and " to under " in line]
    assert rows == ["| 3 to under 13", "| 13 to under 60"]  # the model card's order is the bands' again
    assert table.index("| under 3 |") < table.index("| 3 to under 13 |") < table.index("| 60 and over |")
    unbanded = group_rates(files, np.zeros(len(files), int), scores, 0.5, pattern, {})
    assert len(unbanded["age"]["groups"]) == 6
    for name in ("x_0_0_y.jpg", "nan_0_0_y.jpg"):
        with pytest.raises(DatasetError, match=rf"{name}: attribute age is '\w+', not a finite number"):
            group_rates([name], np.zeros(1, int), np.zeros(1), 0.5, r"^(?P<age>\w+?)_", {}, {"age": [3]})
    halves = group_rates(["2_a.jpg", "3_a.jpg"], np.zeros(2, int), np.zeros(2), 0.5, r"^(?P<a>\d+)_", {}, {"a": [2.5]})
    assert list(halves["a"]["groups"]) == ["under 2.5", "2.5 and over"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"attribute_bins": {"age": [13, 3]}}, "strictly increasing"),
        ({"attribute_bins": {"age": []}}, "strictly increasing"),
        ({"attribute_bins": {"age": [float("nan")]}}, "finite numbers"),
        ({"attribute_bins": {"height": [3]}}, r"names \['height'\], not named groups of attributes"),
        ({"attribute_bins": {"age": [3]}, "attribute_names": {"age": {"1": "one"}}}, "either banded"),
        ({"attribute_bins": {"age": [3]}, "attributes": None}, "attribute_bins needs attributes"),
    ],
)
def test_attribute_bands_are_checked_against_the_pattern(fields, message):
    with pytest.raises(ValueError, match=message):
        SuiteSet(**{"path": "utk", "attributes": r"^(?P<age>\d+)_(?P<gender>\d)_", **fields})


def test_group_rates_spread_fake_recall_where_fakes_carry_groups_and_the_gate_bounds_the_worst_group():
    from dfdetect.promotion import decide

    files = [f"{g}_{i}.jpg" for g in (0, 1) for i in range(40)]
    labels = np.array(([0] * 20 + [1] * 20) * 2)
    # group 0: 2 of 20 reals flagged, 18 of 20 fakes caught; group 1: 8 of 20 flagged, 9 of 20 caught
    scores = np.array([0.9] * 2 + [0.1] * 18 + [0.9] * 18 + [0.1] * 2 + [0.9] * 8 + [0.1] * 12 + [0.9] * 9 + [0.1] * 11)
    groups = group_rates(files, labels, scores, 0.5, r"^(?P<g>\d)_", {"g": {"0": "a", "1": "b"}})["g"]
    assert groups["real_fpr_max"] == 0.4 and groups["real_fpr_ratio"] == 4.0
    assert groups["fake_recall_min"] == 0.45 and groups["fake_recall_ratio"] == 2.0
    row = {"n_real": 40, "n_fake": 40, "roc_auc": 0.8, "groups": {"g": groups}}
    metrics = {"roc_auc": 0.9}

    def gate(floors):
        params = parse_params({"promotion": {"floors": {}, "dataset_floors": {"utk": floors}}})
        return decide(params, metrics, None, {"utk": row})

    assert gate({"worst_group_real_fpr": 0.5, "real_fpr_ratio": 4.0})[0] == "promoted"
    verdict, checks = gate({"worst_group_real_fpr": 0.3})
    assert verdict == "rejected" and "floor utk worst_group_real_fpr <= 0.3: 0.4000 FAILS" in checks
    assert gate({"fake_recall_ratio": 1.5})[0] == "rejected" and gate({"worst_group_fake_recall": 0.5})[0] == "rejected"
    assert gate({"worst_group_fake_recall": 0.45})[0] == "promoted"


def test_suite_params_accept_paths_and_specs_and_refuse_bad_ones():
    params = parse_params({"evaluate": {"datasets": ["/a/lfw", {"path": "/b/utk", "attributes": r"^(?P<g>\d)"}]}})
    assert [s.label for s in params.evaluate.datasets] == ["lfw", "utk"]
    with pytest.raises(ParamsError, match="must differ"):
        parse_params({"evaluate": {"datasets": ["/a/x", "/b/x"]}})
    with pytest.raises(ParamsError, match="named group"):
        parse_params({"evaluate": {"datasets": [{"path": "/a", "attributes": r"\d+"}]}})
    with pytest.raises(ParamsError, match="dataset_floors"):
        parse_params({"promotion": {"dataset_floors": {"lfw": {"not_a_metric": 0.5}}}})


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """{real,fake}/ of whole photographs: the astronaut (a face, off-centre in a wider frame) and a face-free
    photo, so a face crop must find and keep only the face."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    (root / "real").mkdir(parents=True)
    (root / "fake").mkdir()
    wide = np.zeros((512, 1024, 3), np.uint8)
    wide[:, 512:] = skdata.astronaut()
    Image.fromarray(wide).save(root / "real" / "astronaut_wide.jpg", quality=95)
    Image.fromarray(skdata.astronaut()).save(root / "fake" / "astronaut.jpg", quality=95)
    Image.fromarray(skdata.coffee()).save(root / "fake" / "coffee.jpg", quality=95)
    return root


def test_stills_are_face_cropped_when_asked(photo_set):
    plain = load_suite_set(SuiteSet(path=str(photo_set)), 64, FacesParams())
    assert len(plain.split.labels) == 3 and plain.no_face == []
    cropped = load_suite_set(SuiteSet(path=str(photo_set), face_crop=True), 64, FacesParams())
    assert sorted(cropped.files) == ["fake/astronaut.jpg", "real/astronaut_wide.jpg"]
    assert cropped.no_face == ["fake/coffee.jpg"]
    # the wide photo's crop is its face, so it matches the crop of the plain photo, not its centre-crop
    crop_wide = cropped.split.images[cropped.files.index("real/astronaut_wide.jpg")].astype(float)
    crop_face = cropped.split.images[cropped.files.index("fake/astronaut.jpg")].astype(float)
    centre_wide = plain.split.images[plain.files.index("real/astronaut_wide.jpg")].astype(float)
    assert np.abs(crop_wide - crop_face).mean() < 0.5 * np.abs(centre_wide - crop_face).mean()


def test_videos_go_through_the_video_path(tmp_path):
    root = make_face_videos(tmp_path / "vids", {"test": 2}, frames=6)
    got = load_suite_set(SuiteSet(path=str(root)), 32, FacesParams(frames_per_video=3))
    assert got.has_videos and len(set(got.split.videos)) == 4
    assert len(got.split.labels) == 12 and set(got.files) == {
        p.relative_to(root).as_posix() for p in root.rglob("*.mp4")
    }


def test_a_set_with_nothing_usable_is_refused(tmp_path):
    (tmp_path / "empty" / "real").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images or videos"):
        load_suite_set(SuiteSet(path=str(tmp_path / "empty")), 32, FacesParams())


def test_evaluate_reports_the_suite_in_one_table(tracked_run, tmp_path, sample_root):
    from dfdetect.evaluate import evaluate

    reals = tmp_path / "reals_only"
    shutil.copytree(sample_root / "test" / "real", reals / "real")
    for i, path in enumerate(sorted((reals / "real").iterdir())):  # file names carry a group: 4 per group
        path.rename(path.with_name(f"{i % 2}_{path.name}"))
    params = tracked_run["params"].model_copy(
        update={
            "evaluate": parse_params(
                {
                    "evaluate": {
                        "robustness": False,
                        "datasets": [
                            str(sample_root),
                            {
                                "path": str(reals),
                                "name": "reals",
                                "attributes": r"^(?P<kind>\d)_",
                                "attribute_names": {"kind": {"0": "even"}},
                            },
                        ],
                    }
                }
            ).evaluate
        }
    )
    metrics = evaluate(
        params,
        tracked_run["prepared"],
        tracked_run["models"],
        tmp_path / "eval",
        tmp_path / "eval" / "metrics.json",
        tmp_path / "plots",
        track=False,
    )
    rows = metrics["datasets"]
    assert set(rows) == {sample_root.name, "reals"}
    assert rows[sample_root.name]["roc_auc"] == pytest.approx(metrics["roc_auc"])  # the same test split, scored alike
    assert set(rows["reals"]) >= {"n_real", "real_fpr", "groups"} and "roc_auc" not in rows["reals"]
    assert set(rows["reals"]["groups"]["kind"]["groups"]) == {"even", "1"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Generalisation suite" in report and "### reals: by kind" in report
    assert json.loads((tmp_path / "eval" / "datasets.json").read_text()) == rows


def test_every_suite_metric_name_is_one_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name

    files = ["20_0_0_a.jpg", "30_1_4_b.jpg"] * 10 + ["1_0_0_c.jpg", "70_0_0_d.jpg"]  # every age band
    groups = group_rates(
        files,
        np.zeros(22, int),
        np.linspace(0, 1, 22),
        0.5,
        r"^(?P<age>\d+)_(?P<g>\d)_(?P<race>\d)",
        {"race": {"4": "Others (mixed)", "0": "White"}},
        {"age": [3, 25, 60]},
    )
    names = flat_metrics({"utk": {"n_real": 20, "real_fpr": 0.5, "groups": groups}})
    assert "dataset/utk/race/Others _mixed_/real_fpr" in names
    per_group = [n for n in names if n.startswith("dataset/utk/age/") and n.endswith("/real_fpr")]
    assert sorted(per_group) == [
        f"dataset/utk/age/{b}/real_fpr" for b in ("25 to under 60", "3 to under 25", "60 and over", "under 3")
    ]
    for name in names:
        _validate_metric_name(name)


def test_command_line_sets_are_face_cropped_when_asked(tracked_run, photo_set, tmp_path):
    from conftest import REPO, last_json
    from typer.testing import CliRunner

    from dfdetect.cli import app

    args = [
        "evaluate",
        "--prepared",
        str(tracked_run["prepared"]),
        "--models",
        str(tracked_run["models"]),
        "--out",
        str(tmp_path / "eval"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--plots",
        str(tmp_path / "plots"),
        "--no-mlflow",
        "--dataset",
        str(photo_set),
        "--params",
        str(REPO / "params.yaml"),
    ]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert last_json(plain.output)["datasets"]["photos"]["no_face"] == 0  # scored whole
    cropped = CliRunner().invoke(app, args + ["--face-crop"])
    assert cropped.exit_code == 0, cropped.output
    assert last_json(cropped.output)["datasets"]["photos"]["no_face"] == 1  # the coffee has no face
