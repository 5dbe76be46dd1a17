import math

import numpy as np
import pytest

from dfdetect.metrics import available_metrics, compute_all, eer_and_threshold


def test_perfect_separation():
    m = compute_all([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], threshold=0.5)
    assert m["roc_auc"] == m["average_precision"] == m["accuracy"] == m["f1"] == 1.0
    assert m["eer"] == 0.0


def test_inverted_scores_are_worst():
    m = compute_all([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], threshold=0.5)
    assert m["roc_auc"] == 0.0 and m["accuracy"] == 0.0 and m["eer"] == 1.0


def test_threshold_decides_the_confusion_metrics():
    labels, scores = [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]
    at_half = compute_all(labels, scores, threshold=0.5)
    assert at_half["accuracy"] == 0.5 and at_half["precision"] == 0.5 and at_half["recall"] == 0.5
    low = compute_all(labels, scores, threshold=0.3)
    assert low["recall"] == 1.0 and low["precision"] == pytest.approx(2 / 3)


def test_eer_matches_a_hand_computed_case():
    # Scores of 10 real and 10 fake images that overlap on exactly one pair each way.
    labels = np.array([0] * 10 + [1] * 10)
    scores = np.array([0.05 * i for i in range(9)] + [0.7] + [0.6] + [0.75 + 0.02 * i for i in range(9)])
    eer, thr = eer_and_threshold(labels, scores)
    assert eer == pytest.approx(0.1)
    assert 0.6 <= thr <= 0.75


def test_single_class_gives_nan_auc_not_a_crash():
    m = compute_all([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["roc_auc"]) and m["recall"] == pytest.approx(2 / 3)


def test_the_registry_names_every_metric_once():
    assert available_metrics() == [
        "accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "average_precision",
        "eer",
        "ece",
    ]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="as many labels as scores"):
        compute_all([0, 1], [0.5])


def test_robustness_conditions_change_the_images_but_not_their_labels():
    from dfdetect.data import PreparedSplit
    from dfdetect.robustness import CONDITIONS, corrupted

    rng = np.random.default_rng(0)
    data = PreparedSplit(
        rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1]), ["a", "b", "c", "d"]
    )
    for condition in CONDITIONS:
        out = corrupted(data, condition)
        assert out.images.shape == data.images.shape and out.labels is data.labels
        assert (condition == "clean") == np.array_equal(out.images, data.images)
    blurred = corrupted(data, "blur_1.5").images.astype(float)
    assert np.abs(np.diff(blurred, axis=2)).mean() < np.abs(np.diff(data.images.astype(float), axis=2)).mean()
