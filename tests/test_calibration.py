"""Calibration: temperature scaling recovers a known over-confidence, lowers ECE, and lives in the weights."""

import numpy as np
import torch

from dfdetect import checkpoint
from dfdetect.calibration import fit_temperature, sigmoid
from dfdetect.metrics import compute_all, expected_calibration_error, reliability


def overconfident(n=20000, factor=3.0, seed=0):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2, n)
    labels = (rng.random(n) < sigmoid(true_logits)).astype(int)
    return true_logits * factor, labels  # a model 3x too sure of itself


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    assert abs(t - 3.0) < 0.3
    before, after = expected_calibration_error(labels, sigmoid(logits)), expected_calibration_error(labels, sigmoid(logits / t))
    assert after < 0.02 < before
    ranking = [compute_all(labels, sigmoid(z))["roc_auc"] for z in (logits, logits / t)]
    assert abs(ranking[0] - ranking[1]) < 1e-9  # monotonic: ROC-AUC does not move


def test_reliability_bins_cover_every_score():
    logits, labels = overconfident(2000)
    bins = reliability(labels, sigmoid(logits))
    assert sum(b["count"] for b in bins) == 2000 and all(0 <= b["observed"] <= 1 for b in bins)


def test_training_stores_the_temperature_in_the_weights(prepared_small, tmp_path):
    from conftest import small_params
    from dfdetect.train import train

    train(small_params(mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}), prepared_small, tmp_path / "models",
          track=False)
    state = checkpoint.load(tmp_path / "models" / "best.pt")
    t = state["calibration"]["temperature"]
    assert t > 0 and t != 1.0 and state["threshold"] == state["calibration"]["threshold"]
    model, _ = checkpoint.model_from_state(state)
    x = torch.rand(2, 3, 48, 48)
    assert torch.allclose(model(x), model.net(x).reshape(-1) / t, atol=1e-5)  # every loader serves it
