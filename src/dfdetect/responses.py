"""The JSON the service answers, in the original service's format: one frame's verdict, a video's frames and
mean verdict, a face box. The verdict is the right way round (fake = label 1)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .labels import CLASS_NAMES, FAKE, REAL

if TYPE_CHECKING:
    from .faces import FaceBox
    from .model_set import Scored


REVIEW = "review"


def verdict(p: float, threshold: float, review_band: tuple[float, float] | None = None) -> str:
    """fake, real, or review when P(fake) lies within serving.review_band (inclusive): too close to call
    for the model alone. `is_fake` keeps the threshold's answer either way, as the original service's field."""
    if review_band is not None and review_band[0] <= p <= review_band[1]:
        return REVIEW
    return CLASS_NAMES[FAKE] if p >= threshold else CLASS_NAMES[REAL]


def frame_response(
    frame_number: int, scored: Scored, started: float, review_band: tuple[float, float] | None = None
) -> dict:
    """The original service's JSON for one frame, with the verdict the right way round (fake = label 1)."""
    p, is_fake = scored.fake_probability, scored.is_fake
    body = {
        "frameNumber": frame_number,
        "confidence": round(p if is_fake else 1 - p, 6),
        "distribution": {CLASS_NAMES[REAL]: round(1 - p, 6), CLASS_NAMES[FAKE]: round(p, 6)},
        "is_fake": bool(is_fake),
        "verdict": verdict(p, scored.threshold, review_band),
        "threshold": round(scored.threshold, 6),
        "processingTime": round((time.perf_counter() - started) * 1000, 2),
        "modelVersion": scored.version,
    }
    if scored.shadow:
        body["shadow"] = scored.shadow
    return body


def face_json(box: FaceBox) -> dict:
    return {"x": box.x, "y": box.y, "width": box.w, "height": box.h}


def video_response(
    clip,
    scored: list[Scored],
    started: float,
    indices: list[int] | None = None,
    without_face: list[int] | None = None,
    review_band: tuple[float, float] | None = None,
) -> dict:
    """Per-frame verdicts and the video's: the mean frame score (the benchmarks' video-level protocol).
    `indices`: the frames scored, when some were skipped (no face)."""
    mean = float(np.mean([s.fake_probability for s in scored]))
    threshold, version = scored[0].threshold, scored[0].version
    extra = {"framesWithoutFace": without_face} if without_face is not None else {}
    return {
        **extra,
        "frames": [
            {
                "frameNumber": i,
                "fake_probability": round(s.fake_probability, 6),
                "is_fake": s.is_fake,
                "modelVersion": s.version,
            }
            for i, s in zip(indices or clip.indices, scored)
        ],
        "fake_probability": round(mean, 6),
        "is_fake": mean >= threshold,
        "verdict": verdict(mean, threshold, review_band),
        "threshold": round(threshold, 6),
        "confidence": round(mean if mean >= threshold else 1 - mean, 6),
        "duration": round(clip.duration_s, 3),
        "fps": round(clip.fps, 3),
        "total_frames": clip.total_frames,
        "resolution": {"width": clip.width, "height": clip.height},
        "processingTime": round((time.perf_counter() - started) * 1000, 2),
        "modelVersion": version,
    }
