"""Would another validation threshold make a model's verdicts hold on other sources' real faces?

A model trained on self-blends alone (train.sbi.mode=only) has its threshold chosen on faceswap128's known
fakes, which it never trained on. The SBI paper validates on self-blends of the validation reals instead. This
scores one model's validation reals, its known validation fakes and self-blends of those reals (the recipe's
mask and alteration, seeded), picks thresholds several ways (the stored one, the equal error rate against the
known fakes or against the self-blends, 5 % or 1 % of validation reals flagged), and gives each shared set's
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

    from dfdetect.artifact import TrainedModel
    from dfdetect.config import SuiteSet, load_params
    from dfdetect.data import PreparedSplit, load_split
    from dfdetect.evaluate import score_model
    from dfdetect.metrics import eer_and_threshold, roc_auc
    from dfdetect.sbi import self_blend

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

    def eer(fake_scores):
        labels = np.r_[np.zeros(len(s_real)), np.ones(len(fake_scores))]
        return float(eer_and_threshold(labels, np.r_[s_real, fake_scores])[1])

    thresholds = {
        "stored": float(model.threshold),
        "eer_known_fakes": eer(s_fake),
        "eer_self_blends": eer(s_blend),
        "val_fpr_5pct": float(np.quantile(s_real, 0.95)),
        "val_fpr_1pct": float(np.quantile(s_real, 0.99)),
    }

    def rates(labels, scores):
        return {
            name: {
                "real_fpr": round(float(np.mean(scores[labels == 0] >= t)), 4) if (labels == 0).any() else None,
                "fake_recall": round(float(np.mean(scores[labels == 1] >= t)), 4) if (labels == 1).any() else None,
            }
            for name, t in thresholds.items()
        }

    val_labels = np.r_[np.zeros(len(s_real)), np.ones(len(s_fake))]
    rows = {"faceswap128 (val, known fakes)": {"rates": rates(val_labels, np.r_[s_real, s_fake])}}
    rows["faceswap128 (val, self-blends)"] = {
        "rates": rates(np.r_[np.zeros(len(s_real)), np.ones(len(s_blend))], np.r_[s_real, s_blend])
    }
    faces = load_params(args.params).prepare.faces.with_margin(pre.face_margin)
    from dfdetect.suite import load_suite_set

    for name in SCORED:
        data = load_suite_set(SuiteSet(**generalisation.suite_entry(args.datasets, name)), pre.image_size, faces)
        labels, scores = data.split.labels, score(np.asarray(data.split.images))
        auc = roc_auc(labels, scores, 0.5) if len(set(labels.tolist())) == 2 else None
        rows[name] = {"roc_auc": round(auc, 4) if auc is not None else None, "rates": rates(labels, scores)}
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
