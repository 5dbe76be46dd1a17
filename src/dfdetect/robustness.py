"""How a model holds up when images reach it the way fakes reach users (re-compressed, blurred, shrunk): one
table beside the main evaluation (other data sets are dfdetect.suite's)."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from .data import PreparedSplit
from .metrics import compute_all


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
    "clean": None,
    "jpeg_90": _jpeg(90),
    "jpeg_70": _jpeg(70),
    "jpeg_50": _jpeg(50),
    "blur_1.5": _blur(1.5),
    "downscale_0.5": _downscale(0.5),
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
        table[condition] = {
            k: round(v, 6) for k, v in compute_all(data.labels, scores, threshold, TABLE_METRICS).items()
        }
    return table


def table_markdown(title: str, rows: dict[str, dict]) -> str:
    columns = ["n_real", "n_fake", *TABLE_METRICS, "fake_recall", "real_recall"]
    columns = [c for c in columns if any(c in r for r in rows.values())]
    lines = [f"## {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
