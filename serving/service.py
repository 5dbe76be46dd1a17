"""The dfdetect BentoML service: `bentoml serve serving.service:Detector`.

Two services: `Detector` answers HTTP (the original service's endpoints) and sends every image through
`Scorer.score`, a batchable API, so concurrent requests are batched adaptively. The Scorer holds the models
and follows the registry's aliases. Settings come from params.yaml (`DFDETECT_PARAMS`), the tracking server
from `MLFLOW_TRACKING_URI`.
"""

import dataclasses
import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from fastapi import FastAPI
from PIL import Image
from prometheus_client import Counter

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


@bentoml.service(workers=1, traffic={"timeout": 60})
class Scorer:
    def __init__(self):
        self.models = ModelSet(PARAMS, RegistryLoader(PARAMS))
        try:
            self.models.refresh()
        except Exception as exc:  # nothing promoted yet, or the registry is down: not ready, keep polling
            log.warning("no model loaded yet (%s); retrying every %ss", exc, SERVING.poll_interval_s)
        self._stop = threading.Event()
        threading.Thread(target=self.models.watch, args=(self._stop,), daemon=True, name="registry-poll").start()

    def __is_ready__(self) -> bool:
        return self.models.ready

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SERVING.max_batch_size, max_latency_ms=SERVING.max_latency_ms)
    def score(self, images: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 -> N dicts (an object array, so batches concatenate): score, threshold, version."""
        return np.array([dataclasses.asdict(s) for s in self.models.score(images, "primary")], dtype=object)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SERVING.max_batch_size, max_latency_ms=SERVING.max_latency_ms)
    def score_challenger(self, images: np.ndarray) -> np.ndarray:
        """The same, answered by the challenger (A/B mode; the champion when there is none)."""
        return np.array([dataclasses.asdict(s) for s in self.models.score(images, "challenger")], dtype=object)

    @bentoml.api
    def info(self) -> dict:
        return self.models.info()

    @bentoml.api
    def explain(self, image: np.ndarray) -> dict:
        """Grad-CAM overlay (PNG data URI) of one S x S x 3 uint8 image."""
        return self.models.explain(image)


health_app = FastAPI(title="dfdetect health")


@bentoml.service(workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(health_app, path="/")
class Detector:
    scorer = bentoml.depends(Scorer)

    def __init__(self):
        self._info, self._info_at = {}, 0.0
        self._rng = np.random.default_rng()
        self.faces = FaceCropper(PARAMS.prepare.faces) if SERVING.face_crop else None

        @health_app.get("/health")
        async def health():
            info = await self._current_info(max_age=0)
            return {"status": "ok" if info.get("ready") else "loading", **info}

    async def __is_ready__(self) -> bool:
        """/readyz (the Kubernetes readiness probe) answers 503 until a model is loaded."""
        try:
            return bool((await self._current_info(max_age=0)).get("ready"))
        except Exception:
            return False

    async def _scorer(self, method: str, *args):
        """Call the Scorer; retry a dropped keep-alive connection (the call is idempotent) instead of a 500."""
        for attempt in range(3):
            try:
                return await getattr(self.scorer.to_async, method)(*args)
            except aiohttp.ClientConnectionError as exc:
                if attempt == 2:
                    raise
                log.warning("call to Scorer.%s dropped (%s); retrying", method, exc)

    async def _current_info(self, max_age: float = 1.0) -> dict:
        if time.monotonic() - self._info_at > max_age:
            self._info, self._info_at = await self._scorer("info"), time.monotonic()
        return self._info

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

    async def _ready_info(self) -> dict:
        info = await self._current_info()
        if not info.get("ready"):
            raise bentoml.exceptions.ServiceUnavailable("model not loaded yet")
        return info

    async def _score(self, arrays: list[np.ndarray]) -> list[Scored]:
        """One request's images, all answered by one version (drawn per request in A/B mode)."""
        arm = pick_arm(SERVING, bool(self._info.get("challenger")), self._rng)
        method = "score_challenger" if arm == "challenger" else "score"
        return [Scored(**row) for row in await self._scorer(method, np.stack(arrays))]

    @bentoml.api(route="/inference/analyze-frame")
    async def analyze_frame(self, image: Path, frameNumber: int = 0, explain: bool = False) -> dict:
        """One image (multipart field `image`) -> the original service's verdict JSON; `explain=true` adds a
        Grad-CAM overlay (`heatmap`, a PNG data URI) of what made the model say fake."""
        started = time.perf_counter()
        img = self._read_image(image)
        size = int((await self._ready_info())["image_size"])
        face = None
        if self.faces:
            found = await anyio.to_thread.run_sync(self.faces, np.asarray(img))
            if found is None:
                raise NoFace("image: no face found (serving.face_crop is on: the model scores face crops)")
            img, face = Image.fromarray(found[0]), found[1]
        array = resize_square(img, size)
        scored = (await self._score([array]))[0]
        PREDICTIONS.labels(scored.version, "fake" if scored.is_fake else "real").inc()
        body = frame_response(frameNumber, scored, started)
        if face:
            body["face"] = face_json(face)
        if explain:
            body.update(await self._scorer("explain", array))
        return body

    @bentoml.api(route="/inference/analyze-video")
    async def analyze_video(self, video: Path) -> dict:
        """A video (multipart field `video`): per-frame scores of uniformly sampled frames and their mean."""
        started = time.perf_counter()
        self._check_size(video, "video", SERVING.max_video_mb, "serving.max_video_mb")
        try:
            clip = read_frames(video, SERVING.video_frames, "video")
        except VideoError as exc:
            raise InvalidArgument(str(exc)) from None
        size = int((await self._ready_info())["image_size"])
        frames, indices, without_face = clip.frames, clip.indices, None
        if self.faces:
            crops = [await anyio.to_thread.run_sync(self.faces, f) for f in clip.frames]
            without_face = [i for i, c in zip(clip.indices, crops) if c is None]
            frames = [c[0] for c in crops if c is not None]
            indices = [i for i, c in zip(clip.indices, crops) if c is not None]
            if not frames:
                raise NoFace(f"video: no face in any of the {len(clip.frames)} sampled frames (serving.face_crop is on)")
        scored = await self._score([resize_square(Image.fromarray(f), size) for f in frames])
        body = video_response(clip, scored, started, indices, without_face)
        PREDICTIONS.labels(body["modelVersion"], "fake" if body["is_fake"] else "real").inc()
        return body
