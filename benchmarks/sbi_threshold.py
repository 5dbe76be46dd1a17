"""Would another validation threshold make a model's verdicts hold on other sources' real faces?

A model trained on self-blends alone (train.sbi.mode=only) has its threshold chosen on faceswap128's known
fakes, which it never trained on. The SBI paper validates on self-blends of the validation reals instead. This
scores one model's validation reals, its known validation fakes and self-blends of those reals (the recipe's
mask and alteration, seeded), picks thresholds several ways (the stored one, the equal error rate against the
known fakes or against the self-blends, 5 % or 1 % of validation reals flagged, each by dfdetect's own
operating-point rule), and gives each shared set's
real false-positive rate and fake recall at each, beside its ROC-AUC (which no threshold changes).

    python benchmarks/sbi_threshold.py --checkpoint WORK/models/best.pt --prepared WORK/prepared \\
        --datasets ../shared/datasets --alteration paper --mask landmarks --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the protocol's set descriptions, beside this file
import generalisation  # noqa: E402

SCORED = ("lfw_faceswap", "tpdne_stylegan2", "utkface_real", "ffpp_c23_videos")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained model (best.pt)")
    ap.add_argument("--prepared", type=Path, required=True, help="the prepared cache it was trained on (val split)")
    ap.add_argument("--datasets", type=Path, required=True, help="folder holding the shared sets")
    ap.add_argument("--alteration", default="mild", help="train.sbi.alteration of the self-blends: mild or paper")
    ap.add_argument("--mask", default="ellipse", help="train.sbi.mask of the self-blends: ellipse or landmarks")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="whose prepare.faces crops the photos")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()

    from dfdetect import operating_point
    from dfdetect.artifact import TrainedModel
    from dfdetect.config import OperatingPointParams, SuiteSet, load_params
    from dfdetect.data import PreparedSplit, load_split
    from dfdetect.evaluate import score_model
    from dfdetect.metrics import roc_auc
    from dfdetect.sbi import self_blend
    from dfdetect.suite import load_suite_set, rates

    model = TrainedModel.load(args.checkpoint)
    pre = model.preprocess

    def score(images: np.ndarray) -> np.ndarray:
        n = len(images)
        return score_model(model.module, pre, PreparedSplit(images, np.zeros(n, np.int64), [""] * n))[0]

    val = load_split(args.prepared, "val")
    reals, fakes = np.asarray(val.images[val.labels == 0]), np.asarray(val.images[val.labels == 1])
    landmarker = None
    if args.mask == "landmarks":
        from dfdetect.landmarks import FaceLandmarker

        landmarker = FaceLandmarker.load()
    rng = np.random.default_rng(0)
    blends = np.stack(
        [self_blend(f, rng, landmarker.landmarks(f) if landmarker else None, args.alteration)[0] for f in reals]
    )
    s_real, s_fake, s_blend = score(reals), score(fakes), score(blends)

    def chosen(fake_scores, policy: str, target: float | None = None) -> float:
        """The threshold dfdetect's operating-point rule picks on the validation reals against these fakes."""
        labels = np.r_[np.zeros(len(s_real)), np.ones(len(fake_scores))]
        point = OperatingPointParams(policy=policy, target=target)
        return operating_point.choose(labels, np.r_[s_real, fake_scores], point)["threshold"]

    thresholds = {
        "stored": float(model.threshold),
        "eer_known_fakes": chosen(s_fake, "eer"),
        "eer_self_blends": chosen(s_blend, "eer"),
        "val_fpr_5pct": chosen(s_fake, "fpr", 0.05),
        "val_fpr_1pct": chosen(s_fake, "fpr", 0.01),
    }

    def at_thresholds(labels, scores):
        return {name: rates(labels, scores, t) for name, t in thresholds.items()}

    val_labels = np.r_[np.zeros(len(s_real)), np.ones(len(s_fake))]
    rows = {"faceswap128 (val, known fakes)": {"rates": at_thresholds(val_labels, np.r_[s_real, s_fake])}}
    rows["faceswap128 (val, self-blends)"] = {
        "rates": at_thresholds(np.r_[np.zeros(len(s_real)), np.ones(len(s_blend))], np.r_[s_real, s_blend])
    }
    faces = load_params(args.params).prepare.faces.with_margin(pre.face_margin)
    for name in SCORED:
        data = load_suite_set(SuiteSet(**generalisation.suite_entry(args.datasets, name)), pre.image_size, faces)
        labels, scores = data.split.labels, score(np.asarray(data.split.images))
        auc = roc_auc(labels, scores, 0.5) if len(set(labels.tolist())) == 2 else None
        rows[name] = {"roc_auc": round(auc, 4) if auc is not None else None, "rates": at_thresholds(labels, scores)}
        print(name, json.dumps(rows[name]), flush=True)
    result = {
        "benchmark": "sbi_threshold",
        "command": " ".join(["python", "benchmarks/sbi_threshold.py", *sys.argv[1:]]),
        "thresholds": {k: round(v, 4) for k, v in thresholds.items()},
        "sets": rows,
    }
    print(json.dumps(result["thresholds"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
