"""What a stricter threshold buys on faces the model never saw: one trained model of
`benchmarks/generalisation.py cross --work WORK`, its threshold chosen on its own validation split by several
`train.operating_point` policies (the stored one, then `fpr` at each --fpr budget), and every shared set scored
once and read at each threshold (JSON, README table):

  python benchmarks/operating_points.py --work WORK --datasets ../shared/datasets --out benchmarks/results/...

The policies only move the cut along the same scores, so the ROC-AUCs do not change; what changes is how many
unseen real faces are flagged (utkface_real, the reals of lfw_faceswap and tpdne_stylegan2) against how many
unseen fakes are still caught. Nothing here looks at the unseen sets to choose a threshold: each is chosen on
the run's own validation split, as training chooses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from generalisation import SETS, suite_entry  # the shared sets' framing, as the protocol scores them

from dfdetect.artifact import TrainedModel
from dfdetect.config import OperatingPointParams, SuiteSet, load_params
from dfdetect.evaluate import score_model, split_for
from dfdetect.io_utils import atomic_write_json
from dfdetect.operating_point import choose
from dfdetect.overrides import apply_overrides
from dfdetect.suite import load_suite_set, score_row, suite_row

KEPT = ("roc_auc", "video_roc_auc", "fake_recall", "real_fpr", "video_fake_recall", "video_real_fpr")


def _rates_at(spec: SuiteSet | None, data, labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """The set's rates at this threshold (its ROC-AUCs, the same at every threshold, for reference), and for a
    set with attributes each group's false-positive rate and the highest over the lowest."""
    if spec is None:  # the in-dataset test split
        row = score_row(labels, scores, threshold, data.videos)
    else:
        row = suite_row(spec, data, scores, threshold)
    out = {k: row[k] for k in KEPT if row.get(k) is not None}
    for attr, g in row.get("groups", {}).items():
        out[f"{attr}_real_fpr_ratio"] = g.get("real_fpr_ratio")
        out[f"{attr}_real_fpr"] = {name: group.get("real_fpr") for name, group in g["groups"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work",
        type=Path,
        required=True,
        help="a finished cross-dataset run's --work folder (trained on faceswap128 alone)",
    )
    ap.add_argument("--datasets", type=Path, required=True, help="folder holding the shared sets")
    ap.add_argument(
        "--fpr",
        type=float,
        nargs="+",
        default=[0.05, 0.02, 0.01],
        help="validation false-positive budgets of the `fpr` policy to compare with the stored threshold",
    )
    ap.add_argument("--set", action="append", default=[], help="the run's recipe overrides (face settings)")
    ap.add_argument("--workers", type=int, default=2, help="processes for decoding and face crops")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()

    params = apply_overrides(load_params(Path(__file__).parents[1] / "params.yaml"), args.set)
    trained = TrainedModel.load(args.work / "models" / "best.pt")
    model, pre = trained.module, trained.preprocess
    val = split_for(args.work / "prepared", "val", pre)
    val_scores = score_model(model, pre, val)[0]
    points = {"stored": {**(trained.operating_point or {}), "threshold": trained.threshold}}
    for budget in args.fpr:
        points[f"fpr {budget}"] = choose(val.labels, val_scores, OperatingPointParams(policy="fpr", target=budget))
    print(json.dumps({k: round(v["threshold"], 6) for k, v in points.items()}), flush=True)

    test = split_for(args.work / "prepared", "test", pre)
    sets = {"faceswap128 (in-dataset test)": (None, test, test.labels, score_model(model, pre, test)[0])}
    faces = params.prepare.faces.with_margin(pre.face_margin)
    for name in SETS:
        if name == "faceswap128":
            continue
        spec = SuiteSet(**suite_entry(args.datasets, name))
        data = load_suite_set(spec, pre.image_size, faces, args.workers)
        sets[name] = (spec, data, data.split.labels, score_model(model, pre, data.split)[0])
        print(f"scored {name}: {len(data.split.labels)} images", flush=True)

    rows = {
        point: {
            name: _rates_at(spec, data, labels, scores, p["threshold"])
            for name, (spec, data, labels, scores) in sets.items()
        }
        for point, p in points.items()
    }
    report = {
        "command": f"python benchmarks/operating_points.py --work {args.work} --datasets {args.datasets} "
        + "--fpr "
        + " ".join(str(b) for b in args.fpr)
        + "".join(f" --set {s}" for s in args.set),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "model": str(args.work / "models" / "best.pt"),
        "points": points,
        "rates": rows,
    }
    atomic_write_json(args.out, report)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
