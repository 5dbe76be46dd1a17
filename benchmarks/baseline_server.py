"""The original design, for comparison only: one image per request, no batching, eager fp32 PyTorch.

python benchmarks/baseline_server.py --checkpoint models/best.pt --port 8000
"""

import argparse
import time

import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile

from dfdetect.inference import Predictor
from dfdetect.preprocessing import decode_image


def build(checkpoint: str) -> FastAPI:
    torch.set_num_threads(torch.get_num_threads())
    predictor = Predictor.from_checkpoint(checkpoint)  # eager fp32 on the CPU
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ready": True}

    @app.post("/inference/analyze-frame")
    def analyze_frame(image: UploadFile = File(...), frameNumber: int = Form(0)):
        started = time.perf_counter()
        p = float(predictor.score([decode_image(image.file.read())])[0])
        return {
            "frameNumber": frameNumber,
            "distribution": {"real": 1 - p, "fake": p},
            "processingTime": (time.perf_counter() - started) * 1000,
        }

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="dfdetect checkpoint")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    uvicorn.run(build(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")
