"""Mix a trained run's model with its ImageNet weights after the fact (WiSE-FT, `train.wise_alpha`), so that
one training run gives several points of the curve from ImageNet (alpha 0) to the weights as trained (1);
with `--alpha 1`, only calibrate it again (a model trained before the calibration changed).

`train.wise_alpha` does the same at the end of training. This takes the finished run of
`benchmarks/generalisation.py --work WORK` (its `models/best.pt` and `prepared/`), mixes with the library's
own function (`weight_space.mix_with_pretrained`), chooses temperature and threshold again on the run's
validation split (`calibration.calibrate`, as training's finish step does) and writes a new work folder whose
prepared data is a link to the run's; score it with `generalisation.py --work OUT --reuse` and the run's own
`--set` options:

    python benchmarks/wise_ft.py --work WORK --alpha 0.75 --out-work WORK_a75
    python benchmarks/generalisation.py cross --datasets ../shared/datasets --work WORK_a75 --reuse --out ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dfdetect import checkpoint
from dfdetect.artifact import TrainedModel
from dfdetect.calibration import calibrate
from dfdetect.config import ModelParams, OperatingPointParams
from dfdetect.data import load_split
from dfdetect.weight_space import mix_with_pretrained, pretrained_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a finished generalisation run's --work folder")
    parser.add_argument(
        "--alpha", type=float, required=True, help="share of the trained weights, in (0, 1]; 1: no mix, calibrate again"
    )
    parser.add_argument("--out-work", type=Path, required=True, help="new work folder for the mixed model")
    args = parser.parse_args()
    state = checkpoint.load(args.work / "models" / "best.pt")
    trained = TrainedModel.from_state(state)
    spec = ModelParams(**state["model"])  # as trained: its own ImageNet file (weights_path), not the default one
    mixed = mix_with_pretrained(trained, pretrained_weights(spec), args.alpha) if args.alpha < 1 else trained
    policy = OperatingPointParams(
        **{k: v for k, v in (trained.operating_point or {}).items() if k in ("policy", "target") and v is not None}
    )
    mixed = calibrate(mixed, load_split(args.work / "prepared", "val"), "cpu", policy)
    (args.out_work / "models").mkdir(parents=True, exist_ok=True)
    if not (args.out_work / "prepared").exists():
        (args.out_work / "prepared").symlink_to((args.work / "prepared").resolve())
    mixed.save(args.out_work / "models" / "best.pt", training_state=state)
    shutil.copy(args.work / "models" / "summary.json", args.out_work / "models" / "summary.json")
    print(json.dumps({"alpha": args.alpha, "lineage": mixed.lineage, "calibration": mixed.calibration}, indent=2))


if __name__ == "__main__":
    main()
