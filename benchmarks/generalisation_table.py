"""The README's generalisation tables from benchmarks/results/generalisation_*.json (what was run, as run).

python benchmarks/generalisation_table.py benchmarks/results/generalisation_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fpr_ratios(row: dict) -> str:
    """The real false-positive rate's highest over lowest group by gender / ethnicity, then by age band where
    the run measured one ('-': not measured, or no finite ratio)."""
    groups = row.get("groups", {})
    if not groups:
        return "-"
    out = " / ".join(fmt(groups[a].get("real_fpr_ratio"), 2) if a in groups else "-" for a in ("gender", "race"))
    return out + (f" (age {fmt(groups['age'].get('real_fpr_ratio'), 2)})" if "age" in groups else "")


def cross_row(name: str, r: dict) -> str:
    suite = r["suite"]
    lfw, ffpp, tpdne, utk = (
        suite.get(k, {}) for k in ("lfw_faceswap", "ffpp_c23_videos", "tpdne_stylegan2", "utkface_real")
    )
    return (
        f"| {name} | {fmt(r['train_minutes'], 1) if isinstance(r['train_minutes'], float) else r['train_minutes']} "
        f"| {fmt(r['in_dataset_test'].get('roc_auc'))} / {fmt(r['in_dataset_test'].get('video_roc_auc'))} "
        f"| {fmt(lfw.get('roc_auc'))} ({fmt(lfw.get('real_fpr'), 2)} / {fmt(lfw.get('fake_recall'), 2)}) "
        f"| {fmt(ffpp.get('roc_auc'))} / {fmt(ffpp.get('video_roc_auc'))} "
        f"| {fmt(tpdne.get('roc_auc'))} ({fmt(tpdne.get('real_fpr'), 2)} / {fmt(tpdne.get('fake_recall'), 2)}) "
        f"| {fmt(utk.get('real_fpr'), 3)} | {fpr_ratios(utk)} |"
    )


def loso_row(r: dict) -> str:
    left = r["left_out"]
    row = r["suite"][left]
    return (
        f"| {left} | {', '.join(r['trained_on'])} | {fmt(r['train_minutes'], 1) if isinstance(r['train_minutes'], float) else r['train_minutes']} "
        f"| {fmt(row.get('roc_auc'))} | {fmt(row.get('video_roc_auc'))} | {fmt(row.get('real_fpr'), 3)} "
        f"| {fmt(row.get('fake_recall'), 3)} | {fpr_ratios(row)} "
        f"| {fmt(r['in_dataset_test'].get('roc_auc'))} |"
    )


def main(paths: list[str]) -> None:
    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    print(
        "| recipe (file) | training minutes | faceswap128 test frame / video ROC-AUC (in-dataset) | lfw_faceswap ROC-AUC "
        "(real FPR / fake recall) | ffpp_c23_videos frame / video ROC-AUC | tpdne_stylegan2 ROC-AUC (real FPR / fake recall) "
        "| utkface_real real FPR | its gender / ethnicity FPR ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs:
        if r["protocol"] == "cross":
            print(cross_row(name, r))
    print()
    print(
        "| left out | trained on | training minutes | ROC-AUC | video ROC-AUC | real FPR | fake recall "
        "| FPR ratio (gender / ethnicity) | mixture's own test ROC-AUC |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for _, r in runs:
        if r["protocol"] == "loso":
            print(loso_row(r))


if __name__ == "__main__":
    main(sys.argv[1:])
