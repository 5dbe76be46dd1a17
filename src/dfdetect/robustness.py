"""How a model holds up when images reach it the way fakes reach users (re-compressed, blurred, shrunk), and
on other data sets: one table each, beside the main evaluation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from .data import IMAGE_EXTENSIONS, SPLITS, DatasetError, PreparedSplit
from .labels import CLASS_NAMES, label_of
from .metrics import compute_all
from .preprocessing import ImageError, decode_image, resize_square


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(buf).convert("RGB")
    return apply


def _blur(sigma: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.filter(ImageFilter.GaussianBlur(sigma))


def _downscale(factor: float) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        small = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BILINEAR)
        return small.resize(img.size, Image.BILINEAR)
    return apply


CONDITIONS: dict[str, Callable[[Image.Image], Image.Image] | None] = {
    "clean": None, "jpeg_90": _jpeg(90), "jpeg_70": _jpeg(70), "jpeg_50": _jpeg(50),
    "blur_1.5": _blur(1.5), "downscale_0.5": _downscale(0.5),
}
TABLE_METRICS = ["roc_auc", "average_precision", "eer", "accuracy"]


def corrupted(data: PreparedSplit, condition: str) -> PreparedSplit:
    apply = CONDITIONS[condition]
    if apply is None:
        return data
    images = np.stack([np.asarray(apply(Image.fromarray(np.asarray(img)))) for img in data.images])
    return PreparedSplit(images, data.labels, data.relpaths, data.videos)


def robustness_table(score: Callable[[PreparedSplit], np.ndarray], data: PreparedSplit, threshold: float) -> dict:
    """Metrics of the same images under each condition (at the validation threshold)."""
    table = {}
    for condition in CONDITIONS:
        scores = score(corrupted(data, condition))
        table[condition] = {k: round(v, 6) for k, v in compute_all(data.labels, scores, threshold, TABLE_METRICS).items()}
    return table


def load_image_set(root: str | Path, image_size: int) -> tuple[PreparedSplit, list[str]]:
    """A data set in the seed layout for scoring only: its test split if it has one, else every split (or
    {real,fake}/ at the top). Either class may be missing (a set of fakes only)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data set folder not found")
    tops = [root / s for s in SPLITS if (root / s).is_dir()]
    tops = [root / "test"] if (root / "test").is_dir() else (tops or [root])
    arrays, labels, relpaths, problems = [], [], [], []
    for top in tops:
        for class_name in CLASS_NAMES:
            folder = top / class_name
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
            for path in files:
                rel = path.relative_to(root).as_posix()
                try:
                    arrays.append(resize_square(decode_image(path.read_bytes(), rel), image_size))
                except ImageError as exc:
                    problems.append(str(exc))
                    continue
                labels.append(label_of(class_name))
                relpaths.append(rel)
    if not arrays:
        raise DatasetError(f"{root}: no images under {[str(t) for t in tops]}/{{real,fake}}/")
    return PreparedSplit(np.stack(arrays), np.array(labels, dtype=np.int64), relpaths), problems


def dataset_row(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """ROC-AUC, AP, EER, accuracy where both classes are present; fake (or real) recall where one is."""
    row = {"n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum())}
    if row["n_real"] and row["n_fake"]:
        row.update({k: round(v, 6) for k, v in compute_all(labels, scores, threshold, TABLE_METRICS).items()})
    elif row["n_fake"]:
        row["fake_recall"] = round(float((scores >= threshold).mean()), 6)
    else:
        row["real_recall"] = round(float((scores < threshold).mean()), 6)
    return row


def table_markdown(title: str, rows: dict[str, dict]) -> str:
    columns = ["n_real", "n_fake", *TABLE_METRICS, "fake_recall", "real_recall"]
    columns = [c for c in columns if any(c in r for r in rows.values())]
    lines = [f"## {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
