"""`dfdetect prepare`: validate a data set, write its manifest and report, and decode it once into a cache."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import DEFAULT_MARGIN, FacesParams, PrepareParams
from .data import CACHE_META, SPLITS, DatasetError, ImageFile, cache_paths, discover
from .faces import build_detector, framing
from .ingest import extract_faces, faces_report
from .io_utils import UnreadableFile, atomic_dir, atomic_write_csv, read_regular_file
from .labels import CLASS_NAMES, LABEL_MAP
from .mixture import (
    DEFAULT_SPLIT,
    SPLIT_SALT,
    assign_splits,
    cap_per_class,
    discover_source,
    dvc_version,
    has_splits,
    list_unsplit,
)
from .preprocessing import ImageError, PreprocessConfig, decode_image, resize_square
from .progress import map_chunks

log = logging.getLogger(__name__)
MANIFEST_FIELDS = [
    "dataset",
    "path",
    "split",
    "label",
    "class",
    "sha256",
    "width",
    "height",
    "status",
    "video",
    "frame",
    "identity",
    "source",
]


@dataclass
class Checked:
    file: ImageFile
    sha256: str
    pixel_sha256: str | None = None
    width: int = 0
    height: int = 0
    array: np.ndarray | None = None
    status: str = "ok"  # ok | unreadable | too_small | duplicate | leaked
    problem: str = ""


def check_one(file: ImageFile, image_size: int, min_size: int) -> Checked:
    try:  # a FIFO or device is refused unopened; an I/O error makes the file unreadable, not the run fail
        data = read_regular_file(file.path, file.relpath)
    except UnreadableFile as exc:
        return Checked(file, "", status="unreadable", problem=str(exc))
    checked = Checked(file, hashlib.sha256(data).hexdigest())
    try:
        img = decode_image(data, file.relpath)
    except ImageError as exc:
        checked.status, checked.problem = "unreadable", str(exc)
        return checked
    checked.width, checked.height = img.size
    checked.pixel_sha256 = hashlib.sha256(img.tobytes()).hexdigest()
    if min(img.size) < min_size:
        checked.status = "too_small"
        checked.problem = f"{file.relpath}: {img.width}x{img.height} is under the minimum side of {min_size}px"
        return checked
    checked.array = resize_square(img, image_size)
    return checked


def _check_chunk(args) -> list[Checked]:
    files, image_size, min_size = args
    return [check_one(f, image_size, min_size) for f in files]


def check_all(files: list[ImageFile], params: PrepareParams, workers: int) -> list[Checked]:
    chunks = [files[i : i + 256] for i in range(0, len(files), 256)]
    return map_chunks(
        _check_chunk, [(c, params.image_size, params.min_size) for c in chunks], "decoding images", len(files), workers
    )


def find_leaks(checked: list[Checked]) -> list[dict]:
    """The same decoded content in more than one split."""
    by_content = defaultdict(list)
    for c in checked:
        if c.pixel_sha256 and c.status != "leaked":
            by_content[c.pixel_sha256].append(c)
    leaks = []
    for group in by_content.values():
        if len({c.file.split for c in group}) > 1:
            leaks.append({"pixel_sha256": group[0].pixel_sha256, "files": [c.file.relpath for c in group]})
    return leaks


def drop_leaked_copies(checked: list[Checked]) -> int:
    """Content found in two splits keeps its copies in the earliest split (train, then val) and loses the
    others, listed in the report as leaked; returns how many were dropped."""
    order = {split: i for i, split in enumerate(SPLITS)}
    by_content = defaultdict(list)
    for c in checked:
        if c.pixel_sha256 and c.status == "ok":
            by_content[c.pixel_sha256].append(c)
    dropped = 0
    for group in by_content.values():
        first = min(order[c.file.split] for c in group)
        for c in group:
            if order[c.file.split] > first:
                c.status, dropped = "leaked", dropped + 1
                c.problem = f"{c.file.relpath}: same content as a file in '{SPLITS[first]}' (prepare.drop_leaks)"
    return dropped


def assign_groups(files: list[ImageFile], pattern: str | None) -> tuple[list[ImageFile], list[str]]:
    """Each file's video (a video file is its own; images by `pattern` on the file name) and identity."""
    regex = re.compile(pattern) if pattern else None
    out, unmatched = [], 0
    for f in files:
        stem = Path(f.relpath).stem
        m = regex.match(stem) if regex else None
        if regex and not m and not f.is_video:
            unmatched += 1
        video = (m.group("video") if m else stem) if f.is_video or m else ""
        identity = (m.groupdict().get("identity") or "") if m else ""
        out.append(replace(f, video=f"{f.class_name}/{video}" if video else "", identity=identity))
    notes = (
        [f"prepare.group_pattern matched no video in {unmatched} image names: each is its own group"]
        if unmatched
        else []
    )
    return out, notes


def find_group_leaks(files: list[ImageFile]) -> list[str]:
    """Videos and identities found in more than one split."""
    problems = []
    for attr, what in (("video", "video"), ("identity", "identity")):
        splits = defaultdict(set)
        for f in files:
            if getattr(f, attr):
                splits[getattr(f, attr)].add(f.split)
        problems += [
            f"{what} {key!r} is in {sorted(s, key=['train', 'val', 'test'].index)}"
            for key, s in sorted(splits.items())
            if len(s) > 1
        ]
    return problems


def mark_duplicates(checked: list[Checked]) -> int:
    """Keep one copy of identical content within a split; the rest would only weigh it twice."""
    seen, n = set(), 0
    for c in checked:
        if c.status != "ok":
            continue
        key = (c.file.split, c.pixel_sha256)
        if key in seen:
            c.status, c.problem, n = "duplicate", f"{c.file.relpath}: same content as another file in its split", n + 1
        seen.add(key)
    return n


def build_report(
    checked: list[Checked], leaks: list[dict], notes: list[str], params: PrepareParams, faces: dict | None = None
) -> dict:
    counts = Counter((c.file.split, c.file.class_name) for c in checked if c.status == "ok")
    splits = sorted({c.file.split for c in checked}, key=["train", "val", "test"].index)
    per_split = {}
    for s in splits:
        real, fake = counts[(s, "real")], counts[(s, "fake")]
        videos = len({c.file.video for c in checked if c.status == "ok" and c.file.split == s and c.file.video})
        per_split[s] = {
            "real": real,
            "fake": fake,
            "total": real + fake,
            "fake_fraction": round(fake / max(1, real + fake), 4),
            "videos": videos,
        }
    problems = {
        status: [c.problem for c in checked if c.status == status]
        for status in ("unreadable", "too_small", "duplicate", "leaked")
    }
    by_source = Counter((c.file.dataset, c.file.split, c.file.class_name) for c in checked if c.status == "ok")
    sources = {
        name: {s: {k: by_source[(name, s, k)] for k in CLASS_NAMES} for s in splits}
        for name in sorted({c.file.dataset for c in checked})
    }
    return {
        "label_map": LABEL_MAP,
        "image_size": params.image_size,
        "files_found": len(checked),
        "files_used": sum(counts.values()),
        "splits": per_split,
        "sources": sources,
        "unreadable": problems["unreadable"],
        "too_small": problems["too_small"],
        "duplicates_within_split": problems["duplicate"],
        "leaked_dropped": problems["leaked"],
        "leaks_across_splits": leaks,
        "faces": faces,
        "notes": notes,
    }


def report_markdown(report: dict) -> str:
    lines = [
        "# Data report",
        "",
        f"Files found: {report['files_found']}, used: {report['files_used']}, "
        f"images resized to {report['image_size']}px. Labels: {report['label_map']}.",
        "",
        "| split | real | fake | total | fake fraction | videos |",
        "|---|---|---|---|---|---|",
    ]
    for s, c in report["splits"].items():
        lines.append(f"| {s} | {c['real']} | {c['fake']} | {c['total']} | {c['fake_fraction']:.2f} | {c['videos']} |")
    if len(report.get("sources", {})) > 1:  # a mixture: what each source contributes
        lines += [
            "",
            "## Sources (real / fake per split)",
            "",
            "| source | version | " + " | ".join(report["splits"]) + " |",
            "|---|---|" + "---|" * len(report["splits"]),
        ]
        for name, per in report["sources"].items():
            version = report.get("source_versions", {}).get(name, "")
            lines.append(
                f"| {name} | {version} | "
                + " | ".join(f"{per[s]['real']} / {per[s]['fake']}" for s in report["splits"])
                + " |"
            )
    if report.get("faces"):
        f = report["faces"]
        lines += [
            "",
            f"## Face crops: {f['crops']} from {f['sources']} sources ({f['videos']} videos)",
            "",
            f"Frames sampled: {f['frames_sampled']}; without a face: {f['frames_without_face']}.",
            "",
        ]
        lines += [f"- unreadable, skipped: {e}" for e in f["unreadable"]]
        lines += [f"- no face in any sampled frame: {v}" for v in f["no_face_at_all"]]
        lines += [f"- {v}: no face in frames {frames}" for v, frames in list(f["without_face"].items())[:200]]
    for title, key in [
        ("Unreadable or truncated (excluded)", "unreadable"),
        ("Under the minimum size (excluded)", "too_small"),
        ("Duplicates within a split (excluded)", "duplicates_within_split"),
        ("In two splits, dropped from the later one (prepare.drop_leaks)", "leaked_dropped"),
    ]:
        lines += ["", f"## {title}: {len(report[key])}"] + [f"- {p}" for p in report[key][:200]]
    lines += ["", f"## Same content in two splits (leakage): {len(report['leaks_across_splits'])}"]
    lines += [f"- {', '.join(leak['files'])}" for leak in report["leaks_across_splits"][:200]]
    if report["notes"]:
        lines += ["", "## Notes"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_manifest(path: Path, checked: list[Checked]) -> None:
    atomic_write_csv(
        path,
        (
            {
                "dataset": c.file.dataset,
                "path": c.file.relpath,
                "split": c.file.split,
                "label": c.file.label,
                "class": c.file.class_name,
                "sha256": c.sha256,
                "width": c.width,
                "height": c.height,
                "status": c.status,
                "video": c.file.video,
                "frame": c.file.frame,
                "identity": c.file.identity,
                "source": c.file.source,
            }
            for c in checked
        ),
        MANIFEST_FIELDS,
    )


def prepare(data_dir: str | Path, out_dir: str | Path, params: PrepareParams, workers: int = 1) -> dict:
    """Validate `data_dir` (cropping the faces of its videos), then atomically (re)write `out_dir` with
    manifest, report, face crops and cache."""
    if has_splits(Path(data_dir)) or not Path(data_dir).is_dir():
        files, notes = discover(data_dir)
        files, group_notes = assign_groups(files, params.group_pattern)
    else:  # {real,fake}/ alone: split by group as a mixture source is
        files, group_notes = assign_groups(list_unsplit(Path(data_dir)), params.group_pattern)
        files = assign_splits(files, DEFAULT_SPLIT, SPLIT_SALT)
        notes = [f"{data_dir}: no split folders; split by group {DEFAULT_SPLIT}"]
    files = [replace(f, dataset=params.name) for f in files]
    files, dropped = cap_per_class(files, params.max_per_class, SPLIT_SALT)
    notes += group_notes + (
        [f"{dropped} files left out by prepare.max_per_class={params.max_per_class}"] if dropped else []
    )
    crop_stills = {params.name} if params.faces.crop_images else set()
    for source in params.sources:  # a mixture: every source into the same splits, each file remembering its source
        source_files, source_notes = discover_source(source, assign_groups)
        files += source_files
        notes += source_notes
        if source.face_crop:
            crop_stills.add(source.label)
    group_leaks = find_group_leaks(files)
    if group_leaks and not params.allow_leakage:
        listing = "\n  ".join(group_leaks[:20])
        raise DatasetError(
            f"{len(group_leaks)} videos or identities are in more than one split; frames of one video "
            f"(or one person) must stay in one split (set prepare.allow_leakage to override):\n  {listing}"
        )
    to_crop = [f for f in files if f.is_video or f.dataset in crop_stills]
    faces_params = params.faces
    if faces_params.margin == "auto":  # frame every crop as --data's own stills are framed
        faces_params, note = resolve_margin(files, params, crop_stills)
        notes.append(note)
    log.info(
        "found %d images and %d videos under %s",
        len(files) - sum(f.is_video for f in files),
        sum(f.is_video for f in files),
        data_dir,
    )
    with atomic_dir(out_dir) as tmp:
        crops = extract_faces(to_crop, tmp, faces_params, workers)
        faces = faces_report(crops) if to_crop else None
        cropped = set(to_crop)
        files = [f for f in files if f not in cropped] + [c for r in crops for c in r.crops]
        checked = check_all(files, params, workers)
        report = _validate(checked, notes, params, data_dir, faces)
        report["source_versions"] = {
            params.name: dvc_version(data_dir),
            **{s.label: dvc_version(s.path) for s in params.sources},
        }
        report["face_margin"] = faces_params.margin
        _write_cache(tmp, checked, report, params, data_dir, faces_params.margin)
    return report


FRAMING_SAMPLE = 200  # stills measured for prepare.faces.margin auto


def resolve_margin(files: list[ImageFile], params: PrepareParams, crop_stills: set[str]) -> tuple[FacesParams, str]:
    """prepare.faces.margin auto: the median framing (crop side / face box side) of up to FRAMING_SAMPLE of
    --data's training stills that are not face-cropped here; the common 1.3 when there are none (all crops
    are then made by prepare) or no face is found in them."""
    stills = [
        f
        for f in files
        if f.dataset == params.name and f.split == "train" and not f.is_video and f.dataset not in crop_stills
    ]
    sample = stills[:: max(1, len(stills) // FRAMING_SAMPLE)][:FRAMING_SAMPLE]
    crops = []
    for f in sample:
        try:
            crops.append(np.asarray(decode_image(read_regular_file(f.path, f.relpath), f.relpath)))
        except (UnreadableFile, ImageError):
            continue  # reported by the validation below
    ratios = framing(crops, build_detector(params.faces.detector, params.faces.min_face)) if crops else []
    if not ratios:
        return params.faces.with_margin(DEFAULT_MARGIN), (
            f"prepare.faces.margin auto: no face measured in {len(crops)} stills of '{params.name}'; margin {DEFAULT_MARGIN}"
        )
    margin = round(float(np.clip(np.median(ratios), 0.5, 3.0)), 3)
    return params.faces.with_margin(margin), (
        f"prepare.faces.margin auto: '{params.name}' frames faces at {margin} x the face box (median of {len(ratios)} "
        f"of {len(crops)} stills): every face crop here, in evaluation and in serving uses that margin"
    )


def _validate(checked: list[Checked], notes: list[str], params: PrepareParams, data_dir, faces: dict | None) -> dict:
    unreadable = [c for c in checked if c.status == "unreadable"]
    if len(unreadable) > params.max_bad_fraction * len(checked):
        listing = "\n  ".join(c.problem for c in unreadable[:20])
        raise DatasetError(
            f"{len(unreadable)} of {len(checked)} files are unreadable, above prepare.max_bad_fraction="
            f"{params.max_bad_fraction}:\n  {listing}"
        )
    leaks = find_leaks(checked)
    if leaks and params.drop_leaks and not params.allow_leakage:
        drop_leaked_copies(checked)
        leaks = find_leaks(checked)
    if leaks and not params.allow_leakage:
        listing = "\n  ".join(", ".join(leak["files"]) for leak in leaks[:20])
        raise DatasetError(
            f"{len(leaks)} images appear in more than one split (leakage; set prepare.allow_leakage to override):\n  {listing}"
        )
    mark_duplicates(checked)
    for c in checked:
        if c.status != "ok":
            log.warning("excluded: %s", c.problem)
    report = build_report(checked, leaks, notes, params, faces)
    for split, counts in report["splits"].items():
        for class_name in CLASS_NAMES:
            if counts[class_name] == 0:
                raise DatasetError(
                    f"{Path(data_dir) / split / class_name}: no usable images left after validation"
                    + (" (no face found in its videos?)" if faces else "")
                )
    return report


def _write_cache(
    tmp: Path, checked: list[Checked], report: dict, params: PrepareParams, data_dir, face_margin: float
) -> None:
    preprocess = PreprocessConfig(image_size=params.image_size, face_margin=face_margin)
    meta = {
        "preprocess": preprocess.to_dict(),
        "label_map": LABEL_MAP,
        "data_dir": str(data_dir),
        "splits": {},
        "sources": {s.label: {"path": str(s.path)} for s in params.sources},
    }
    for split in report["splits"]:
        used = [c for c in checked if c.file.split == split and c.status == "ok"]
        img_path, lab_path = cache_paths(tmp, split)
        np.save(img_path, np.stack([c.array for c in used]))
        np.save(lab_path, np.array([c.file.label for c in used], dtype=np.int64))
        meta["splits"][split] = {
            "count": len(used),
            "relpaths": [c.file.relpath for c in used],
            "videos": [c.file.group for c in used],
            "datasets": [c.file.dataset for c in used],
        }
    write_manifest(tmp / "manifest.csv", checked)
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "report.md").write_text(report_markdown(report))
    (tmp / CACHE_META).write_text(json.dumps(meta) + "\n")
