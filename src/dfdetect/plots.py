"""PNG figures for MLflow and reports (DVC draws its own plots from the CSV files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_curves_png(rows: list[dict], path: Path) -> None:
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    a.set_xlabel("epoch"), a.set_title("loss"), a.legend()
    for key in ("train_acc", "val_acc", "val_auc"):
        b.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    b.set_xlabel("epoch"), b.set_title("accuracy and AUC"), b.set_ylim(0, 1.02), b.legend()
    _save(fig, path)


def roc_png(fpr, tpr, auc: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC-AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate (real called fake)"), ax.set_ylabel("true positive rate (fakes caught)")
    ax.legend(loc="lower right")
    _save(fig, path)


def pr_png(recall, precision, ap: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"AP {ap:.4f}")
    ax.set_xlabel("recall (fake)"), ax.set_ylabel("precision (fake)"), ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    _save(fig, path)


def reliability_png(bins: list[dict], ece: float, path: Path) -> None:
    """Predicted P(fake) against the observed fake rate per bin: on the diagonal when calibrated."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label=f"model (ECE {ece:.4f})")
    ax.set_xlabel("predicted P(fake)"), ax.set_ylabel("observed share of fakes"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    _save(fig, path)


def robustness_png(table: dict[str, dict], path: Path) -> None:
    """ROC-AUC and accuracy per image condition."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(table)
    for metric in ("roc_auc", "accuracy"):
        ax.plot(names, [table[n][metric] for n in names], "o-", label=metric)
    ax.set_ylim(0, 1.02), ax.set_ylabel("score"), ax.set_title("robustness")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(loc="lower left")
    _save(fig, path)


def confusion_png(matrix: np.ndarray, class_names, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xticks(range(len(class_names)), class_names), ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("actual")
    _save(fig, path)


def group_rates_png(set_name: str, groups: dict, path: Path) -> None:
    """Per attribute (one panel each), per group: the real false-positive rate and the fake recall at the
    served threshold, the fairness view of a suite set whose file names carry group attributes."""
    from .bands import in_order

    attrs = list(groups)
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.5 * len(attrs), 4), squeeze=False)
    for ax, attr in zip(axes[0], attrs):
        rows = groups[attr]["groups"]
        names = [name for name, _ in in_order(rows)]
        x = np.arange(len(names))
        for offset, (rate, label) in zip((-0.2, 0.2), (("real_fpr", "real FPR"), ("fake_recall", "fake recall"))):
            values = [rows[n].get(rate, np.nan) for n in names]
            if not np.all(np.isnan(values)):
                ax.bar(x + offset, values, width=0.4, label=label)
        ax.set_xticks(x, [f"{n}\n({rows[n]['n']})" for n in names], fontsize=8)
        ax.set_ylim(0, 1.02), ax.set_title(f"{set_name}: by {attr}"), ax.legend(fontsize=8)
    _save(fig, path)
