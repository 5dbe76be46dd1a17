"""Calibration: Platt scaling recovers a known over-confidence and a prior shift, lowers ECE, and lives in the weights."""

import numpy as np
import pytest
import torch

from dfdetect import checkpoint
from dfdetect.calibration import fit_platt, sigmoid
from dfdetect.metrics import compute_all, expected_calibration_error, reliability


def overconfident(n=20000, factor=3.0, seed=0):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2, n)
    labels = (rng.random(n) < sigmoid(true_logits)).astype(int)
    return true_logits * factor, labels  # a model 3x too sure of itself


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    logits, labels = overconfident()
    t, shift = fit_platt(logits, labels)
    assert abs(t - 3.0) < 0.3 and abs(shift) < 0.3
    before, after = (
        expected_calibration_error(labels, sigmoid(logits)),
        expected_calibration_error(labels, sigmoid((logits - shift) / t)),
    )
    assert after < 0.02 < before
    ranking = [compute_all(labels, sigmoid(z))["roc_auc"] for z in (logits, (logits - shift) / t)]
    assert abs(ranking[0] - ranking[1]) < 1e-9  # monotonic: ROC-AUC does not move


def test_a_validation_set_the_model_separates_does_not_make_it_certain():
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.uniform(2, 12, 100), rng.uniform(-12, -2, 100)])  # every fake above every real
    labels = np.r_[np.ones(100, int), np.zeros(100, int)]
    t, shift = fit_platt(logits, labels)
    calibrated = sigmoid((logits - shift) / t)
    # Platt's targets for 100 a class are 0.990 and 0.0098; plain log loss drove T to its bound (P = 1.0 and 0.0)
    assert calibrated[labels == 1].mean() < 0.99 and calibrated[labels == 0].mean() > 0.01
    assert t > 0.5


def test_a_prior_learnt_from_self_blends_is_shifted_back():
    # trained on 3 fakes to 1 (self-blends turn reals into fakes), scored on a balanced validation set: every
    # logit sits ln 3 too high, which a temperature alone cannot take away
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < sigmoid(true_logits)).astype(int)
    logits = true_logits + np.log(3.0)
    t, shift = fit_platt(logits, labels)
    assert abs(t - 1.0) < 0.1 and abs(shift - np.log(3.0)) < 0.1
    assert expected_calibration_error(labels, sigmoid((logits - shift) / t)) < 0.02
    best_temperature_alone = min(
        expected_calibration_error(labels, sigmoid(logits / s)) for s in np.linspace(0.3, 3.0, 28)
    )
    assert best_temperature_alone > 0.05


def test_reliability_bins_cover_every_score():
    logits, labels = overconfident(2000)
    bins = reliability(labels, sigmoid(logits))
    assert sum(b["count"] for b in bins) == 2000 and all(0 <= b["observed"] <= 1 for b in bins)


def test_training_stores_the_temperature_in_the_weights(prepared_small, tmp_path):
    from conftest import small_params

    from dfdetect.train import train

    train(
        small_params(mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}),
        prepared_small,
        tmp_path / "models",
        track=False,
    )
    state = checkpoint.load(tmp_path / "models" / "best.pt")
    t, shift = state["calibration"]["temperature"], state["calibration"]["logit_shift"]
    assert t > 0 and t != 1.0 and shift != 0.0 and state["threshold"] == state["calibration"]["threshold"]
    model, _ = checkpoint.model_from_state(state)
    x = torch.rand(2, 3, 48, 48)
    assert torch.allclose(model(x), (model.net(x).reshape(-1) - shift) / t, atol=1e-5)  # every loader serves it


def test_a_model_from_before_the_shift_loads_unshifted_and_its_run_resumes(prepared_small, tmp_path):
    import pickle

    from conftest import small_params

    from dfdetect.train import TrainError, train

    params = small_params()
    train(params, prepared_small, tmp_path / "models", track=False, stop_after_epochs=1)
    last = checkpoint.load(tmp_path / "models" / "last.pt")
    del last["state_dict"]["logit_shift"]  # as written before the shift existed
    checkpoint.save(tmp_path / "models" / "last.pt", last)
    model, _ = checkpoint.model_from_state(last)
    assert float(model.logit_shift) == 0.0
    result = train(params, prepared_small, tmp_path / "models", track=False, resume=tmp_path / "models" / "last.pt")
    assert result.completed
    # a whole pickled module (an MLflow model logged before the shift) scores, unshifted
    old = pickle.loads(pickle.dumps(model))
    del old._buffers["logit_shift"]
    unpickled = pickle.loads(pickle.dumps(old)).eval()
    x = torch.rand(2, 3, 48, 48)
    assert float(unpickled.logit_shift) == 0.0 and torch.allclose(unpickled(x), model.eval()(x))
    # a finished model is no checkpoint to train on: its weights are calibrated (and perhaps mixed)
    with pytest.raises(TrainError, match="resume from last.pt"):
        train(params, prepared_small, tmp_path / "again", track=False, resume=tmp_path / "models" / "best.pt")


def test_calibrating_a_calibrated_model_again_gives_the_same_calibration(prepared_small, tmp_path):
    from conftest import small_params

    from dfdetect.artifact import TrainedModel
    from dfdetect.calibration import calibrate
    from dfdetect.data import load_split
    from dfdetect.train import train

    train(small_params(), prepared_small, tmp_path / "models", track=False)
    once = TrainedModel.load(tmp_path / "models" / "best.pt")
    twice = calibrate(once, load_split(prepared_small, "val"), "cpu")
    for key in ("temperature", "logit_shift", "threshold"):
        assert twice.calibration[key] == pytest.approx(once.calibration[key], rel=1e-4, abs=1e-5), key


def test_calibrating_leaves_the_callers_model_as_it_was(prepared_small, tmp_path):
    from conftest import small_params

    from dfdetect.artifact import TrainedModel
    from dfdetect.calibration import calibrate
    from dfdetect.data import load_split
    from dfdetect.train import train

    train(small_params(), prepared_small, tmp_path / "models", track=False)
    trained = TrainedModel.load(tmp_path / "models" / "best.pt")
    trained.module.train()  # as the trainer hands it over
    before = {k: v.clone() for k, v in trained.module.state_dict().items()}
    calibrated = calibrate(trained, load_split(prepared_small, "val"), "cpu")
    assert trained.module.training and calibrated.module is not trained.module
    assert all(torch.equal(before[k], v) for k, v in trained.module.state_dict().items())
    assert all(p.device.type == "cpu" for p in trained.module.parameters())


def test_grad_cam_highlights_where_the_evidence_is():
    """A bright patch is the model's only evidence: the heatmap must be hot there and cold elsewhere."""
    from torch import nn

    from dfdetect.explain import grad_cam, overlay

    class Brightness(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            nn.init.constant_(self.conv.weight, 1 / 27), nn.init.zeros_(self.conv.bias)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(dim=(1, 2, 3)) * 10 - 1

    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 2:7, 2:7] = 1.0
    heat, p = grad_cam(Brightness(), x)
    assert heat.shape == (16, 16) and 0 <= p <= 1 and heat.max() == 1.0
    assert heat[3:6, 3:6].min() > 0.8 and heat[10:, 10:].max() < 0.05
    assert overlay(np.zeros((16, 16, 3), np.uint8), heat).shape == (16, 16, 3)


def test_grad_cam_explains_the_backbone_beside_a_residual_branch():
    from dfdetect.config import ModelParams
    from dfdetect.explain import grad_cam, last_conv
    from dfdetect.models import create_model

    model = create_model(ModelParams(name="custom_cnn", residual_branch=True))
    backbone_convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert last_conv(model) is backbone_convs[-1]  # not the branch's, which sees noise residuals
    heat, p = grad_cam(model, torch.rand(1, 3, 48, 48))
    assert heat.shape == (48, 48) and 0 <= p <= 1


def test_grad_cam_of_a_model_of_two_scales_maps_the_full_size_pass():
    from dfdetect.config import ModelParams
    from dfdetect.explain import grad_cam, last_conv
    from dfdetect.models import create_model

    model = create_model(ModelParams(name="custom_cnn", scales=[1, 2]))
    sizes = []
    handle = last_conv(model).register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    heat, p = grad_cam(model, torch.rand(1, 3, 64, 64))
    handle.remove()
    assert sizes[0] == 2 * sizes[1]  # both passes ran, the full-size one first
    assert heat.shape == (64, 64) and 0 <= p <= 1


def test_grad_cam_frees_its_feature_maps_and_leaves_no_gradients():
    """The service explains on request for days: nothing of one explanation may outlive it (a hook closure
    once kept every feature map alive through the autograd graph: ~0.3 MB per request)."""
    import gc
    import weakref

    from dfdetect.config import ModelParams
    from dfdetect.explain import grad_cam, last_conv
    from dfdetect.models import create_model

    model = create_model(ModelParams(name="custom_cnn"))
    seen = []
    last_conv(model).register_forward_hook(lambda _m, _i, out: seen.append(weakref.ref(out)))
    for _ in range(3):
        grad_cam(model, torch.rand(1, 3, 48, 48))
    gc.collect()
    assert seen and all(ref() is None for ref in seen)
    assert all(p.grad is None for p in model.parameters())


def test_explain_cli_writes_an_overlay(tracked_run, sample_root, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from dfdetect.cli import app

    image = next((sample_root / "test" / "fake").iterdir())
    out = tmp_path / "cam.png"
    result = CliRunner().invoke(
        app, ["explain", str(image), "-c", str(tracked_run["models"] / "best.pt"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert body["verdict"] in ("fake", "real") and Image.open(out).size == (48, 48)
    missing = CliRunner().invoke(
        app, ["explain", str(tmp_path / "none.jpg"), "-c", str(tracked_run["models"] / "best.pt")]
    )
    assert missing.exit_code != 0 and "none.jpg" in missing.output


def test_the_trained_model_decides_at_the_operating_point_its_params_chose(prepared_small, tmp_path):
    """train.operating_point: recall 0.75 -> the stored threshold catches >= 75 % of the validation fakes, on the
    calibrated scores the model serves, and the policy travels with the checkpoint."""
    from conftest import small_params

    from dfdetect.artifact import TrainedModel
    from dfdetect.data import load_split
    from dfdetect.evaluate import score_model
    from dfdetect.train import train

    point = {"policy": "recall", "target": 0.75}
    train(small_params(train={"operating_point": point}), prepared_small, tmp_path / "models", track=False)
    trained = TrainedModel.load(tmp_path / "models" / "best.pt")
    assert trained.operating_point["policy"] == "recall" and trained.operating_point["target"] == 0.75
    val = load_split(prepared_small, "val")
    scores = score_model(trained.module, trained.preprocess, val)[0]
    caught = (scores[val.labels == 1] >= trained.threshold).mean()
    assert caught >= 0.75 and caught == pytest.approx(trained.operating_point["val_recall"], abs=1e-6)
    assert trained.operating_point["val_fpr"] == pytest.approx((scores[val.labels == 0] >= trained.threshold).mean())
