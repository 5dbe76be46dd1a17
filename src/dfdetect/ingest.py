"""Videos (and, when asked, photos) -> face crops: sample frames, find the largest face, crop, save.

Runs inside `prepare`: the crops become ordinary images of the prepared data set, each remembering its video,
frame number and source file. A video that cannot be decoded is reported by name and skipped; frames without
a face are counted per video, never dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .config import FacesParams
from .data import FACES_DIR, SPLITS, ImageFile
from .faces import FaceDetector, build_detector, crop_face
from .io_utils import check_regular_file, read_regular_file
from .preprocessing import ImageError, decode_image
from .progress import map_chunks
from .video import VideoError, read_frames

log = logging.getLogger(__name__)
JPEG_QUALITY = 95


@dataclass
class SourceResult:
    source: ImageFile
    crops: list[ImageFile] = field(default_factory=list)
    frames: int = 0  # frames sampled (1 for a photo)
    without_face: list[int] = field(default_factory=list)  # frame numbers where no face was found
    error: str = ""  # the file could not be read


_detectors: dict[tuple[str, int], FaceDetector] = {}  # built once per process


def _get_detector(params: FacesParams) -> FaceDetector:
    key = (params.detector, params.min_face)
    if key not in _detectors:
        _detectors[key] = build_detector(*key)
    return _detectors[key]


def crop_name(file: ImageFile, frame: int) -> str:
    rel, prefix = file.relpath, ""
    if rel.startswith("@"):  # a mixture's other source (@NAME/...): its name keeps crops of two sources apart
        name, _, rel = rel[1:].partition("/")
        prefix = name + "__"
    parts = Path(rel).with_suffix("").as_posix().split("/")
    parts = parts[2:] if len(parts) > 2 and parts[0] in SPLITS else parts[1:] if len(parts) > 1 else parts
    tag = hashlib.sha256(file.relpath.encode()).hexdigest()[:8]  # a.jpg and a.mp4, a/b and a__b stay apart
    return f"{FACES_DIR}/{file.split}/{file.class_name}/{prefix}{'__'.join(parts)}__{tag}__f{frame:06d}.jpg"


def extract_one(file: ImageFile, out_root: Path, params: FacesParams) -> SourceResult:
    """Crops of one video or photo, written under out_root/faces/...; never raises for a bad file."""
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core
    result = SourceResult(file)
    try:
        if file.is_video:
            check_regular_file(file.path, file.relpath)  # FFmpeg would block on a FIFO
            clip = read_frames(file.path, params.frames_per_video, file.relpath)
            frames = list(zip(clip.indices, clip.frames))
        else:
            frames = [(0, np.asarray(decode_image(read_regular_file(file.path, file.relpath), file.relpath)))]
    except (VideoError, ImageError, OSError) as exc:
        result.error = str(exc)
        return result
    detector = _get_detector(params)
    result.frames = len(frames)
    for index, rgb in frames:
        box = detector.largest(rgb)
        if box is None:
            result.without_face.append(index)
            continue
        rel = crop_name(file, index)
        target = out_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        crop = crop_face(rgb, box, params.margin, params.crop_size, align=params.align)
        Image.fromarray(crop).save(target, quality=JPEG_QUALITY)
        video = file.video or (f"{file.class_name}/{Path(file.relpath).stem}" if file.is_video else file.relpath)
        result.crops.append(
            replace(
                file,
                path=target,
                relpath=rel,
                video=video,
                frame=index if file.is_video else file.frame,
                source=file.relpath,
            )
        )
    return result


def _extract_chunk(args) -> list[SourceResult]:
    files, out_root, params = args
    return [extract_one(f, out_root, params) for f in files]


def extract_faces(files: list[ImageFile], out_root: Path, params: FacesParams, workers: int = 1) -> list[SourceResult]:
    """Face crops of every file, in the order given, using `workers` processes."""
    if not files:
        return []
    if params.margin == "auto":
        raise ValueError("extract_faces needs a number for prepare.faces.margin (resolve 'auto' first)")
    build_detector(params.detector, params.min_face)  # a bad setting fails here, before any work
    # spawn, not fork: OpenCV's thread pool in a forked child can deadlock
    results = map_chunks(
        _extract_chunk,
        [([f], out_root, params) for f in files],
        "cropping faces",
        len(files),
        min(workers, os.cpu_count() or 1),
        multiprocessing.get_context("spawn"),
    )
    for r in results:
        if r.error:
            log.warning("skipped: %s", r.error)
        elif r.without_face:
            log.info("%s: no face in %d of %d frames", r.source.relpath, len(r.without_face), r.frames)
    return results


def faces_report(results: list[SourceResult]) -> dict:
    videos = [r for r in results if r.source.is_video]
    return {
        "sources": len(results),
        "videos": len(videos),
        "unreadable": [r.error for r in results if r.error],
        "frames_sampled": sum(r.frames for r in results),
        "frames_without_face": sum(len(r.without_face) for r in results),
        "crops": sum(len(r.crops) for r in results),
        "without_face": {r.source.relpath: r.without_face for r in results if r.without_face},
        "no_face_at_all": [r.source.relpath for r in results if not r.error and r.frames and not r.crops],
    }
