"""The decision threshold as a policy: EER, a false-positive budget, or a recall target, chosen on validation."""

import numpy as np
import pytest
from pydantic import ValidationError

from dfdetect.config import OperatingPointParams, Params
from dfdetect.metrics import eer_and_threshold
from dfdetect.operating_point import choose, describe


def scores_of_two_overlapping_classes(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n + [1] * n)
    scores = np.concatenate([rng.beta(2, 5, n), rng.beta(5, 2, n)])
    return labels, scores


def test_eer_policy_is_the_equal_error_threshold():
    labels, scores = scores_of_two_overlapping_classes()
    point = choose(labels, scores, OperatingPointParams())
    assert point["policy"] == "eer" and point["target"] is None
    cut = eer_and_threshold(labels, scores)[1]  # the stored threshold flags what cutting there flags
    assert np.array_equal(scores >= point["threshold"], scores >= cut) and point["threshold"] < cut
    assert abs(point["val_fpr"] - (1 - point["val_recall"])) < 0.02  # the two error rates meet


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_fpr_policy_flags_at_most_the_budget_and_no_lower_threshold_would(target):
    labels, scores = scores_of_two_overlapping_classes()
    point = choose(labels, scores, OperatingPointParams(policy="fpr", target=target))
    reals, fakes = scores[labels == 0], scores[labels == 1]
    assert (reals >= point["threshold"]).mean() <= target == point["target"]
    assert point["val_fpr"] == pytest.approx((reals >= point["threshold"]).mean())
    assert point["val_recall"] == pytest.approx((fakes >= point["threshold"]).mean())
    lower = scores[scores < point["threshold"]].max()  # the next threshold down breaks the budget
    assert (reals >= lower).mean() > target


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_recall_policy_catches_the_target_and_no_higher_threshold_would(target):
    labels, scores = scores_of_two_overlapping_classes()
    point = choose(labels, scores, OperatingPointParams(policy="recall", target=target))
    fakes = scores[labels == 1]
    assert (fakes >= point["threshold"]).mean() >= target
    higher = np.unique(scores[scores > point["threshold"]])[1]  # the next cut up (the first is the one chosen)
    assert (fakes >= higher).mean() < target


@pytest.mark.parametrize("policy, target", [("recall", 0.75), ("fpr", 0.25), ("eer", None)])
def test_scoring_the_same_images_again_with_float_noise_keeps_the_measured_rates(policy, target):
    """Scores that crowd together (a weak model, calibrated), scored again with last-bit noise: the stored
    threshold must not sit on one of them, or that image flips and the stored recall is no longer true."""
    rng = np.random.default_rng(3)
    labels = np.array([0] * 8 + [1] * 8)
    scores = 0.5 + rng.normal(0, 3e-4, 16)
    point = choose(labels, scores, OperatingPointParams(policy=policy, target=target))
    for shift in (-1e-9, 1e-9):
        again = scores + shift
        assert (again[labels == 1] >= point["threshold"]).mean() == pytest.approx(point["val_recall"])
        assert (again[labels == 0] >= point["threshold"]).mean() == pytest.approx(point["val_fpr"])


def test_a_stricter_budget_moves_the_threshold_up_and_costs_recall():
    labels, scores = scores_of_two_overlapping_classes()
    loose = choose(labels, scores, OperatingPointParams(policy="fpr", target=0.2))
    strict = choose(labels, scores, OperatingPointParams(policy="fpr", target=0.01))
    assert strict["threshold"] > loose["threshold"] and strict["val_recall"] < loose["val_recall"]
    assert "1.00% of real faces flagged" in describe(strict)


def test_policy_params_are_checked():
    with pytest.raises(ValidationError, match="needs a target"):
        OperatingPointParams(policy="fpr")
    with pytest.raises(ValidationError, match="takes no target"):
        OperatingPointParams(policy="eer", target=0.1)
    with pytest.raises(ValidationError):
        OperatingPointParams(policy="fpr", target=1.5)
    params = Params.model_validate({"train": {"operating_point": {"policy": "recall", "target": 0.9}}})
    assert params.train.operating_point.target == 0.9
    with pytest.raises(ValueError, match="both classes"):
        choose(np.zeros(5), np.linspace(0, 1, 5), OperatingPointParams())
