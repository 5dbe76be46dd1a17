"""Detection quality of a recipe on a real face data set: prepare, train (timed), evaluate on its test split
with the robustness table, and optionally score other data sets. Writes JSON; the target it reports against
is the issue's: ROC-AUC >= 0.97 on the shared test split after at most 30 minutes of CPU training.

  python benchmarks/quality.py --data ../shared/datasets/faceswap128 --out benchmarks/results/quality_cpu.json
  python benchmarks/quality.py --data ... --set model.name=custom_cnn --set train.epochs=8   # another recipe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
from error_analysis import analyse  # beside this script

from dfdetect.config import load_params
from dfdetect.evaluate import evaluate
from dfdetect.overrides import apply_overrides
from dfdetect.prepare import prepare
from dfdetect.train import train

TARGET_AUC, BUDGET_MINUTES = 0.97, 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="data set in the seed layout {train,val,test}/{real,fake}"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe (default: the project's)")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. train.epochs=6 (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], help="another data set to score (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare processes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    args = parser.parse_args()

    params = apply_overrides(load_params(args.params), args.set)
    work = args.work or Path(tempfile.mkdtemp(prefix="dfdetect-quality-"))
    started = time.perf_counter()
    prepare(args.data, work / "prepared", params.prepare, workers=args.workers)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    result = train(params, work / "prepared", work / "models", work / "history.csv", track=False)
    train_s = time.perf_counter() - started
    metrics = evaluate(
        params,
        work / "prepared",
        work / "models",
        work / "eval",
        work / "eval" / "metrics.json",
        work / "plots",
        track=False,
        datasets=args.dataset,
    )
    report = {
        "command": "python benchmarks/quality.py --data " + str(args.data) + "".join(f" --set {s}" for s in args.set),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "recipe": {
            "model": params.model.model_dump(),
            "image_size": params.prepare.image_size,
            "train": params.train.model_dump(mode="json"),
        },
        "prepare_minutes": round(prepare_s / 60, 2),
        "train_minutes": round(train_s / 60, 2),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_roc_auc": round(result.best_val_auc, 6),
        "test": {
            k: metrics[k]
            for k in ("roc_auc", "average_precision", "eer", "accuracy", "ece", "threshold", "n_real", "n_fake")
        },
        "test_video": {k: v for k, v in metrics.items() if k.startswith("video_") or k == "n_videos"},
        "errors": analyse(pd.read_csv(work / "eval" / "predictions.csv")),
        "robustness": json.loads((work / "eval" / "robustness.json").read_text())
        if params.evaluate.robustness
        else None,
        "datasets": metrics.get("datasets"),
        "target": {
            "roc_auc": TARGET_AUC,
            "train_minutes": BUDGET_MINUTES,
            "met": metrics["roc_auc"] >= TARGET_AUC and train_s / 60 <= BUDGET_MINUTES,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k] for k in ("train_minutes", "epochs_run", "val_roc_auc", "test", "target")}, indent=2)
    )


if __name__ == "__main__":
    main()
