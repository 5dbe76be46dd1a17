import json
import shutil

import pytest
from conftest import REPO
from typer.testing import CliRunner

from dfdetect.cli import app

runner = CliRunner()


def test_unknown_params_key_fails_before_any_work(tmp_path, data_copy):
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  learnign_rate: 0.1\n", 1))
    result = runner.invoke(
        app, ["prepare", "--params", str(bad), "--data", str(data_copy), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "train.learnign_rate: unknown key (value 0.1)" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_split_via_cli(tmp_path, data_copy):
    shutil.rmtree(data_copy / "train")
    result = runner.invoke(
        app,
        ["prepare", "--params", str(REPO / "params.yaml"), "--data", str(data_copy), "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 2
    assert "missing split folder 'train'" in result.output


@pytest.mark.parametrize(
    "command, option",
    [
        ("sample-data", "--params"),
        ("fetch-data", "--remote-url"),
        ("prepare", "--params"),
        ("train", "--params"),
        ("evaluate", "--params"),
        ("predict", "--checkpoint"),
        ("check-params", "--params"),
    ],
)
def test_every_command_explains_its_options(command, option):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert option in result.output
    assert "Usage" in result.output


def test_train_with_missing_prepared_data_says_what_to_run(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--params",
            str(REPO / "params.yaml"),
            "--prepared",
            str(tmp_path / "none"),
            "--models",
            str(tmp_path / "m"),
            "--no-mlflow",
        ],
    )
    assert result.exit_code == 2
    assert "run `dfdetect prepare` first" in result.output


def test_predict_reports_unreadable_images_and_classifies_the_rest(prepared_small, tmp_path, sample_root):
    from conftest import small_params

    from dfdetect.train import train

    train(small_params(train={"epochs": 1}), prepared_small, tmp_path / "m", track=False)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xffnope")
    good = next((sample_root / "test" / "fake").iterdir())
    result = runner.invoke(
        app, ["predict", str(good), str(tmp_path / "broken.jpg"), "--checkpoint", str(tmp_path / "m" / "best.pt")]
    )
    assert result.exit_code == 1, result.output  # one input failed
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert lines[0]["label"] in ("real", "fake") and 0.0 <= lines[0]["fake_probability"] <= 1.0
    assert (
        "broken.jpg: not a readable image" in lines[1]["error"] and "broken.jpg: not a readable image" in result.stderr
    )


def test_fetch_data_reads_the_remote_it_is_given(tmp_path):
    """A clone has no DVC cache: the data come from --remote-url, and an empty remote is a clear error."""
    import subprocess

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copytree(REPO / "dvc-store", tmp_path / "team-remote")
    (tmp_path / "empty-remote").mkdir()
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "fetch-data",
            "--repo",
            str(clone),
            "--out",
            str(tmp_path / "data"),
            "--remote-url",
            str(tmp_path / "team-remote"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    import yaml

    tracked = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["nfiles"]
    fetched = list((tmp_path / "data").rglob("*.jpg"))
    assert len(fetched) == tracked and json.loads(ok.stdout.strip().splitlines()[-1])["files"] == tracked
    assert {p.relative_to(tmp_path / "data").parts[:2] for p in fetched} >= {("train", "real"), ("test", "fake")}

    bad = runner.invoke(
        app,
        [
            "fetch-data",
            "--repo",
            str(clone),
            "--out",
            str(tmp_path / "nothing"),
            "--remote-url",
            str(tmp_path / "empty-remote"),
        ],
    )
    assert bad.exit_code != 0 and "empty-remote" in bad.output and "data" in bad.output


# --- hardening (issue 14): predict's exit status and inputs that are not regular files ------------------


@pytest.fixture(scope="module")
def one_epoch_checkpoint(prepared_small, tmp_path_factory):
    from conftest import small_params

    from dfdetect.train import train

    models = tmp_path_factory.mktemp("predict") / "m"
    train(small_params(train={"epochs": 1}), prepared_small, models, track=False)
    return models / "best.pt"


@pytest.mark.timeout(120)
def test_predict_fails_when_inputs_fail_and_never_opens_a_fifo(one_epoch_checkpoint, tmp_path, sample_root):
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    bad = [fifo, tmp_path / "folder.jpg", tmp_path / "gone.jpg"]
    result = runner.invoke(app, ["predict", *map(str, bad), "--checkpoint", str(one_epoch_checkpoint)])
    assert result.exit_code == 1, result.output
    assert "pipe.jpg: not a regular file (a FIFO)" in result.stderr
    assert "folder.jpg: not a regular file (a directory)" in result.stderr
    assert "gone.jpg: cannot be read (a broken symbolic link)" in result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == list(map(str, bad))

    good = next((sample_root / "test" / "fake").iterdir())
    some = runner.invoke(app, ["predict", str(good), str(fifo), "--checkpoint", str(one_epoch_checkpoint)])
    assert some.exit_code == 1 and "1 of 2 inputs failed" in some.stderr
    assert json.loads(some.stdout.splitlines()[0])["label"] in ("real", "fake")
    ok = runner.invoke(app, ["predict", str(good), "--checkpoint", str(one_epoch_checkpoint)])
    assert ok.exit_code == 0 and ok.stderr == ""


def test_predict_prints_content_credentials_beside_the_score(one_epoch_checkpoint, tmp_path, sample_root):
    """`dfdetect predict` shows what a file declares (C2PA) and the model's P(fake), both, for each file."""
    from c2pa_signing import sign_image, tamper

    plain = next((sample_root / "test" / "real").iterdir())
    declared = tmp_path / "declared.jpg"
    declared.write_bytes(sign_image(plain.read_bytes(), ai_generated=True))
    noisy = tmp_path / "noisy.jpg"
    from PIL import Image

    Image.effect_noise((96, 96), 80).convert("RGB").save(noisy, "JPEG")
    tampered = tmp_path / "tampered.jpg"
    tampered.write_bytes(tamper(sign_image(noisy.read_bytes())))
    result = runner.invoke(
        app, ["predict", str(plain), str(declared), str(tampered), "--checkpoint", str(one_epoch_checkpoint)]
    )
    assert result.exit_code == 0, result.output
    plain_line, declared_line, tampered_line = [json.loads(line) for line in result.stdout.splitlines()]
    assert plain_line["provenance"]["present"] is False
    assert declared_line["provenance"]["ai_generated"] is True and declared_line["provenance"]["valid"] is True
    assert declared_line["fake_probability"] == pytest.approx(plain_line["fake_probability"], abs=1e-6)
    assert tampered_line["provenance"]["valid"] is False and "label" in tampered_line
    off = runner.invoke(app, ["predict", str(declared), "--no-content-credentials", "-c", str(one_epoch_checkpoint)])
    assert off.exit_code == 0 and "provenance" not in json.loads(off.stdout)
