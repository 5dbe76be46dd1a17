"""The in-process limit for benchmarks/serving.py: decode, resize and the served runtime on batches of 32, no
HTTP. Run as a script it measures in a fresh process, so that `taskset -c N` pins it from its first thread
(ONNX Runtime and PyTorch size their thread pools when they start): the limit on the very core a pinned
server gets. Prints JSON: images_per_s, cpu_ms_per_image (the process's CPU time over the images scored),
and `by_batch`: the same CPU cost per image at smaller batches (--batches), since a server forms the batches
its load allows and the model costs more per image in a small one.

    DFDETECT_PARAMS=params.yaml MLFLOW_TRACKING_URI=... python benchmarks/in_process.py --images DIR [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

BATCH = 32


def limit(predict, image_size: int, jpegs: list[bytes], seconds: float, batch: int = BATCH) -> dict:
    """Images per second (and CPU ms per image) through decode, resize and `predict`, in batches of `batch`;
    at least one batch."""
    from dfdetect.preprocessing import decode_image, resize_square

    done, began, cpu0 = 0, time.perf_counter(), time.process_time()
    while done == 0 or time.perf_counter() - began < seconds:
        images = np.stack([resize_square(decode_image(b), image_size) for b in jpegs[done % len(jpegs) :][:batch]])
        predict(images)
        done += len(images)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return {"images_per_s": round(done / wall, 1), "cpu_ms_per_image": round(1000 * cpu / done, 3), "images": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of JPEGs to score (searched recursively)")
    ap.add_argument("--seconds", type=float, default=10, help="how long to measure, after one warm-up batch")
    ap.add_argument(
        "--params",
        type=Path,
        default=Path(os.environ.get("DFDETECT_PARAMS", "params.yaml")),
        help="params.yaml whose serving.alias, serving.runtime and registry are used (default: $DFDETECT_PARAMS)",
    )
    ap.add_argument(
        "--batches",
        default="",
        help="comma-separated smaller batch sizes to measure too (CPU ms per image each; --seconds / 2 each)",
    )
    args = ap.parse_args()

    from dfdetect.config import load_params
    from dfdetect.model_set import RegistryLoader, ServedModel

    params = load_params(args.params)
    jpegs = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))]
    if not jpegs:
        raise SystemExit(f"{args.images}: no .jpg files")
    model = ServedModel(RegistryLoader(params)(params.serving.alias), "cpu", params.serving.runtime)
    size = model.preprocess.image_size
    limit(model.predict, size, jpegs, 0)  # one warm-up batch: the first call pays for allocations
    result = limit(model.predict, size, jpegs, args.seconds)
    by_batch = {
        int(b): limit(model.predict, size, jpegs, args.seconds / 2, int(b))["cpu_ms_per_image"]
        for b in args.batches.split(",")
        if b.strip()
    }
    print(
        json.dumps(
            {
                **result,
                "by_batch": {**by_batch, BATCH: result["cpu_ms_per_image"]},
                "runtime": model.runtime_name,
                "cores": sorted(os.sched_getaffinity(0)),
            }
        )
    )


if __name__ == "__main__":
    main()
