"""The decision threshold as a policy chosen on validation, not a constant.

- `eer`: where the false-positive and false-negative rates meet (a balanced default);
- `fpr`: the lowest threshold that flags at most `target` of the validation reals (e.g. 0.01: one real face in
  a hundred flagged), so recall is as high as that budget allows;
- `recall`: the highest threshold that still catches at least `target` of the validation fakes, so as few reals
  as possible are flagged for that recall.

The chosen policy and the rates measured at its threshold travel with the model (`TrainedModel.operating_point`),
so `/health` and the model card can say what a verdict means."""

from __future__ import annotations

import numpy as np

from .config import OperatingPointParams
from .metrics import eer_and_threshold


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    return float(flagged[labels == 0].mean()), float(flagged[labels == 1].mean())


def _between(candidates: np.ndarray, i: int) -> float:
    """A threshold that flags what cutting at candidates[i] flags, placed midway to the next lower score: a
    threshold equal to a validation score flips that image on the last bit of float noise when it is scored
    again (another batch, another runtime), most of all where scores crowd together."""
    if i == 0:  # flags everything
        return float(candidates[0] / 2)
    if i == len(candidates) - 1:  # flags nothing: midway from the highest score to 1
        highest = candidates[i - 1]
        return float((highest + 1.0) / 2) if highest < 1.0 else float(candidates[i])
    return float((candidates[i - 1] + candidates[i]) / 2)


def choose(labels, scores, point: OperatingPointParams) -> dict:
    """The threshold the policy picks on these validation scores, with the false-positive rate and recall
    measured there (what the stored operating point reports)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if not ((labels == 0).any() and (labels == 1).any()):
        raise ValueError("choosing an operating point needs validation images of both classes")
    # candidate cuts: at every distinct score, plus one above the highest (flags nothing)
    candidates = np.unique(np.concatenate([scores, [np.nextafter(scores.max(), np.inf)]]))
    if point.policy == "eer":  # the first cut at or above the EER threshold flags the same images
        cut = eer_and_threshold(labels, scores)[1]
        chosen = min(int(np.searchsorted(candidates, cut, side="left")), len(candidates) - 1)
    else:
        reals, fakes = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
        fpr = 1 - np.searchsorted(reals, candidates, side="left") / len(reals)  # share of reals >= candidate
        recall = 1 - np.searchsorted(fakes, candidates, side="left") / len(fakes)
        if point.policy == "fpr":
            chosen = int(np.argmax(fpr <= point.target + 1e-12))  # lowest that keeps the budget
        else:
            chosen = int(np.flatnonzero(recall >= point.target - 1e-12)[-1])  # highest that keeps the recall
    threshold = _between(candidates, chosen)
    val_fpr, val_recall = _rates(labels, scores, threshold)
    return {
        "policy": point.policy,
        "target": point.target if point.policy != "eer" else None,
        "threshold": float(min(1.0, threshold)),
        "val_fpr": round(val_fpr, 6),
        "val_recall": round(val_recall, 6),
        "val_real": int((labels == 0).sum()),
        "val_fake": int((labels == 1).sum()),
    }


def describe(point: dict | None) -> str:
    """One line for people: what the stored threshold means."""
    if not point:
        return "threshold chosen before operating points were stored"
    policy, target = point["policy"], point.get("target")
    if policy == "fpr":
        what = f"at most {target:.2%} of real faces flagged"
    elif policy == "recall":
        what = f"at least {target:.2%} of fakes caught"
    else:
        what = "equal error rate"
    return (
        f"{what} on validation: threshold {point['threshold']:.4f}, measured false-positive rate "
        f"{point['val_fpr']:.2%} and recall {point['val_recall']:.2%} "
        f"({point['val_real']} real, {point['val_fake']} fake images)"
    )
