"""Making a trained model cheaper: distillation (soft targets, a one-epoch student that is tracked, evaluated,
registered and gated), structured pruning (a pruned tiny model that reloads, exports and serves through the
registry), static int8 quantisation, and a smaller model input (model.image_size)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import small_params
from typer.testing import CliRunner

from dfdetect import promotion, registry, runtime
from dfdetect.artifact import TrainedModel
from dfdetect.cli import app
from dfdetect.config import DistillParams, ModelParams, parse_params
from dfdetect.distill import Teacher, distill
from dfdetect.evaluate import evaluate
from dfdetect.export import OnnxModel, calibration_images, export, onnx_bytes
from dfdetect.models import create_model
from dfdetect.models.resize import resize_to
from dfdetect.preprocessing import PreprocessConfig
from dfdetect.pruning import multiply_accumulates, prune, prune_channels
from dfdetect.train import TrainError, train, train_step


def _tiny(seed: int, size: int = 48) -> TrainedModel:
    torch.manual_seed(seed)
    return TrainedModel(create_model(ModelParams(name="custom_cnn")).eval(), PreprocessConfig(size))


def test_soft_targets_are_the_teachers_mean_at_the_temperature_and_leave_the_batch_alone():
    a, b = _tiny(1), _tiny(2, size=32)  # b was trained at another size: it sees its own
    teacher = Teacher([a, b], temperature=3.0, device=torch.device("cpu"))
    images = torch.rand(4, 3, 48, 48)
    kept = images.clone()
    soft = teacher.soft_targets(images)
    assert torch.equal(images, kept)
    from dfdetect.preprocessing import standardize

    with torch.no_grad():
        pa = torch.sigmoid(a.module(standardize(images, a.preprocess)) / 3.0)
        small = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        pb = torch.sigmoid(b.module(standardize(small, b.preprocess)) / 3.0)
    assert torch.allclose(soft, (pa + pb) / 2, atol=1e-6)


def test_the_distillation_loss_mixes_labels_and_soft_targets():
    x, y, soft = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)).float(), torch.rand(8)
    rt = runtime.resolve("cpu", "fp32", False)
    losses = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        m = create_model(ModelParams(name="custom_cnn")).eval()  # eval: dropout off, the same logits
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        loss, logits = train_step(m, opt, scaler, rt, x, y, soft, DistillParams(alpha=alpha, temperature=2.0))
        losses[alpha] = (loss.item(), logits)
    logits = losses[0.0][1]
    assert losses[0.0][0] == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item(), rel=1e-5)
    expected_soft = F.binary_cross_entropy_with_logits(logits / 2.0, soft).item() * 4.0
    assert losses[1.0][0] == pytest.approx(expected_soft, rel=1e-5)


def test_a_one_epoch_student_is_tracked_evaluated_registered_and_gated(tracked_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tracked_run["params"].model_dump(mode="json")
    raw["registry"] = {"model_name": f"student-{uuid.uuid4().hex[:8]}"}
    raw["train"]["epochs"] = 1
    raw["model"]["image_size"] = 32  # a cheaper student: a smaller input than the teacher's 48
    raw["distill"] = {"teachers": [str(tracked_run["models"] / "best.pt")], "alpha": 0.5, "temperature": 2.0}
    params = parse_params(raw)
    result = distill(params, tracked_run["prepared"], tmp_path / "student", tmp_path / "h.csv", tmp_path / "m.json")
    assert result.completed and result.run_id

    student = TrainedModel.load(tmp_path / "student" / "best.pt")
    assert student.preprocess.image_size == 32 and student.spec.image_size == 32
    assert student.lineage["distilled_from"] == [str(tracked_run["models"] / "best.pt")]
    import mlflow

    run = mlflow.MlflowClient(tracked_run["uri"]).get_run(result.run_id)
    assert json.loads(run.data.tags["dfdetect.lineage"])["alpha"] == 0.5

    metrics = evaluate(
        params,
        tracked_run["prepared"],
        tmp_path / "student",
        tmp_path / "eval",
        tmp_path / "eval" / "m.json",
        tmp_path / "plots",
    )
    assert 0.0 <= metrics["roc_auc"] <= 1.0
    registered = registry.register(
        params, tmp_path / "student", tmp_path / "eval" / "m.json", tracked_run["prepared"], tmp_path / "reg.json"
    )
    assert registered["alias"] == "challenger"
    card = registry.client_for(params).get_model_version(params.registry.model_name, registered["version"]).description
    assert "## Lineage" in card and "distilled from" in card
    refused = promotion.promote(
        parse_params({**raw, "promotion": {**raw["promotion"], "floors": {"roc_auc": 1.01}}}),
        tracked_run["prepared"],
    )
    assert refused["verdict"] == "rejected", "the student met the same gate as any challenger"
    promoted = promotion.promote(
        parse_params({**raw, "promotion": {**raw["promotion"], "floors": {"roc_auc": 0.0}}}),
        tracked_run["prepared"],
    )
    assert promoted["verdict"] == "promoted"
    assert registry.load("champion", params=params).trained.lineage["distilled_from"]


def test_the_cli_needs_a_teacher(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(small_params().model_dump(mode="json")))
    result = CliRunner().invoke(app, ["distill", "-p", str(params_file), "--prepared", str(tmp_path)])
    assert result.exit_code == 2 and "no teacher" in result.output


def test_a_pruned_network_is_rebuilt_from_its_weights_alone():
    module = create_model(ModelParams(name="custom_cnn", residual_branch=True)).eval()
    info = prune_channels(module, 48, 2.0)
    assert info["mac_speedup"] >= 2.0 and info["params_after"] < info["params_before"]
    fresh = create_model(ModelParams(name="custom_cnn", residual_branch=True))
    state = module.state_dict()
    with pytest.raises(RuntimeError):  # the architecture as registered does not fit ...
        fresh.load_state_dict(state)
    resize_to(fresh, state)  # ... until each layer takes the checkpoint's widths
    fresh.load_state_dict(state)
    x = torch.randn(3, 3, 48, 48)
    assert torch.allclose(fresh.eval()(x), module(x), atol=1e-5)


def test_a_pruned_tiny_model_fine_tunes_reloads_exports_and_serves(tracked_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from dfdetect.model_set import RegistryLoader, ServedModel

    raw = tracked_run["params"].model_dump(mode="json")
    raw["registry"] = {"model_name": f"pruned-{uuid.uuid4().hex[:8]}"}
    raw["train"]["epochs"] = 1
    raw["train"]["wise_alpha"] = 0.5  # a recipe that mixes its training back toward ImageNet: not a pruned fine-tune
    params = parse_params(raw)
    parent = TrainedModel.load(tracked_run["models"] / "best.pt")
    macs_before = multiply_accumulates(parent.module, 48)[0]
    result = prune(
        params, parent, "parent", 2.0, tracked_run["prepared"], tmp_path / "pruned", None, tmp_path / "m.json"
    )
    assert result.completed

    pruned = TrainedModel.load(tmp_path / "pruned" / "best.pt")
    assert macs_before / multiply_accumulates(pruned.module, 48)[0] >= 2.0
    assert pruned.lineage["pruned"]["mac_speedup"] >= 2.0 and pruned.calibration is not None
    assert "wise_ft" not in pruned.lineage
    report = export(pruned.module, pruned.preprocess, pruned.threshold, tmp_path / "onnx", int8=False)
    assert report["max_abs_difference_vs_eager"]["fp32"] < 1e-4

    evaluate(
        params,
        tracked_run["prepared"],
        tmp_path / "pruned",
        tmp_path / "eval",
        tmp_path / "eval" / "m.json",
        tmp_path / "plots",
    )
    registered = registry.register(params, tmp_path / "pruned", tmp_path / "eval" / "m.json", tracked_run["prepared"])
    card = registry.client_for(params).get_model_version(params.registry.model_name, registered["version"]).description
    assert "pruned from `parent`" in card
    served = ServedModel(RegistryLoader(params)("challenger"), "cpu", "onnx")  # what the service loads
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    scores = np.asarray(served.predict(images))
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))


def test_a_pruned_patch_model_keeps_its_one_logit_map_and_is_rebuilt_from_its_weights():
    module = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=3)).eval()
    info = prune_channels(module, 32, 1.5)
    assert info["mac_speedup"] >= 1.5
    assert module.net._patch_head._score.out_channels == 1  # the local logits are never pruned away
    fresh = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=3))
    resize_to(fresh, module.state_dict())
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fresh.eval()(x), module(x), atol=1e-5)


def test_pruning_refuses_data_prepared_for_another_model(tracked_run, tmp_path):
    parent = TrainedModel.load(tracked_run["models"] / "best.pt")
    other = TrainedModel(parent.module, PreprocessConfig(64), spec=parent.spec)
    with pytest.raises(ValueError, match="fine-tune on the data it was trained with"):
        prune(tracked_run["params"], other, "other", 2.0, tracked_run["prepared"], tmp_path / "p", track=False)


def test_static_int8_fixes_activation_ranges_from_calibration_images(tracked_run, tmp_path):
    trained = TrainedModel.load(tracked_run["models"] / "best.pt")
    images = calibration_images(tracked_run["prepared"], trained.preprocess, 32)
    assert images.shape == (16, 3, 48, 48)  # the val split holds 16: all of them
    report = export(trained.module, trained.preprocess, trained.threshold, tmp_path, True, "t", images)
    assert report["calibration_images"] == 16
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.int8-static.onnx")).graph.node}
    dynamic_ops = {node.op_type for node in onnx.load(str(tmp_path / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops, "ranges fixed beforehand"
    assert "DynamicQuantizeLinear" in dynamic_ops, "the dynamic model measures them per batch"
    assert report["max_abs_difference_vs_eager"]["int8_static"] < 0.2
    x = images[:4]
    assert OnnxModel((tmp_path / "model.int8-static.onnx").read_bytes())(x).shape == (4,)


def test_export_cli_writes_the_static_model(tracked_run, tmp_path):
    out = tmp_path / "exports"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "-c",
            str(tracked_run["models"] / "best.pt"),
            "-o",
            str(out),
            "--int8-static",
            "--calibration",
            str(tracked_run["prepared"]),
            "--calibration-images",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.int8-static.onnx").is_file()
    assert json.loads((out / "export.json").read_text())["calibration_images"] == 8


def test_a_model_input_larger_than_the_prepared_images_is_refused(prepared_small, tmp_path):
    params = small_params(model={"image_size": 96}, train={"epochs": 1})
    with pytest.raises(TrainError, match="model.image_size=96 is larger than the prepared images"):
        train(params, prepared_small, tmp_path / "m", track=False)


def test_onnx_graph_of_a_smaller_input_takes_that_size():
    module = create_model(ModelParams(name="custom_cnn")).eval()
    graph = onnx_bytes(module, 32)
    out = OnnxModel(graph)(np.zeros((2, 3, 32, 32), dtype=np.float32))
    assert out.shape == (2,)


def test_a_student_under_a_mixing_recipe_is_not_mixed_back_toward_imagenet(tracked_run, tmp_path):
    raw = tracked_run["params"].model_dump(mode="json")
    raw["model"] = {**raw["model"], "name": "efficientnet_lite0", "pretrained": True}
    raw["train"] = {**raw["train"], "epochs": 1, "wise_alpha": 0.5}  # mixes a trained run, not a student
    raw["mlflow"] = {**raw["mlflow"], "log_model": False}
    raw["distill"] = {"teachers": [str(tracked_run["models"] / "best.pt")], "alpha": 0.5, "temperature": 2.0}
    result = distill(parse_params(raw), tracked_run["prepared"], tmp_path / "student", track=False)
    assert result.completed and result.shipped_val_auc is None
    student = TrainedModel.load(tmp_path / "student" / "best.pt")
    assert "wise_ft" not in student.lineage and student.lineage["distilled_from"]
