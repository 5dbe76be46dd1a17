"""Evaluation beyond one split: the robustness table and several data sets in one table, from the CLI."""

import json
import shutil

from typer.testing import CliRunner

from dfdetect.cli import app
from dfdetect.robustness import CONDITIONS


def test_evaluate_scores_robustness_and_other_data_sets(tracked_run, sample_root, tmp_path):
    fakes_only = tmp_path / "gan-faces"
    shutil.copytree(sample_root / "test" / "fake", fakes_only / "fake")
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(tracked_run["params"].model_dump(mode="json")))
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--prepared",
            str(tracked_run["prepared"]),
            "--models",
            str(tracked_run["models"]),
            "--out",
            str(out),
            "--metrics",
            str(out / "metrics.json"),
            "--plots",
            str(out / "plots"),
            "--no-mlflow",
            "--dataset",
            str(sample_root),
            "--dataset",
            str(fakes_only),
            "-p",
            str(params_file),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["robustness"]) == set(CONDITIONS) and metrics["robustness"]["clean"] == metrics["roc_auc"]
    table = json.loads((out / "robustness.json").read_text())
    assert all(set(row) == {"roc_auc", "average_precision", "eer", "accuracy"} for row in table.values())
    rows = metrics["datasets"]
    assert rows[sample_root.name]["roc_auc"] == metrics["roc_auc"]  # the same test split, scored the other way
    assert (
        set(rows["gan-faces"]) == {"n_real", "n_fake", "fake_recall", "unreadable", "no_face"}
        and rows["gan-faces"]["n_real"] == 0
    )
    report = (out / "report.md").read_text()
    assert "Robustness" in report and "gan-faces" in report and "ece" in report
    for figure in ("robustness.png", "reliability.png"):
        assert (out / "figures" / figure).stat().st_size > 0

    e2 = tmp_path / "e2"
    missing = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--prepared",
            str(tracked_run["prepared"]),
            "--models",
            str(tracked_run["models"]),
            "--out",
            str(e2),
            "--metrics",
            str(e2 / "metrics.json"),
            "--plots",
            str(e2 / "plots"),
            "--no-mlflow",
            "--dataset",
            str(tmp_path / "nowhere"),
            "-p",
            str(params_file),
        ],
    )
    assert missing.exit_code != 0 and "nowhere" in missing.output
    assert not e2.exists()  # refused before writing anything


def test_a_set_whose_file_names_carry_groups_gets_per_group_rates_and_a_plot(tracked_run, sample_root, tmp_path):
    """Fairness: group attributes from file names -> per-group real FPR and fake recall, the spread, a figure."""
    import yaml

    grouped = tmp_path / "people"
    for label in ("real", "fake"):
        (grouped / label).mkdir(parents=True)
        for i, path in enumerate(sorted((sample_root / "test" / label).iterdir())):
            shutil.copy(path, grouped / label / f"{i % 2}_{i}.jpg")  # group 0 or 1 in the name
    raw = tracked_run["params"].model_dump(mode="json")
    raw["evaluate"]["datasets"] = [
        {"path": str(grouped), "attributes": r"^(?P<group>\d)_", "attribute_names": {"group": {"0": "a", "1": "b"}}}
    ]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "eval"
    args = ["evaluate", "--prepared", str(tracked_run["prepared"]), "--models", str(tracked_run["models"])]
    args += ["--out", str(out), "--metrics", str(out / "m.json"), "--plots", str(out / "plots"), "--no-mlflow"]
    result = CliRunner().invoke(app, [*args, "-p", str(params_file)])
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "m.json").read_text())["datasets"]["people"]["groups"]["group"]["groups"]
    assert set(groups) == {"a", "b"} and all(
        {"real_fpr", "fake_recall", "n_real", "n_fake"} <= set(r) for r in groups.values()
    )
    assert sum(r["n"] for r in groups.values()) == len(list(grouped.rglob("*.jpg")))
    assert (out / "figures" / "groups_people.png").stat().st_size > 0
    assert "### people: by group" in (out / "report.md").read_text()
