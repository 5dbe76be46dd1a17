"""The trained model as one typed artifact: what is saved is what is loaded, and nothing else reads the file."""

import pytest
import torch

from dfdetect.artifact import TrainedModel
from dfdetect.checkpoint import CheckpointError
from dfdetect.config import ModelParams
from dfdetect.models import create_model
from dfdetect.preprocessing import PreprocessConfig


def small() -> TrainedModel:
    spec = ModelParams(name="custom_cnn", pretrained=False)
    torch.manual_seed(0)
    return TrainedModel(
        create_model(spec).eval(),
        PreprocessConfig(32, face_margin=1.3, interpolation="bicubic"),
        0.42,
        spec=spec,
        provenance={"best_epoch": 3, "best_val_auc": 0.9},
    )


def test_save_then_load_gives_the_same_artifact(tmp_path):
    trained = small()
    trained.save(tmp_path / "m.pt", training_state={"optimizer": {"lr": 1.0}})
    back = TrainedModel.load(tmp_path / "m.pt")
    assert back.threshold == pytest.approx(0.42)
    assert back.preprocess == trained.preprocess and back.preprocess.interpolation == "bicubic"
    assert back.spec.name == "custom_cnn" and back.architecture == "custom_cnn"
    assert back.provenance == {"best_epoch": 3, "best_val_auc": 0.9}
    assert back.label_map == {"real": 0, "fake": 1}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.module(x), trained.module(x))


def test_calibration_returns_a_copy_and_travels_in_the_weights(tmp_path):
    trained = small()
    point = {"policy": "fpr", "target": 0.05, "threshold": 0.3, "val_fpr": 0.05, "val_recall": 0.8}
    calibrated = trained.with_calibration(2.0, {"temperature": 2.0}, point)
    assert float(trained.module.temperature) == 1.0  # the original is untouched
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(calibrated.module(x) * 2, trained.module(x), atol=1e-6)
    calibrated.save(tmp_path / "c.pt")
    back = TrainedModel.load(tmp_path / "c.pt")
    assert float(back.module.temperature) == 2.0 and back.threshold == 0.3 and back.calibration == {"temperature": 2.0}
    assert back.operating_point == point  # the policy and its validation rates travel with the weights


def test_bad_artifacts_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt"):
        TrainedModel.load(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="architecture spec"):
        TrainedModel(torch.nn.Linear(1, 1), PreprocessConfig(8)).save(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(8, interpolation="lanczos9")


def test_configs_written_before_the_resize_fields_still_load():
    legacy = {
        "image_size": 64,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": "shorter-side bilinear antialias + center crop",
    }
    pre = PreprocessConfig.from_dict(legacy)
    assert (pre.interpolation, pre.crop, pre.image_size) == ("bilinear", "center", 64)
    assert "resize" not in pre.to_dict() and pre.to_dict()["interpolation"] == "bilinear"
