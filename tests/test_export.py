"""ONNX export and the serving runtimes, bounded against eager PyTorch on real sample images."""

import json

import numpy as np
import pytest
import torch
from conftest import small_params

from dfdetect import checkpoint
from dfdetect.artifact import TrainedModel
from dfdetect.data import load_split
from dfdetect.export import FakeProbability, OnnxModel, export
from dfdetect.model_set import ServedModel
from dfdetect.preprocessing import normalize
from dfdetect.registry import LoadedModel
from dfdetect.train import train


@pytest.fixture(scope="module")
def trained(prepared_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    train(small_params(train={"epochs": 2}), prepared_small, out / "models", track=False)
    model, pre = checkpoint.model_from_state(checkpoint.load(out / "models" / "best.pt"))
    images = load_split(prepared_small, "test").images[:]
    return model, pre, images, out


def eager(model, pre, images):
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), pre)
    with torch.no_grad():
        return FakeProbability(model).eval()(x).numpy()


def test_export_writes_fp32_and_int8_models_close_to_eager(trained):
    model, pre, images, out = trained
    report = export(model, pre, 0.4, out / "onnx", int8=True, source="test")
    assert json.loads((out / "onnx" / "export.json").read_text())["threshold"] == 0.4
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), pre).numpy()
    reference = eager(model, pre, images)
    fp32 = OnnxModel((out / "onnx" / "model.onnx").read_bytes())(x)
    int8 = OnnxModel((out / "onnx" / "model.int8.onnx").read_bytes())(x)
    assert np.abs(fp32 - reference).max() < 1e-4
    assert np.abs(int8 - reference).max() < 0.05
    assert report["max_abs_difference_vs_eager"]["fp32"] < 1e-4


@pytest.mark.parametrize("runtime_name, tolerance", [("torch", 0.02), ("onnx", 1e-4), ("onnx-int8", 0.05)])
def test_serving_runtimes_agree_with_eager_pytorch(trained, runtime_name, tolerance):
    model, pre, images, _ = trained
    served = ServedModel(
        LoadedModel(TrainedModel(model, pre, 0.5, {"real": 0, "fake": 1}), "m", "1", None, "r"), "cpu", runtime_name
    )
    assert np.abs(served.predict(images) - eager(model, pre, images)).max() < tolerance
    assert served.predict(images[:1]).shape == (1,)  # any batch size


def test_auto_runtime_serves_with_onnx_runtime_on_the_cpu(trained):
    model, pre, images, _ = trained
    served = ServedModel(
        LoadedModel(TrainedModel(model, pre, 0.5, {"real": 0, "fake": 1}), "m", "1", None, "r"), "cpu", "auto"
    )
    assert served.runtime_name == "onnx"
    assert np.abs(served.predict(images) - eager(model, pre, images)).max() < 1e-4


def test_a_model_of_two_scales_trains_reloads_and_exports(prepared_small, tmp_path):
    train(small_params(model={"scales": [1, 2]}, train={"epochs": 1}), prepared_small, tmp_path / "m", track=False)
    model, pre = checkpoint.model_from_state(checkpoint.load(tmp_path / "m" / "best.pt"))
    assert model.scales == (1, 2)  # stored with the model: serving scores as training did
    images = load_split(prepared_small, "test").images[:]
    export(model, pre, 0.5, tmp_path / "onnx", int8=False, source="test")
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), pre).numpy()
    onnx = OnnxModel((tmp_path / "onnx" / "model.onnx").read_bytes())(x)
    assert np.abs(onnx - eager(model, pre, images)).max() < 1e-4


def test_a_model_with_the_residual_branch_trains_reloads_and_exports(prepared_small, tmp_path):
    train(
        small_params(model={"residual_branch": True}, train={"epochs": 1}), prepared_small, tmp_path / "m", track=False
    )
    model, pre = checkpoint.model_from_state(checkpoint.load(tmp_path / "m" / "best.pt"))
    assert model.branch is not None and model.branch.fc.weight.abs().sum() > 0  # trained, and reloaded with it
    images = load_split(prepared_small, "test").images[:]
    export(model, pre, 0.5, tmp_path / "onnx", int8=False, source="test")
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), pre).numpy()
    onnx = OnnxModel((tmp_path / "onnx" / "model.onnx").read_bytes())(x)
    assert np.abs(onnx - eager(model, pre, images)).max() < 1e-4
