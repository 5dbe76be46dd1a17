"""Faces: find the largest face in a frame and crop it the way detectors are trained (box enlarged, square).

Detectors live in a registry, so another one (MTCNN, RetinaFace) is one class. The default is OpenCV's Haar
cascade: its weights ship inside the opencv-python-headless wheel, so nothing downloads at run time; see the
README for the comparison behind that choice. Training (prepare) and serving crop with this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

_DETECTORS: dict[str, Callable[..., "FaceDetector"]] = {}


class FaceError(ValueError):
    """A face-detection setting that cannot work (unknown detector, missing model file)."""


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return self.w * self.h


class FaceDetector:
    name = "base"

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        raise NotImplementedError

    def largest(self, rgb: np.ndarray) -> FaceBox | None:
        """The largest face (the benchmark convention: the subject of the video), or None."""
        boxes = self.detect(rgb)
        return max(boxes, key=lambda b: (b.area, b.score)) if boxes else None


def register_detector(name: str):
    def decorator(factory):
        _DETECTORS[name] = factory
        factory.name = name
        return factory
    return decorator


def available_detectors() -> list[str]:
    return sorted(_DETECTORS)


def build_detector(name: str, min_face: int = 40) -> FaceDetector:
    if name not in _DETECTORS:
        raise FaceError(f"prepare.faces.detector={name!r}: unknown face detector (have {available_detectors()})")
    return _DETECTORS[name].load(min_face=min_face)


@register_detector("haar")
class HaarFaceDetector(FaceDetector):
    """OpenCV's frontal-face Haar cascade (Viola-Jones), on a frame scaled to at most `max_side` pixels."""

    CASCADE = "haarcascade_frontalface_alt2.xml"  # measured best of the bundled cascades: benchmarks/ingest.py

    def __init__(self, classifier, min_face: int = 40, max_side: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5):
        self.classifier, self.min_face, self.max_side = classifier, min_face, max_side
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors

    @classmethod
    def load(cls, min_face: int = 40, cascade: str | None = None) -> "HaarFaceDetector":
        import cv2

        path = cv2.data.haarcascades + (cascade or cls.CASCADE)
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            raise FaceError(f"{path}: cannot load the Haar cascade (opencv-python-headless 4.x ships it; 5.x does not)")
        return cls(classifier, min_face)

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        import cv2

        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(gray.shape))
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_side = max(12, int(self.min_face * scale))
        boxes, _, weights = self.classifier.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side),
            outputRejectLevels=True)
        return [FaceBox(int(x / scale), int(y / scale), int(w / scale), int(h / scale), float(s))
                for (x, y, w, h), s in zip(boxes, np.ravel(weights))]


def square_box(box: FaceBox, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The box enlarged `margin` times around its centre, made square and moved inside the frame:
    (left, top, right, bottom). The side shrinks only when the frame is smaller than it."""
    side = min(int(round(max(box.w, box.h) * margin)), width, height)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def crop_face(rgb: np.ndarray, box: FaceBox, margin: float, size: int) -> np.ndarray:
    """The square crop around `box`, resized to size x size (uint8 RGB)."""
    left, top, right, bottom = square_box(box, rgb.shape[1], rgb.shape[0], margin)
    crop = Image.fromarray(np.ascontiguousarray(rgb[top:bottom, left:right]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)
