"""The dfdetect BentoML service: `bentoml serve serving.service:Detector`.

One service answers HTTP (the original service's endpoints) and holds the models, which follow the
registry's aliases. Every image goes through one in-process adaptive batcher (dfdetect.batching), so
concurrent requests are scored together; `/score` is the same batched prediction for arrays. Settings come
from params.yaml (`DFDETECT_PARAMS`), the tracking server from `MLFLOW_TRACKING_URI`.
"""

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable
from http import HTTPStatus
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, Query, Request
from PIL import Image
from prometheus_client import Counter, Histogram
from pydantic import Field
from starlette.responses import JSONResponse

from dfdetect import allocator
from dfdetect.batching import BatcherDead, Demand, MicroBatcher, Overloaded
from dfdetect.config import load_params
from dfdetect.drift import brightness, jpeg_quality
from dfdetect.faces import FaceCropper
from dfdetect.http_guard import PARTS_KEY, Answer, Part, Refused, RequestGuard, Route, check_multipart
from dfdetect.http_timeouts import install_header_timeout
from dfdetect.model_set import ModelSet, RegistryLoader, Scored, pick_arm
from dfdetect.prediction_log import PredictionLog, now_iso, open_store, write_feedback
from dfdetect.preprocessing import ImageError, check_dimensions, decode_image, resize_square
from dfdetect.provenance import check_content_credentials, guess_mime_type
from dfdetect.request_ids import RequestIds
from dfdetect.request_ids import current as current_request_id
from dfdetect.responses import face_json, frame_response, video_response
from dfdetect.video import VideoError, read_frames, sniff_container

log = logging.getLogger("dfdetect.serving")
PARAMS = load_params(os.environ.get("DFDETECT_PARAMS", "params.yaml"))
SERVING = PARAMS.serving
MB = 1024 * 1024
FRAME_ROUTE = "/inference/analyze-frame"  # the original API: one image in a multipart form (field `image`)
RAW_FRAME_ROUTE = "/inference/analyze-frame/raw"  # the image is the request body: no multipart, no temporary file
BATCH_ROUTE = "/inference/analyze-frames"  # several images in one multipart request (the field `images`, repeated)
DIRECT_ROUTES = {}  # POST path -> the handler the guard calls itself (filled by the service instance)
DEMAND = Demand()  # image requests held from body to answer: how long the batcher may hold a part-full batch
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "application/octet-stream")
MAX_FRAME_NUMBER = 2**31 - 1
TRUE_WORDS, FALSE_WORDS = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})  # FastAPI's
_FORM_SLACK = 64 * 1024  # multipart headers and small fields around the file
BATCH_FORM = Route(
    "multipart",
    int(SERVING.max_batch_mb * MB) + _FORM_SLACK,
    "images",
    frozenset({"frameNumber"}),
    max_files=SERVING.max_batch_images,
    keep_parts=True,
)
IMAGE_LIMITS = {
    "max_pixels": int(SERVING.max_image_megapixels * 1e6),
    "max_side": SERVING.max_image_side,
    "max_aspect_ratio": SERVING.max_aspect_ratio,
}  # per image, on every endpoint
# The batch endpoint's form in the OpenAPI schema (a plain route: FastAPI cannot see it from the signature).
BATCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": SERVING.max_batch_images,
                        },
                        "frameNumber": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": MAX_FRAME_NUMBER,
                            "description": "the first image's frame number; image i answers frameNumber + i",
                        },
                    },
                }
            }
        },
    }
}
install_header_timeout(SERVING.header_timeout_s)  # before BentoML's worker builds its uvicorn server
allocator.limit_arenas(2)  # before the request threads start: memory stays flat (benchmarks/soak.py)
TRIM_EVERY_S = 30
FEEDBACK_ROUTE = "/feedback"
FEEDBACK_TOKEN_ENV = "DFDETECT_FEEDBACK_TOKEN"  # the bearer token reviewers send; unset: /feedback is off
EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/tiff": ".tif",
}


@dataclasses.dataclass
class Decoded:
    """One upload, ready to score: the model's input, and what the answer and the log say about the file."""

    array: np.ndarray
    face: object | None
    credentials: dict | None  # C2PA, with serving.content_credentials
    sha256: str
    size: int
    ext: str  # for the kept copy (serving.log_inputs)
    data: bytes | None = None  # the upload itself, kept only with serving.log_inputs
    stats: dict = dataclasses.field(default_factory=dict)  # width, height, brightness, jpeg_quality: for drift


class ApiError(Exception):
    """An answer other than 200, with its status and a message for the client (never a server path).

    Returned as JSON by `answers_errors`: BentoML would replace the text of any 5xx with "unexpected error",
    and a client that is told "overloaded" (with Retry-After) can back off instead of retrying at once."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None, index: int | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"Retry-After": str(retry_after_s)} if retry_after_s else {}
        self.extra = {} if index is None else {"index": index}  # which image of a batch request


async def answered(call: Awaitable) -> Answer:
    """The awaited answer, or ApiError (and the batcher's overload and death) as a JSON error with its status."""
    try:
        return Answer(HTTPStatus.OK, await call)
    except Overloaded as exc:
        error = ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"overloaded: {exc}", retry_after_s=1)
    except BatcherDead as exc:
        error = ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {exc}", retry_after_s=5)
    except ApiError as exc:
        error = exc
    return Answer(error.status, {"error": error.message, **error.extra}, error.headers)


def answers_errors(api):
    """An API function whose ApiError (and the batcher's overload and death) become a JSON answer."""

    @functools.wraps(api)
    async def wrapper(*args, **kwargs):
        answer = await answered(api(*args, **kwargs))
        if answer.status == HTTPStatus.OK:
            return answer.body
        return JSONResponse(answer.body, answer.status, headers=answer.headers)

    return wrapper


def check_size(size: int, field: str, limit_mb: float, param: str, index: int | None = None) -> None:
    """413 naming the field (and a batch image's index) when an upload is over its limit."""
    limit = int(limit_mb * MB)
    if size > limit:
        raise ApiError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{field}: {size} bytes is over the limit of {limit} bytes ({param})",
            index=index,
        )


def direct(endpoint: str, analyze):
    """The guard's handler for an image route: `analyze(scope, payload, started)` gives the JSON body; its
    errors become JSON answers (answered), and latency and status go to DIRECT_SECONDS."""

    async def handler(scope: dict, payload) -> Answer:
        started = time.perf_counter()
        with DEMAND:
            answer = await answered(analyze(scope, payload, started))
        DIRECT_SECONDS.labels(endpoint, str(int(answer.status))).observe(time.perf_counter() - started)
        return answer

    return handler


def frame_fields(fields) -> tuple[int, bool]:
    """frameNumber and explain from (name, text) pairs (a direct route's query string or form fields), 400
    naming the field when one is not what is expected; other names are ignored, as FastAPI ignores them."""
    frame, explain = 0, False
    for name, value in fields:
        if name == "frameNumber":
            if not re.fullmatch(r"\d{1,10}", value) or int(value) > MAX_FRAME_NUMBER:
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    f"frameNumber: expected an integer from 0 to {MAX_FRAME_NUMBER}; got {value[:20]!r}",
                )
            frame = int(value)
        elif name == "explain":
            if value.lower() not in TRUE_WORDS | FALSE_WORDS:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"explain: expected true or false; got {value[:20]!r}")
            explain = value.lower() in TRUE_WORDS
    return frame, explain


def frame_query(query_string: bytes) -> tuple[int, bool]:
    """frameNumber and explain of the raw route's query string."""
    return frame_fields(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))


# Request counts and latency: BentoML's own (bentoml_service_request_*) for its APIs, DIRECT_SECONDS for the image routes.
PREDICTIONS = Counter("dfdetect_predictions", "Verdicts served, by model version and label", ["version", "label"])
# The review band's share of traffic: rate(dfdetect_verdicts_total{verdict="review"}[5m])
# / rate(dfdetect_verdicts_total[5m]) (a ratio of counters stays right across worker processes).
VERDICTS = Counter("dfdetect_verdicts", "Verdicts served: fake, real or review (serving.review_band)", ["verdict"])
LOG_DROPPED = Counter(
    "dfdetect_prediction_log_dropped", "Verdicts not logged because the log's queue was full (never a slow request)"
)
BATCH_SIZE = Histogram(
    "dfdetect_batch_size", "Images per model call (adaptive batching)", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)

REFUSED = Counter("dfdetect_refused_requests", "Requests the guard refused before any handler, by status", ["status"])
DIRECT_SECONDS = Histogram(
    "dfdetect_direct_request_duration_seconds",
    "Latency of the image routes the request guard answers itself (multipart, raw body, batch), by endpoint and status",
    ["endpoint", "http_response_code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

health_app = FastAPI(title="dfdetect health")


# The direct routes (answered by the guard) are left out of BentoML's access log, request metrics and tracing,
# which together cost about as much CPU as the rest of the request: their verdicts are in the prediction log,
# their counts and latency in dfdetect_direct_request_duration_seconds.
DIRECT_PATHS = [FRAME_ROUTE, RAW_FRAME_ROUTE, BATCH_ROUTE]


@bentoml.service(
    workers=SERVING.workers,  # one batcher per worker process
    traffic={"timeout": 60},
    logging={"access": {"skip_paths": ["/metrics", "/healthz", "/livez", "/readyz", *DIRECT_PATHS]}},
    tracing={"excluded_urls": DIRECT_PATHS},
)
@bentoml.asgi_app(health_app, path="/")
class Detector:
    def __init__(self):
        self.models = ModelSet(PARAMS, RegistryLoader(PARAMS))  # contacts nothing yet
        try:
            self.models.refresh()
        except Exception as exc:  # nothing promoted yet, or the registry is down: not ready, keep polling
            log.warning("no model loaded yet (%s); retrying every %ss", exc, SERVING.poll_interval_s)
        self._stop = threading.Event()
        threading.Thread(target=self.models.watch, args=(self._stop,), daemon=True, name="registry-poll").start()
        threading.Thread(target=self._trim_memory, daemon=True, name="malloc-trim").start()
        self.batcher = MicroBatcher(
            self.models.score,
            SERVING.max_batch_size,
            SERVING.max_latency_ms,
            on_batch=BATCH_SIZE.observe,
            batch_wait_ms=SERVING.batch_wait_ms,
            demand=DEMAND,
        )
        # decoding and resizing happen here, never on the event loop (Pillow releases the GIL while decoding)
        self._decoders = anyio.CapacityLimiter(SERVING.decode_threads)
        self._rng = np.random.default_rng()
        self.faces = (
            FaceCropper(PARAMS.prepare.faces, lambda: self.models.info().get("face_margin"))
            if SERVING.face_crop
            else None
        )
        self.log_store = open_store(SERVING.prediction_log) if SERVING.prediction_log else None
        self.audit = (
            PredictionLog(
                self.log_store,
                SERVING.prediction_log_queue,
                SERVING.prediction_log_flush_lines,
                SERVING.prediction_log_flush_s,
                on_drop=LOG_DROPPED.inc,
            )
            if self.log_store
            else None
        )

        @health_app.get("/health")
        async def health():
            info = self.models.info()
            return {"status": "ok" if info.get("ready") else "loading", **info}

        # A plain ASGI route, not a BentoML API: the body arrives already read and size-checked by the guard,
        # and nothing parses it before the decoding thread (BentoML's root file inputs write a temporary file,
        # and fetch the body as a URL when it looks like one).
        @health_app.post(RAW_FRAME_ROUTE, summary="One image as the request body (Content-Type image/*)")
        @answers_errors
        async def analyze_frame_raw(
            request: Request, frameNumber: int = Query(0, ge=0, le=2**31 - 1), explain: bool = False
        ):
            """The same verdict JSON as /inference/analyze-frame, for an image POSTed as the body."""
            return await self._analyze_frame(
                await request.body(), frameNumber, explain, time.perf_counter(), RAW_FRAME_ROUTE
            )

        # Also a plain route: the guard has parsed the form already (scope[PARTS_KEY]), and BentoML would write
        # each image to a temporary file.
        @health_app.post(
            BATCH_ROUTE,
            summary="Several images in one request (multipart, the field `images` repeated)",
            openapi_extra=BATCH_OPENAPI,
        )
        @answers_errors
        async def analyze_frames(request: Request):
            """A list with, per image in the order sent, the /inference/analyze-frame JSON and its `index`."""
            started = time.perf_counter()
            parts = request.scope.get(PARTS_KEY)
            if parts is None:  # not behind the guard (it parses and checks the form first in the service)
                try:
                    parts = check_multipart(
                        BATCH_FORM, request.headers.get("content-type"), await request.body(), keep=True
                    )
                except Refused as exc:
                    raise ApiError(exc.status, exc.message) from None
            images, first_frame = batch_fields(parts)
            return await self._analyze_frames(images, first_frame, started)

        # Behind the guard (always, in this service) the image routes are answered by the guard itself from the
        # checked body or form, without BentoML's routing, temporary files and FastAPI's dependency solving; the
        # API declarations (analyze_frame below, the FastAPI routes above) document them in OpenAPI and answer
        # where the app runs without the guard.
        DIRECT_ROUTES[FRAME_ROUTE] = direct(FRAME_ROUTE, self._direct_form_frame)
        DIRECT_ROUTES[RAW_FRAME_ROUTE] = direct(RAW_FRAME_ROUTE, self._direct_frame)
        DIRECT_ROUTES[BATCH_ROUTE] = direct(BATCH_ROUTE, self._direct_frames)

        @health_app.post(FEEDBACK_ROUTE, summary="A reviewer's label for a logged verdict (bearer token)")
        @answers_errors
        async def feedback(request: Request):
            """{"request_id": the answer's requestId, "label": "real" | "fake", "note"?, "reviewer"?}, with
            `Authorization: Bearer <DFDETECT_FEEDBACK_TOKEN>`; stored beside the prediction log."""
            check_feedback_token(request.headers.get("authorization"))
            if self.log_store is None:
                raise ApiError(
                    HTTPStatus.CONFLICT, "no prediction log to store feedback beside (serving.prediction_log)"
                )
            review = feedback_fields(await request.body())
            return await anyio.to_thread.run_sync(lambda: write_feedback(self.log_store, **review))

    async def _direct_frame(self, scope: dict, body: bytes, started: float) -> dict:
        """/inference/analyze-frame/raw, answered by the guard."""
        frame, explain = frame_query(scope.get("query_string", b""))
        return await self._analyze_frame(body, frame, explain, started, RAW_FRAME_ROUTE)

    async def _direct_form_frame(self, scope: dict, parts: list[Part], started: float) -> dict:
        """/inference/analyze-frame (multipart), answered by the guard from the form it parsed: no temporary
        file, no second parse."""
        image = next(p.data for p in parts if p.name == "image")  # the guard made sure it is there
        check_size(len(image), "image", SERVING.max_upload_mb, "serving.max_upload_mb")
        frame, explain = frame_fields((p.name, p.data.decode("utf-8", "replace")) for p in parts if p.name != "image")
        return await self._analyze_frame(image, frame, explain, started)

    async def _direct_frames(self, scope: dict, parts: list[Part], started: float) -> list[dict]:
        """/inference/analyze-frames, answered by the guard from the form it parsed."""
        images, first_frame = batch_fields(parts)
        return await self._analyze_frames(images, first_frame, started)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()  # the registry poll
        self.batcher.close()
        if self.audit:
            self.audit.close()  # writes what is still queued

    def _log(self, body: dict, endpoint: str, decoded: Decoded) -> None:
        """The answer, for the audit trail (off the request path: a full queue drops and counts)."""
        if self.audit is None:
            return
        entry = {
            "request_id": body["requestId"],
            "time": now_iso(),
            "endpoint": endpoint,
            "model_version": body["modelVersion"],
            "fake_probability": body.get("fake_probability", body.get("distribution", {}).get("fake")),
            "threshold": body["threshold"],
            "verdict": body["verdict"],
            "latency_ms": body["processingTime"],
            "sha256": decoded.sha256,
            "size": decoded.size,
            "face": body.get("face"),
            "shadow": body.get("shadow"),
            **decoded.stats,
        }
        keep = (decoded.data, decoded.ext) if decoded.data is not None else None
        self.audit.record(entry, keep)

    def _trim_memory(self) -> None:
        """Give freed heap memory back to the OS now and then (dfdetect.allocator says why)."""
        while not self._stop.wait(TRIM_EVERY_S):
            allocator.trim()

    def __is_ready__(self) -> bool:
        """/readyz (the Kubernetes readiness probe) answers 503 until a model is loaded."""
        return self.models.ready

    def __is_alive__(self) -> bool:
        """/livez (the liveness probe) fails once the batcher has stopped: no image could be answered."""
        return self.batcher.alive

    @staticmethod
    def _check_size(upload: Path, field: str, limit_mb: float, param: str) -> None:
        check_size(upload.stat().st_size, field, limit_mb, param)

    def _image_size(self) -> int:
        info = self.models.info()
        if not info.get("ready"):
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable: no model loaded yet", retry_after_s=5)
        return int(info["image_size"])

    def _decode_and_crop(self, data: bytes, size: int, name: str = "image") -> Decoded:
        """Bytes -> the model's S x S x 3 input, the face box with serving.face_crop, the file's content
        credentials with serving.content_credentials (C2PA, checked offline) and its hash; in a thread."""
        img = decode_image(data, name, **IMAGE_LIMITS)
        logged = SERVING.prediction_log is not None  # the hash and statistics are for the log alone
        stats = {"width": img.width, "height": img.height, "jpeg_quality": header_jpeg_quality(data)} if logged else {}
        credentials = check_content_credentials(data, decodes=True) if SERVING.content_credentials else None
        face = None
        if self.faces:
            found = self.faces(np.asarray(img))
            if found is None:
                raise ApiError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"{name}: no face found (serving.face_crop is on: the model scores face crops)",
                )
            img, face = Image.fromarray(found[0]), found[1]
        decoded = Decoded(
            resize_square(img, size),
            face,
            credentials,
            hashlib.sha256(data).hexdigest() if logged else "",
            len(data),
            EXTENSIONS.get(guess_mime_type(data) or "", ".bin"),
            data if SERVING.log_inputs else None,
            stats,
        )
        if logged:
            decoded.stats["brightness"] = round(float(brightness(decoded.array[None])[0]), 6)
        return decoded

    async def _score(self, images: np.ndarray) -> list[Scored]:
        """One request's images, all answered by one version (drawn per request in A/B mode); more than
        serving.max_batch_size go to the batcher in parts of that size."""
        arm = pick_arm(SERVING, self.models.challenger is not None, self._rng)
        step = SERVING.max_batch_size
        if len(images) <= step:
            return await self.batcher.submit(images, arm)
        parts = await asyncio.gather(
            *(self.batcher.submit(images[k : k + step], arm) for k in range(0, len(images), step))
        )
        return [s for part in parts for s in part]

    async def _analyze_frames(self, images: list[bytes], first_frame: int, started: float) -> list[dict]:
        """A batch request's images -> one verdict JSON each, as _analyze_frame answers it, with its index.

        Every image gets the single-image checks, named by its index; the sum of their pixels is bounded from
        the headers before anything is decoded; each decode goes through the same bounded thread pool as
        single images (so at most serving.decode_threads full-size images are in memory at once), and is
        resized at once; then the whole batch is scored together."""
        size = self._image_size()
        for i, data in enumerate(images):
            check_size(len(data), f"images[{i}]", SERVING.max_upload_mb, "serving.max_upload_mb", index=i)
        await anyio.to_thread.run_sync(check_batch_headers, images, limiter=self._decoders)
        decoded = await asyncio.gather(
            *(
                anyio.to_thread.run_sync(self._decode_and_crop, data, size, f"images[{i}]", limiter=self._decoders)
                for i, data in enumerate(images)
            ),
            return_exceptions=True,
        )
        for i, result in enumerate(decoded):  # the first bad image, by index
            if isinstance(result, ImageError):
                raise ApiError(HTTPStatus.BAD_REQUEST, str(result), index=i)
            if isinstance(result, ApiError):
                raise ApiError(result.status, result.message, index=i)
            if isinstance(result, BaseException):
                raise result
        scored = await self._score(np.stack([d.array for d in decoded]))
        request_id, answers = current_request_id(), []
        for i, (s, d) in enumerate(zip(scored, decoded)):
            body = {"index": i, **frame_response(first_frame + i, s, started, SERVING.review_band)}
            body["requestId"] = f"{request_id}-{i}"  # one per image: feedback names the image it reviews
            count_verdict(body)
            if d.face:
                body["face"] = face_json(d.face)
            if d.credentials is not None:
                body["provenance"] = d.credentials
            self._log(body, BATCH_ROUTE, d)
            answers.append(body)
        return answers

    @bentoml.api
    @answers_errors
    async def score(self, images: list) -> list[dict]:
        """N x S x S x 3 integers 0-255 (uint8 pixels) -> per image: fake_probability, threshold, version (the
        batched prediction the HTTP endpoints use; S is the model's image_size, see /health)."""
        size = self._image_size()  # 503 until a model is loaded
        array = await anyio.to_thread.run_sync(pixels_from_json, images, size, limiter=self._decoders)
        return [dataclasses.asdict(s) for s in await self._score(array)]

    @bentoml.api(route=FRAME_ROUTE)
    @answers_errors
    async def analyze_frame(
        self, image: Path, frameNumber: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0, explain: bool = False
    ) -> dict:
        """One image (multipart field `image`) -> the original service's verdict JSON; `explain=true` adds a
        Grad-CAM overlay (`heatmap`, a PNG data URI) of what made the model say fake."""
        started = time.perf_counter()
        self._check_size(image, "image", SERVING.max_upload_mb, "serving.max_upload_mb")
        return await self._analyze_frame(image.read_bytes(), frameNumber, explain, started)

    async def _analyze_frame(
        self, data: bytes, frame_number: int, explain: bool, started: float, endpoint: str = FRAME_ROUTE
    ) -> dict:
        """Image bytes -> the verdict JSON (both frame endpoints): decoded in a thread, scored in a shared batch."""
        size = self._image_size()
        try:
            decoded = await anyio.to_thread.run_sync(self._decode_and_crop, data, size, limiter=self._decoders)
        except ImageError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        scored = (await self._score(decoded.array[None]))[0]
        body = frame_response(frame_number, scored, started, SERVING.review_band)
        body["requestId"] = current_request_id()
        count_verdict(body)
        if decoded.face:
            body["face"] = face_json(decoded.face)
        if decoded.credentials is not None:  # what the file declares, beside the model's P(fake), not instead
            body["provenance"] = decoded.credentials
        self._log(body, endpoint, decoded)
        if explain:
            body.update(await anyio.to_thread.run_sync(self.models.explain, decoded.array))
        return body

    @bentoml.api(route="/inference/analyze-video")
    @answers_errors
    async def analyze_video(self, video: Path) -> dict:
        """A video (multipart field `video`; MP4/MOV, Matroska/WebM or AVI, recognised from its content):
        per-frame scores of uniformly sampled frames and their mean."""
        started = time.perf_counter()
        self._check_size(video, "video", SERVING.max_video_mb, "serving.max_video_mb")
        size = self._image_size()
        try:
            clip = await anyio.to_thread.run_sync(
                functools.partial(
                    read_frames,
                    video,
                    SERVING.video_frames,
                    "video",
                    max_pixels=int(SERVING.max_video_megapixels * 1e6),
                    time_limit_s=SERVING.video_time_limit_s,
                ),
                limiter=self._decoders,
            )
        except VideoError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        frames, indices, without_face = clip.frames, clip.indices, None
        if self.faces:
            crops = [await anyio.to_thread.run_sync(self.faces, f, limiter=self._decoders) for f in clip.frames]
            without_face = [i for i, c in zip(clip.indices, crops) if c is None]
            frames = [c[0] for c in crops if c is not None]
            indices = [i for i, c in zip(clip.indices, crops) if c is not None]
            if not frames:
                raise ApiError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    f"video: no face in any of the {len(clip.frames)} sampled frames (serving.face_crop is on)",
                )
        resized = await anyio.to_thread.run_sync(
            lambda: np.stack([resize_square(Image.fromarray(f), size) for f in frames]), limiter=self._decoders
        )
        scored = await self._score(resized)
        body = video_response(clip, scored, started, indices, without_face, SERVING.review_band)
        body["requestId"] = current_request_id()
        count_verdict(body)
        file = await anyio.to_thread.run_sync(video_file, video, resized, limiter=self._decoders)
        if file.credentials is not None:
            body["provenance"] = file.credentials
        self._log(body, "/inference/analyze-video", file)
        return body


def header_jpeg_quality(data: bytes) -> int | None:
    """The upload's JPEG quality from its header alone (None for other formats)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return jpeg_quality(img)
    except Exception:  # it decoded once already: a header that fails here only loses the statistic
        return None


VIDEO_SUFFIXES = {"mov": ".mp4", "matroska": ".mkv", "avi": ".avi"}  # a kept video's name, per sniffed family


def video_file(path: Path, frames: np.ndarray) -> Decoded:
    """What the answer and the log say about an uploaded video file (its hash, C2PA credentials); in a thread."""
    data = path.read_bytes()
    return Decoded(
        frames,
        None,
        check_content_credentials(data) if SERVING.content_credentials else None,
        hashlib.sha256(data).hexdigest(),
        len(data),
        VIDEO_SUFFIXES.get(sniff_container(data[:12]), ".bin"),  # from the content, not the client's file name
        data if SERVING.log_inputs else None,
    )


def check_feedback_token(header: str | None) -> None:
    """404 when no token is configured (the endpoint is off), 401 without a bearer token, 403 with a wrong one."""
    expected = os.environ.get(FEEDBACK_TOKEN_ENV, "")
    if not expected:
        raise ApiError(HTTPStatus.NOT_FOUND, f"feedback is off: no token configured ({FEEDBACK_TOKEN_ENV})")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(HTTPStatus.UNAUTHORIZED, "feedback needs `Authorization: Bearer <token>`")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(HTTPStatus.FORBIDDEN, "feedback: wrong token")


REQUEST_ID_PATTERN = re.compile(r"[0-9a-f]{32}(-[0-9]{1,4})?")  # not \d: it takes any Unicode digit


def feedback_fields(body: bytes) -> dict:
    """The review JSON, or a 400 naming the field and what was expected."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ApiError(HTTPStatus.BAD_REQUEST, "body: expected a JSON object") from None
    if not isinstance(raw, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "body: expected a JSON object")
    request_id, label = raw.get("request_id"), raw.get("label")
    if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "request_id: expected the requestId of an answer (32 hex digits[-index])"
        )
    if label not in ("real", "fake"):
        raise ApiError(HTTPStatus.BAD_REQUEST, 'label: expected "real" or "fake"')
    fields = {"request_id": request_id, "label": label}
    for name, limit in (("note", 2000), ("reviewer", 200)):
        value = raw.get(name, "")
        if not isinstance(value, str) or len(value) > limit:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: expected text of at most {limit} characters")
        fields[name] = value
    unknown = sorted(set(raw) - {"request_id", "label", "note", "reviewer"})
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown fields {unknown}: expected request_id, label, note, reviewer")
    return fields


def count_verdict(body: dict) -> None:
    PREDICTIONS.labels(body["modelVersion"], "fake" if body["is_fake"] else "real").inc()
    VERDICTS.labels(body["verdict"]).inc()


def batch_fields(parts: list[Part]) -> tuple[list[bytes], int]:
    """The checked form of a batch request -> its images and the first frame number (400 if not 0-2^31-1)."""
    images = [p.data for p in parts if p.name == "images"]
    first = next((p.data for p in parts if p.name == "frameNumber"), b"0")
    highest = MAX_FRAME_NUMBER - len(images) + 1
    if not re.fullmatch(rb"\d{1,10}", first) or int(first) > highest:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"frameNumber: expected the first image's frame number, an integer "
            f"from 0 to {highest} (image i answers frameNumber + i)",
        )
    return images, int(first)


def check_batch_headers(images: list[bytes]) -> None:
    """Refuse (400) a batch whose images would together decode to more than serving.max_batch_megapixels,
    from the headers alone; an image over a single-image limit is named by its index here too."""
    total = 0
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
        except Exception:  # unreadable, or a bomb: decoding it says which, with its index
            continue
        try:
            check_dimensions(w, h, f"images[{i}]", **IMAGE_LIMITS)
        except ImageError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), index=i) from None
        total += w * h
    if total > SERVING.max_batch_megapixels * 1e6:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"images: {total / 1e6:.1f} megapixels in all is over the limit of "
            f"{SERVING.max_batch_megapixels:g} per request (serving.max_batch_megapixels)",
        )


def pixels_from_json(images, size: int) -> np.ndarray:
    """/score's JSON -> N x S x S x 3 uint8, refusing (400) anything else with what was expected."""
    expected = f"images: expected N x S x S x 3 integers 0-255 (S = {size}, the model's image_size; N 1-{SERVING.max_batch_size})"
    try:
        array = np.asarray(images)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, numbers beyond any integer type
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{expected}; got nested lists of unequal lengths") from None
    if array.dtype.kind not in "iu":
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"{expected}; got values of type {array.dtype.name} (null, text or decimals)"
        )
    if array.ndim != 4 or array.shape[1:] != (size, size, 3) or not 1 <= len(array) <= SERVING.max_batch_size:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{expected}; got shape {array.shape}")
    if array.min() < 0 or array.max() > 255:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{expected}; got values from {array.min()} to {array.max()}")
    return array.astype(np.uint8)


Detector.add_asgi_middleware(RequestIds)  # outermost of ours: every answer, a refusal too, carries its id
# Every body is checked before BentoML parses it: a 4xx JSON error says what was wrong (dfdetect.http_guard).
Detector.add_asgi_middleware(
    RequestGuard,
    body_timeout_s=SERVING.body_timeout_s,
    upload_timeout_s=SERVING.upload_timeout_s,
    max_uploads=SERVING.max_uploads_in_progress,
    direct=DIRECT_ROUTES,
    on_refused=lambda status: REFUSED.labels(str(status)).inc(),
    routes={
        FRAME_ROUTE: Route(
            "multipart",
            int(SERVING.max_upload_mb * MB) + _FORM_SLACK,
            "image",
            frozenset({"frameNumber", "explain"}),
            keep_parts=True,
        ),
        "/inference/analyze-video": Route("multipart", int(SERVING.max_video_mb * MB) + _FORM_SLACK, "video"),
        RAW_FRAME_ROUTE: Route("raw", int(SERVING.max_upload_mb * MB), content_types=IMAGE_TYPES),
        BATCH_ROUTE: BATCH_FORM,
        "/score": Route("json", int(SERVING.max_score_mb * MB), content_types=("application/json",)),
        FEEDBACK_ROUTE: Route("json", 16 * 1024, content_types=("application/json",)),
    },
)
