"""Serving throughput and latency: the BentoML service against the in-process limit and the original design.

It trains and registers a model on generated sample data (a throw-away SQLite registry), then measures:
- the service (`bentoml serve`, adaptive batching, the chosen runtime) under 1, 8 and 32 concurrent clients
  posting JPEGs to /inference/analyze-frame for a fixed time: throughput and p50/p95/p99 latency;
- in-process inference with the same runtime on batches of 32 (decode, resize, score): the limit;
- a one-image-per-request server without batching running eager fp32 PyTorch (the original design);
- the runtime against eager fp32 PyTorch in-process: speed, and ROC-AUC on the test split.

    python benchmarks/serving.py [--runtime auto|torch|onnx|onnx-int8] [--seconds 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import yaml

from dfdetect.servers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def multipart(jpeg: bytes, boundary: str = "dfdetect-bench") -> bytes:
    """One analyze-frame request body, encoded once: the load generator should spend its CPU on sending."""
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()


def drive(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` concurrent connections posting JPEGs back to back for `seconds`, from one asyncio loop: the
    clients share the server's CPUs, so they must cost as little as possible (no per-request encoding)."""
    import asyncio

    import aiohttp

    bodies = [multipart(b) for b in images]
    headers = {"Content-Type": "multipart/form-data; boundary=dfdetect-bench"}
    latencies, errors = [], []

    async def client(session, k: int, deadline: float):
        i = k
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    ok, problem = r.status == 200, f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok, problem = False, type(exc).__name__
            if time.perf_counter() < deadline:  # count what completes inside the window only
                (latencies.append(time.perf_counter() - started) if ok else errors.append(problem))
            i += clients

    async def run():
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(client(session, k, deadline) for k in range(clients)))

    asyncio.run(run())
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "images_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def start(cmd: list[str], env: dict, health: str, log: Path, timeout: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            r = requests.get(health, timeout=2)
            if r.status_code == 200 and r.json().get("ready", True):
                return proc
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd[0]} not ready:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def in_process(predict, pre, images: list[bytes], seconds: float) -> float:
    """Images per second through decode, resize and the runtime, in batches of 32."""
    from dfdetect.preprocessing import decode_image, resize_square

    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        batch = np.stack([resize_square(decode_image(b), pre.image_size) for b in images[done % len(images):][:32]])
        predict(batch)
        done += len(batch)
    return done / (time.perf_counter() - began)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"],
                    help="serving.runtime to measure (auto: what the service picks on this machine)")
    ap.add_argument("--seconds", type=float, default=15, help="load per client count")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of the benchmark model")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json", help="JSON result file")
    args = ap.parse_args()

    from dfdetect import registry
    from dfdetect.config import load_params, parse_params
    from dfdetect.data import load_split
    from dfdetect.evaluate import evaluate
    from dfdetect.metrics import roc_auc
    from dfdetect.prepare import prepare
    from dfdetect.sample_data import generate
    from dfdetect.serving import ServedModel
    from dfdetect.train import train

    tmp = Path(tempfile.mkdtemp(prefix="dfdetect-bench-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["train"]["epochs"] = args.epochs
    raw["promotion"]["floors"] = {}
    raw["serving"].update(runtime=args.runtime, device="cpu")
    params = parse_params(raw)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    generate(tmp / "data", {"train": 300, "val": 100, "test": 100}, size=128, seed=42)
    prepare(tmp / "data", tmp / "prepared", params.prepare, workers=2)
    train(params, tmp / "prepared", tmp / "models", tmp / "history.csv")
    evaluate(params, tmp / "prepared", tmp / "models", tmp / "eval", tmp / "eval" / "metrics.json", tmp / "eval" / "plots")
    registry.register(params, tmp / "models", tmp / "eval" / "metrics.json", tmp / "prepared")
    registry.promote(params, tmp / "prepared")
    loaded = registry.load("champion", params=params)
    jpegs = [p.read_bytes() for p in sorted((tmp / "data" / "test").rglob("*.jpg"))]

    # In process: the runtime against eager fp32, on the test split.
    test = load_split(tmp / "prepared", "test")
    served = ServedModel(copy.deepcopy(loaded), "cpu", args.runtime)  # each owns its weights and memory format
    eager = ServedModel(copy.deepcopy(loaded), "cpu", "torch", precision="fp32")
    auc_runtime, auc_eager = roc_auc(test.labels, served.predict(test.images[:]), 0.5), roc_auc(test.labels, eager.predict(test.images[:]), 0.5)
    limit = in_process(served.predict, loaded.preprocess, jpegs, args.seconds)
    eager_speed = in_process(eager.predict, loaded.preprocess, jpegs, args.seconds)

    env = {**os.environ, "DFDETECT_PARAMS": str(tmp / "params.yaml"), "MLFLOW_TRACKING_URI": uri,
           "BENTOML_HOME": str(tmp / "bentoml"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    results = {"benchmark": "serving", "runtime": served.runtime_name, "seconds_per_level": args.seconds,
               "machine": f"{os.cpu_count()} CPUs", "model": loaded.name + "/" + loaded.version,
               "in_process_limit_images_per_s": round(limit, 1), "eager_fp32_in_process_images_per_s": round(eager_speed, 1),
               "roc_auc_runtime": round(auc_runtime, 4), "roc_auc_eager_fp32": round(auc_eager, 4)}
    port = free_port()
    proc = start([str(BIN / "bentoml"), "serve", "serving.service:Detector", "--host", "127.0.0.1", "--port", str(port)],
                 env, f"http://127.0.0.1:{port}/health", tmp / "bentoml.log")
    try:
        url = f"http://127.0.0.1:{port}/inference/analyze-frame"
        drive(url, jpegs, 4, 3)  # warm-up
        results["service"] = [drive(url, jpegs, c, args.seconds) for c in (1, 8, 32)]
    finally:
        stop(proc)
    port = free_port()
    proc = start([sys.executable, str(REPO / "benchmarks" / "baseline_server.py"), "--checkpoint", str(tmp / "models" / "best.pt"),
                  "--port", str(port)], env, f"http://127.0.0.1:{port}/health", tmp / "baseline.log")
    try:
        url = f"http://127.0.0.1:{port}/inference/analyze-frame"
        drive(url, jpegs, 4, 3)
        results["baseline_one_image_fp32"] = drive(url, jpegs, 32, args.seconds)
    finally:
        stop(proc)

    at32 = results["service"][-1]["images_per_s"]
    results["targets"] = {
        "service_at_32_vs_in_process_limit": round(at32 / limit, 3), "at_least_0.9": at32 >= 0.9 * limit,
        "service_at_32_vs_one_image_fp32_server": round(at32 / results["baseline_one_image_fp32"]["images_per_s"], 2),
        "at_least_3x": at32 >= 3 * results["baseline_one_image_fp32"]["images_per_s"],
        "runtime_vs_eager_fp32": round(limit / eager_speed, 2), "runtime_at_least_2.5x": limit >= 2.5 * eager_speed,
        "roc_auc_difference": round(abs(auc_runtime - auc_eager), 4), "roc_auc_within_0.005": abs(auc_runtime - auc_eager) <= 0.005,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
