"""A peer for benchmarks/serving.py: BentoML's own adaptive batching instead of dfdetect's batcher.

The same model (the registry alias, through dfdetect.model_set.ModelSet), the same runtime (serving.runtime)
and the same preprocessing as serving/service.py, written the way BentoML's documentation writes batching:
one `@bentoml.api(batchable=True)` endpoint whose argument is the batch. A request sends one image in the
multipart field `image` (the body serving/service.py's /inference/analyze-frame takes); BentoML's
dispatcher gathers concurrent requests (up to serving.max_batch_size images, waiting at most
serving.max_latency_ms, 503 when overloaded) and calls the method once with all their files, which decodes
and scores them together in BentoML's one worker thread. Each request is answered with a list of one verdict.

    DFDETECT_PARAMS=params.yaml MLFLOW_TRACKING_URI=... \\
        bentoml serve bentoml_batchable_service:BatchableDetector --working-dir benchmarks --port 3001
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import bentoml
import numpy as np

from dfdetect.config import load_params
from dfdetect.model_set import ModelSet, RegistryLoader
from dfdetect.preprocessing import decode_image, resize_square
from dfdetect.responses import frame_response

PARAMS = load_params(os.environ.get("DFDETECT_PARAMS", "params.yaml"))
SERVING = PARAMS.serving


@bentoml.service(workers=1, traffic={"timeout": 60})
class BatchableDetector:
    def __init__(self):
        self.models = ModelSet(PARAMS, RegistryLoader(PARAMS))
        self.models.refresh()  # the model must be registered already: this peer does not wait for one
        self.size = self.models.primary.preprocess.image_size

    @bentoml.api(
        route="/inference/analyze-frame",
        batchable=True,
        batch_dim=0,
        max_batch_size=SERVING.max_batch_size,
        max_latency_ms=SERVING.max_latency_ms,
    )
    def analyze_frame(self, image: list[Path]) -> list[dict]:
        """The files of every request in this batch -> one verdict each, in the same order."""
        started = time.perf_counter()
        batch = np.stack([resize_square(decode_image(p.read_bytes()), self.size) for p in image])
        return [frame_response(0, s, started) for s in self.models.score(batch, "primary")]
