"""Where a model's test errors are: per-video breakdown of `dfdetect evaluate`'s predictions.csv.

Frame-level ROC-AUC pools every frame of every video. Two things pull it down: frames of one video that
disagree (noise a per-video average would remove) and whole videos ranked on the wrong side. This script
separates them: it reports the frame AUC, the video AUC, the frame AUC if every frame scored its video's
mean (the ceiling without within-video noise), and the videos that cost the most.

  python benchmarks/error_analysis.py eval/predictions.csv [--worst 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

REQUIRED = ("video", "label", "fake_probability")


def analyse(predictions: pd.DataFrame, worst: int = 5) -> dict:
    missing = [c for c in REQUIRED if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions need the columns {list(REQUIRED)}; missing {missing}")
    if predictions["label"].nunique() != 2:
        raise ValueError("predictions need both real (0) and fake (1) frames")
    videos = predictions.groupby("video").agg(
        label=("label", "first"),
        mean=("fake_probability", "mean"),
        std=("fake_probability", "std"),
        frames=("label", "size"),
    )
    if (predictions.groupby("video")["label"].nunique() > 1).any():
        raise ValueError("a video has frames of both labels: its frames were grouped wrongly")
    as_video_mean = predictions["video"].map(videos["mean"])
    spread = videos["std"].dropna()  # videos of one frame have none

    def listing(rows: pd.DataFrame) -> list[dict]:
        return [{"video": v, "mean": round(r["mean"], 4), "frames": int(r["frames"])} for v, r in rows.iterrows()]

    return {
        "frames": len(predictions),
        "videos": len(videos),
        "frame_roc_auc": round(roc_auc_score(predictions["label"], predictions["fake_probability"]), 6),
        "video_roc_auc": round(roc_auc_score(videos["label"], videos["mean"]), 6),
        "frame_roc_auc_with_video_means": round(roc_auc_score(predictions["label"], as_video_mean), 6),
        "mean_within_video_std": round(float(spread.mean()), 4) if len(spread) else None,
        "fake_videos_scored_lowest": listing(videos[videos["label"] == 1].nsmallest(worst, "mean")),
        "real_videos_scored_highest": listing(videos[videos["label"] == 0].nlargest(worst, "mean")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", type=Path, help="predictions.csv written by dfdetect evaluate")
    parser.add_argument("--worst", type=int, default=5, help="how many worst videos of each class to list")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    if not args.predictions.is_file():
        parser.error(f"{args.predictions}: no such file (run dfdetect evaluate first)")
    try:
        report = {"predictions": str(args.predictions), **analyse(pd.read_csv(args.predictions), args.worst)}
    except ValueError as exc:
        parser.error(f"{args.predictions}: {exc}")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
