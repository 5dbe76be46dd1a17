"""`dfdetect tune` on faceswap128 within a time budget (issue 18): does the search find a recipe whose
validation ROC-AUC is at least the default's? Trial 0 is the default recipe (params.yaml), trained with the same
per-trial budget as every other trial, so the comparison is at equal cost. Writes the trials as JSON:

  python benchmarks/tuning.py --data ../shared/datasets/faceswap128 --minutes 60 --set tune.epochs=1 \
      --out benchmarks/results/tuning_faceswap128.json

--minutes is the study's timeout: no trial starts after it, and the one running then finishes, so the wall
time is at most --minutes plus one trial. The study is in SQLite beside the work folder (a study in PostgreSQL
is what tests/test_tune.py runs); MLflow tracking is off.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from generalisation import VIDEO_FRAMES  # faceswap128's <label>_<video>_<frame> names

from dfdetect.config import load_params, parse_params
from dfdetect.io_utils import atomic_write_json
from dfdetect.overrides import apply_overrides
from dfdetect.prepare import prepare
from dfdetect.tune import tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="faceswap128 in the seed layout")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfdetect-tuning"), help="prepared data and the study")
    ap.add_argument("--prepared", type=Path, help="reuse this prepared faceswap128 (default: prepare into --work)")
    ap.add_argument("--minutes", type=float, default=60, help="the study's timeout")
    ap.add_argument("--trials", type=int, default=50, help="at most this many trials")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE over params.yaml (repeatable)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe and its tune.space")
    args = ap.parse_args()

    raw = load_params(args.params).model_dump(mode="json")
    raw["prepare"].update(name="faceswap128", group_pattern=VIDEO_FRAMES)
    params = apply_overrides(parse_params(raw, "benchmark params"), args.set)
    prepared = args.prepared or args.work / "prepared"
    if not (prepared / "report.json").exists():
        prepare(args.data, prepared, params.prepare, workers=2)
    began = time.perf_counter()
    summary = tune(
        params,
        prepared,
        args.work / "study",
        trials=args.trials,
        timeout_min=args.minutes,
        storage=f"sqlite:///{args.work / 'study.db'}",
        track=False,
    )
    wall = (time.perf_counter() - began) / 60
    report = {
        "command": f"python benchmarks/tuning.py --data {args.data} --minutes {args.minutes}"
        + "".join(f" --set {s}" for s in args.set),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "wall_minutes": round(wall, 1),
        "space": {k: v.model_dump(exclude_none=True) for k, v in params.tune.space.items()},
        "epochs_per_trial": params.tune.epochs or params.train.epochs,
        "baseline_val_auc": summary["baseline"]["value"] if summary["baseline"] else None,
        "best_val_auc": summary["best"]["value"] if summary["best"] else None,
        "best_trial": summary["best"]["number"] if summary["best"] else None,
        "best_params": summary["best"]["params"] if summary["best"] else None,
        "best_beats_baseline": summary["best_beats_baseline"],
        "at_least_the_default": bool(
            summary["best"] and summary["baseline"] and summary["best"]["value"] >= summary["baseline"]["value"]
        ),
        "dvc_exp_run": summary["dvc_exp_run"],
        "trials": [
            {k: t.get(k) for k in ("number", "state", "value", "params", "val_auc_per_epoch", "seconds", "baseline")}
            for t in summary["trials"]
        ],
    }
    atomic_write_json(args.out, report)
    print({k: report[k] for k in ("wall_minutes", "baseline_val_auc", "best_val_auc", "best_trial")})


if __name__ == "__main__":
    main()
