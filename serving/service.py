"""The dfdetect BentoML service: `bentoml serve serving.service:Detector`.

One service answers HTTP (the original service's endpoints) and holds the models, which follow the
registry's aliases. Every image goes through one in-process adaptive batcher (dfdetect.batching), so
concurrent requests are scored together; `/score` is the same batched prediction for arrays. Settings come
from params.yaml (`DFDETECT_PARAMS`), the tracking server from `MLFLOW_TRACKING_URI`.
"""

import dataclasses
import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from bentoml.validators import DType
from fastapi import FastAPI
from PIL import Image
from prometheus_client import Counter, Histogram

from dfdetect.batching import MicroBatcher, Overloaded
from dfdetect.config import load_params
from dfdetect.preprocessing import ImageError, decode_image, resize_square
from dfdetect.serving import (FaceCropper, ModelSet, RegistryLoader, Scored, face_json, frame_response, pick_arm,
                              video_response)
from dfdetect.video import VideoError, read_frames

log = logging.getLogger("dfdetect.serving")
PARAMS = load_params(os.environ.get("DFDETECT_PARAMS", "params.yaml"))
SERVING = PARAMS.serving


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NoFace(BentoMLException):
    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


# Request counts and latency per endpoint are BentoML's own (bentoml_service_request_*) on /metrics.
PREDICTIONS = Counter("dfdetect_predictions", "Verdicts served, by model version and label", ["version", "label"])
BATCH_SIZE = Histogram("dfdetect_batch_size", "Images per model call (adaptive batching)",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))

health_app = FastAPI(title="dfdetect health")


@bentoml.service(workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(health_app, path="/")
class Detector:
    def __init__(self):
        self.models = ModelSet(PARAMS, RegistryLoader(PARAMS))
        try:
            self.models.refresh()
        except Exception as exc:  # nothing promoted yet, or the registry is down: not ready, keep polling
            log.warning("no model loaded yet (%s); retrying every %ss", exc, SERVING.poll_interval_s)
        self._stop = threading.Event()
        threading.Thread(target=self.models.watch, args=(self._stop,), daemon=True, name="registry-poll").start()
        self.batcher = MicroBatcher(self.models.score, SERVING.max_batch_size, SERVING.max_latency_ms,
                                    on_batch=BATCH_SIZE.observe)
        self._rng = np.random.default_rng()
        self.faces = FaceCropper(PARAMS.prepare.faces) if SERVING.face_crop else None

        @health_app.get("/health")
        async def health():
            info = self.models.info()
            return {"status": "ok" if info.get("ready") else "loading", **info}

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()  # the registry poll
        self.batcher.close()

    def __is_ready__(self) -> bool:
        """/readyz (the Kubernetes readiness probe) answers 503 until a model is loaded."""
        return self.models.ready

    @staticmethod
    def _check_size(upload: Path, field: str, limit_mb: float, param: str) -> None:
        size, limit = upload.stat().st_size, int(limit_mb * 1024 * 1024)
        if size > limit:
            raise PayloadTooLarge(f"{field}: {size} bytes is over the limit of {limit} bytes ({param})")

    def _read_image(self, image: Path, field: str = "image") -> np.ndarray:
        self._check_size(image, field, SERVING.max_upload_mb, "serving.max_upload_mb")
        try:
            return decode_image(image.read_bytes(), field)
        except ImageError as exc:
            raise InvalidArgument(str(exc)) from None

    def _image_size(self) -> int:
        info = self.models.info()
        if not info.get("ready"):
            raise ServiceUnavailable("model not loaded yet")
        return int(info["image_size"])

    async def _score(self, images: np.ndarray) -> list[Scored]:
        """One request's images, all answered by one version (drawn per request in A/B mode)."""
        arm = pick_arm(SERVING, self.models.challenger is not None, self._rng)
        try:
            return await self.batcher.submit(images, arm)
        except Overloaded as exc:
            raise ServiceUnavailable(f"overloaded: {exc}") from None

    @bentoml.api
    async def score(self, images: Annotated[np.ndarray, DType("uint8")]) -> list[dict]:
        """N x S x S x 3 uint8 -> per image: fake_probability, threshold, version (the batched prediction
        the HTTP endpoints use; S is the model's image_size, see /health)."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InvalidArgument(f"images: expected N x S x S x 3 uint8, got {images.dtype} {images.shape}")
        self._image_size()  # 503 until a model is loaded
        return [dataclasses.asdict(s) for s in await self._score(images)]

    @bentoml.api(route="/inference/analyze-frame")
    async def analyze_frame(self, image: Path, frameNumber: int = 0, explain: bool = False) -> dict:
        """One image (multipart field `image`) -> the original service's verdict JSON; `explain=true` adds a
        Grad-CAM overlay (`heatmap`, a PNG data URI) of what made the model say fake."""
        started = time.perf_counter()
        img = self._read_image(image)
        size = self._image_size()
        face = None
        if self.faces:
            found = await anyio.to_thread.run_sync(self.faces, np.asarray(img))
            if found is None:
                raise NoFace("image: no face found (serving.face_crop is on: the model scores face crops)")
            img, face = Image.fromarray(found[0]), found[1]
        array = resize_square(img, size)
        scored = (await self._score(array[None]))[0]
        PREDICTIONS.labels(scored.version, "fake" if scored.is_fake else "real").inc()
        body = frame_response(frameNumber, scored, started)
        if face:
            body["face"] = face_json(face)
        if explain:
            body.update(await anyio.to_thread.run_sync(self.models.explain, array))
        return body

    @bentoml.api(route="/inference/analyze-video")
    async def analyze_video(self, video: Path) -> dict:
        """A video (multipart field `video`): per-frame scores of uniformly sampled frames and their mean."""
        started = time.perf_counter()
        self._check_size(video, "video", SERVING.max_video_mb, "serving.max_video_mb")
        try:
            clip = await anyio.to_thread.run_sync(read_frames, video, SERVING.video_frames, "video")
        except VideoError as exc:
            raise InvalidArgument(str(exc)) from None
        size = self._image_size()
        frames, indices, without_face = clip.frames, clip.indices, None
        if self.faces:
            crops = [await anyio.to_thread.run_sync(self.faces, f) for f in clip.frames]
            without_face = [i for i, c in zip(clip.indices, crops) if c is None]
            frames = [c[0] for c in crops if c is not None]
            indices = [i for i, c in zip(clip.indices, crops) if c is not None]
            if not frames:
                raise NoFace(f"video: no face in any of the {len(clip.frames)} sampled frames (serving.face_crop is on)")
        scored = await self._score(np.stack([resize_square(Image.fromarray(f), size) for f in frames]))
        body = video_response(clip, scored, started, indices, without_face)
        PREDICTIONS.labels(body["modelVersion"], "fake" if body["is_fake"] else "real").inc()
        return body
