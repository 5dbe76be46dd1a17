"""The generalisation suite: a model scored on data sets it was not trained on, each met the way training met
its own data (faces cropped by the same detector and margin, videos through the same frame sampling), in one
table at the validation threshold.

Rows carry what a user of a detector needs on data it never saw: frame ROC-AUC, AP and EER where both classes
are present, video ROC-AUC where files are videos (or frames grouped by `group_pattern`), fake recall where
there are fakes, the real false-positive rate where there are reals, and that rate per group of a file-name
attribute (gender, ethnicity; numeric ones such as age in bands) with the ratio of the highest to the lowest.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bands import band, in_order
from .config import FacesParams, SuiteSet
from .data import IMAGE_EXTENSIONS, SPLITS, DatasetError, ImageFile, PreparedSplit
from .labels import CLASS_NAMES, label_of
from .metrics import compute_all, video_level
from .preprocessing import ImageError, decode_image, resize_square
from .video import VIDEO_EXTENSIONS

log = logging.getLogger(__name__)
FRAME_METRICS = ["roc_auc", "average_precision", "eer", "accuracy"]
MIN_GROUP = 20  # groups with fewer reals are listed but left out of the highest/lowest ratio (too noisy)


@dataclass
class SuiteData:
    split: PreparedSplit  # images at the model's size; `videos` groups the frames of one video (or one group)
    files: list[str]  # the file behind each image (a video's frames share it)
    has_videos: bool  # video-level metrics make sense
    no_face: list[str] = field(default_factory=list)  # files (or video frames) where no face was found: not scored
    unreadable: list[str] = field(default_factory=list)


def list_files(root: Path) -> list[tuple[Path, str]]:
    """(file, class) of a set: its test split if it has one, else every split, else {real,fake}/ at the top."""
    if not root.is_dir():
        raise DatasetError(f"{root}: data set folder not found")
    tops = [root / "test"] if (root / "test").is_dir() else [root / s for s in SPLITS if (root / s).is_dir()] or [root]
    found = []
    for top in tops:
        for class_name in CLASS_NAMES:
            folder = top / class_name
            if folder.is_dir():
                found += [
                    (p, class_name)
                    for p in sorted(folder.rglob("*"))
                    if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS and not p.is_dir()
                ]
    if not found:
        raise DatasetError(f"{root}: no images or videos under {[str(t) for t in tops]}/{{real,fake}}/")
    return found


def _group_of(path: Path, pattern: re.Pattern | None) -> str:
    m = pattern.match(path.stem) if pattern else None
    return m.group("video") if m else ""


def load_suite_set(spec: SuiteSet, image_size: int, faces: FacesParams, workers: int = 1) -> SuiteData:
    """Every usable image of the set at `image_size`: stills as they are (or their largest face when
    `spec.face_crop`), videos as the face crops of `faces.frames_per_video` sampled frames."""
    from .ingest import extract_faces

    root = Path(spec.path)
    pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
    listed = list_files(root)
    arrays, labels, files, groups, unreadable, no_face = [], [], [], [], [], []
    to_crop = []
    for path, class_name in listed:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in VIDEO_EXTENSIONS or spec.face_crop:
            group = rel if path.suffix.lower() in VIDEO_EXTENSIONS else _group_of(path, pattern)
            to_crop.append(ImageFile(path, rel, "test", class_name, video=group and f"{class_name}/{group}"))
            continue
        try:
            arrays.append(resize_square(decode_image(path.read_bytes(), rel), image_size))
        except (ImageError, OSError) as exc:
            unreadable.append(str(exc))
            continue
        labels.append(label_of(class_name))
        files.append(rel)
        group = _group_of(path, pattern)
        groups.append(f"{class_name}/{group}" if group else rel)
    if to_crop:
        with tempfile.TemporaryDirectory(prefix="dfdetect-suite-") as tmp:
            for result in extract_faces(to_crop, Path(tmp), faces, workers):
                rel = result.source.relpath
                if result.error:
                    unreadable.append(result.error)
                    continue
                no_face += [rel if not result.source.is_video else f"{rel}#frame{i}" for i in result.without_face]
                for crop in result.crops:
                    arrays.append(resize_square(_read_rgb(crop.path), image_size))
                    labels.append(crop.label)
                    files.append(rel)
                    groups.append(crop.video or rel)
    if not arrays:
        raise DatasetError(f"{root}: no usable image (unreadable: {len(unreadable)}, without a face: {len(no_face)})")
    split = PreparedSplit(np.stack(arrays), np.array(labels, dtype=np.int64), files, groups)
    return SuiteData(split, files, has_videos=len(set(groups)) < len(groups), no_face=no_face, unreadable=unreadable)


def _read_rgb(path: Path):
    """A face crop this run just wrote."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Fake recall (fakes called fake) and real false-positive rate (reals called fake) at the threshold."""
    out = {}
    if (labels == 1).any():
        out["fake_recall"] = round(float((scores[labels == 1] >= threshold).mean()), 6)
    if (labels == 0).any():
        out["real_fpr"] = round(float((scores[labels == 0] >= threshold).mean()), 6)
    return out


def score_row(labels: np.ndarray, scores: np.ndarray, threshold: float, groups: list[str] | None = None) -> dict:
    """One table row: counts, frame metrics where both classes are present, the two rates, video metrics."""
    row = {"n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum())}
    if row["n_real"] and row["n_fake"]:
        row.update({k: round(v, 6) for k, v in compute_all(labels, scores, threshold, FRAME_METRICS).items()})
    row.update(rates(labels, scores, threshold))
    if groups is not None and len(set(groups)) < len(groups):
        v_labels, v_scores = video_level(groups, labels, scores)
        row["n_videos"] = len(v_labels)
        if (v_labels == 0).any() and (v_labels == 1).any():
            row.update(
                {
                    f"video_{k}": round(v, 6)
                    for k, v in compute_all(v_labels, v_scores, threshold, ["roc_auc", "average_precision"]).items()
                }
            )
        row.update({f"video_{k}": v for k, v in rates(v_labels, v_scores, threshold).items()})
    return row


def group_rates(
    files: list[str],
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    pattern: str,
    names: dict[str, dict[str, str]],
    bins: dict[str, list[float]] | None = None,
) -> dict:
    """Per attribute of the file names (regex named groups), per value (or band of values, `bins`): images and
    the error rate of its class (real false positives, fake misses), and the highest rate over the lowest among
    groups of >= MIN_GROUP."""
    regex = re.compile(pattern)
    bins = bins or {}
    values: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, f in enumerate(files):
        m = regex.match(Path(f).name)
        if m:
            for attr, value in m.groupdict().items():
                if value is None:
                    continue
                if attr in bins:
                    label = band(value, bins[attr], f"{f}: attribute {attr}")[1]
                else:
                    label = names.get(attr, {}).get(value, value)
                values[attr][label].append(i)
    out = {}
    for attr, by_value in values.items():
        rows = {}
        for value, idx in in_order(by_value):  # bands in the order of their edges, other values by name
            idx = np.asarray(idx)
            rows[value] = {
                "n": len(idx),
                "n_real": int((labels[idx] == 0).sum()),
                "n_fake": int((labels[idx] == 1).sum()),
                **rates(labels[idx], scores[idx], threshold),
            }
        out[attr] = {"groups": rows, **_spread(rows)}
    return out


def _spread(rows: dict[str, dict]) -> dict:
    """The fairness check among groups with enough images of the class to judge (MIN_GROUP): the real
    false-positive rate's lowest, highest (the worst group's) and highest over lowest, and fake recall's lowest,
    highest and highest over lowest (the best-served group's over the worst's). A ratio is None when its lowest
    rate is 0 and another is not (no finite ratio: JSON has no infinity)."""
    out = {}
    for rate, count in (("real_fpr", "n_real"), ("fake_recall", "n_fake")):
        values = [r[rate] for r in rows.values() if rate in r and r[count] >= MIN_GROUP]
        if len(values) >= 2:
            low, high = min(values), max(values)
            out[f"{rate}_min"], out[f"{rate}_max"] = low, high
            out[f"{rate}_ratio"] = round(high / low, 4) if low > 0 else (1.0 if high == 0 else None)
    return out


def suite_row(spec: SuiteSet, data: SuiteData, scores: np.ndarray, threshold: float) -> dict:
    """The full row of one suite set: score_row, per-group rates, and what could not be scored."""
    labels = data.split.labels
    row = score_row(labels, scores, threshold, data.split.videos if data.has_videos else None)
    if spec.attributes:
        row["groups"] = group_rates(
            data.files, labels, scores, threshold, spec.attributes, spec.attribute_names, spec.attribute_bins
        )
    row["no_face"] = len(data.no_face)
    row["unreadable"] = len(data.unreadable)
    return row


def score_suite(
    sets: list[SuiteSet],
    score: Callable[[PreparedSplit], np.ndarray],
    image_size: int,
    faces: FacesParams,
    threshold: float,
    workers: int = 1,
) -> dict[str, dict]:
    """Every set's row, in the order given."""
    rows = {}
    for spec in sets:
        data = load_suite_set(spec, image_size, faces, workers)
        rows[spec.label] = suite_row(spec, data, score(data.split), threshold)
        log.info("suite %s: %s", spec.label, {k: v for k, v in rows[spec.label].items() if not isinstance(v, dict)})
    return rows


TABLE_COLUMNS = [
    "n_real",
    "n_fake",
    "n_videos",
    *FRAME_METRICS,
    "fake_recall",
    "real_fpr",
    "video_roc_auc",
    "video_fake_recall",
    "video_real_fpr",
    "no_face",
]


def table_markdown(title: str, rows: dict[str, dict]) -> str:
    """The suite as one table, then the per-group rates of the sets that have them."""
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows.values())]
    lines = [f"## {title}", "", "| set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, row in rows.items():
        for attr, g in row.get("groups", {}).items():
            lines += [
                "",
                f"### {name}: by {attr}",
                "",
                "| group | images | real false-positive rate | fake recall |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {value} | {r['n']} | {r.get('real_fpr', '')} | {r.get('fake_recall', '')} |"
                for value, r in in_order(g["groups"])
            ]
            if "real_fpr_ratio" in g:
                lines.append(
                    f"\nReal false-positive rate: worst group {g['real_fpr_max']}, highest / lowest {g['real_fpr_ratio']}"
                )
            if "fake_recall_ratio" in g:
                lines.append(
                    f"\nFake recall: worst group {g['fake_recall_min']}, highest / lowest {g['fake_recall_ratio']}"
                )
    return "\n".join(lines) + "\n"


def flat_metrics(rows: dict[str, dict], prefix: str = "dataset") -> dict[str, float]:
    """MLflow metric names for every number of the rows (groups as NAME/ATTR=VALUE/...)."""
    out = {}
    for name, row in rows.items():
        for k, v in row.items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                out[f"{prefix}/{name}/{k}"] = float(v)
        for attr, g in row.get("groups", {}).items():
            for value, r in g["groups"].items():  # MLflow names allow letters, digits, _ - . / : and space
                safe = re.sub(r"[^\w.\- ]", "_", value)
                out.update({f"{prefix}/{name}/{attr}/{safe}/{k}": float(v) for k, v in r.items()})
            for key in ("real_fpr_max", "real_fpr_ratio", "fake_recall_min", "fake_recall_ratio"):
                if g.get(key) is not None:
                    out[f"{prefix}/{name}/{attr}/{key}"] = float(g[key])
    return out
