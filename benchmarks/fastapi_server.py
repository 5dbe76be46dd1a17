"""A peer for benchmarks/serving.py: the server a team would write by hand with FastAPI and uvicorn.

The same model (the registry alias, through dfdetect.model_set.ModelSet), the same runtime (serving.runtime),
the same preprocessing and the same adaptive batcher (dfdetect.batching) as serving/service.py, behind a
plain FastAPI endpoint: UploadFile for the multipart form, decoding in a bounded thread pool. None of
BentoML, and none of the service's request guard, limits, metrics or hot swaps: only what measures the
HTTP framework's own cost.

    DFDETECT_PARAMS=params.yaml MLFLOW_TRACKING_URI=... python benchmarks/fastapi_server.py --port 8001
"""

from __future__ import annotations

import argparse
import os
import time

import anyio
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

from dfdetect.batching import Demand, MicroBatcher, Overloaded
from dfdetect.config import load_params
from dfdetect.model_set import ModelSet, RegistryLoader
from dfdetect.preprocessing import ImageError, decode_image, resize_square
from dfdetect.responses import frame_response


def build(params_file: str) -> FastAPI:
    params = load_params(params_file)
    serving = params.serving
    models = ModelSet(params, RegistryLoader(params))
    models.refresh()  # the model must be registered already: this server does not wait for one
    size = models.primary.preprocess.image_size
    demand = Demand()  # the same batcher as the service's, holding part-full batches the same way
    batcher = MicroBatcher(
        models.score, serving.max_batch_size, serving.max_latency_ms, batch_wait_ms=serving.batch_wait_ms, demand=demand
    )
    decoders = anyio.CapacityLimiter(serving.decode_threads)
    app = FastAPI()

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc):  # what a careful hand-written server does: 503, not a 500
        return JSONResponse({"error": f"overloaded: {exc}"}, 503, headers={"Retry-After": "1"})

    @app.exception_handler(ImageError)
    async def bad_image(request, exc):
        return JSONResponse({"error": str(exc)}, 400)

    @app.get("/health")
    def health():
        return {"ready": True, "version": models.primary.label}

    def prepare(data: bytes):
        return resize_square(decode_image(data), size)[None]

    @app.post("/inference/analyze-frame")
    async def analyze_frame(image: UploadFile = File(...), frameNumber: int = Form(0)):
        started = time.perf_counter()
        with demand:
            array = await anyio.to_thread.run_sync(prepare, await image.read(), limiter=decoders)
            scored = (await batcher.submit(array, "primary"))[0]
            return frame_response(frameNumber, scored, started)

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--params",
        default=os.environ.get("DFDETECT_PARAMS", "params.yaml"),
        help="params.yaml (serving.* and registry.*; default: $DFDETECT_PARAMS or params.yaml)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8001, help="port to listen on")
    args = ap.parse_args()
    uvicorn.run(build(args.params), host=args.host, port=args.port, log_level="warning")
