"""Serving throughput, latency and CPU per request: the BentoML service against the in-process limit and the
servers a user would pick instead, each serving the same model with the same runtime.

It trains and registers a model on generated sample data (a throw-away SQLite registry), then measures, for
each layout and server, closed-loop clients posting JPEGs for a fixed time at each client count:
throughput, p50/p95/p99 latency, the server's CPU milliseconds per request (its process tree's CPU time over
the window) and errors by kind (HTTP status, timeout, connection). The servers and what each one sends:
- service: `bentoml serve serving.service:Detector`, multipart to /inference/analyze-frame;
  service_raw: the same process, the image as the body of /inference/analyze-frame/raw;
  service_batch: the same process, --batch-images images per request to /inference/analyze-frames;
  service_2_workers: another `bentoml serve` with serving.workers=2 (two worker processes, one batcher each);
  service_no_hold: another `bentoml serve` with serving.batch_wait_ms=0 (the batcher never holds a batch);
  service_logged: another `bentoml serve` with serving.prediction_log on (every verdict logged to a folder);
- fastapi: a plain FastAPI + uvicorn server with dfdetect's batcher (benchmarks/fastapi_server.py);
- bentoml_batchable: BentoML's own `@bentoml.api(batchable=True)` batching (benchmarks/bentoml_batchable_service.py);
- baseline_one_image_fp32: the original design, one image per request, eager fp32 (benchmarks/baseline_server.py).
Layouts: `pinned` runs the load generator on --client-core and every server process (and the in-process
limit, in a fresh process) on --server-core, so a server's figures are those of one core it has alone;
`unpinned` lets everything share all cores, as the first version of this benchmark did. In process, in this
process and on all cores: the runtime against eager fp32 PyTorch (speed, and ROC-AUC on the test split).

    python benchmarks/serving.py [--runtime auto] [--seconds 15] [--clients 1,8,32,64] [--layouts pinned,unpinned]
                                 [--servers NAME,...] [--out benchmarks/results/serving.json]

The top-level keys of the first version keep their meaning (measured unpinned, or in the first layout run
when unpinned is not); `layouts` holds everything per layout, and `targets_pinned` the issue-16 targets.
Smoke run: --epochs 1 --seconds 2 --warmup 1 --clients 1,4 --out /tmp/serving_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import yaml
from in_process import limit
from loadgen import Load, drive, form_load, raw_load

from dfdetect.servers import descendants, free_port, stop_processes

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
VARIANTS = (
    "service",
    "service_raw",
    "service_batch",
    "service_2_workers",
    "service_no_hold",
    "service_logged",
    "fastapi",
    "bentoml_batchable",
    "baseline_one_image_fp32",
)
SERVICE_VARIANTS = tuple(name for name in VARIANTS if name.startswith("service"))  # dfdetect's own
SMALL_BATCHES = (1, 2, 4, 8, 16)  # the in-process cost per image at these too (a server forms smaller batches)
BASELINE = "baseline_one_image_fp32"  # eager fp32: not the served runtime, so no HTTP-path CPU for it


@dataclass(frozen=True)
class Server:
    """One server process: how to start it on a port, where it says it is ready, what is measured on it."""

    name: str
    command: list[str]  # "{port}" is replaced
    health: str
    variants: dict[str, Load]
    env: dict[str, str] = field(default_factory=dict)  # on top of the benchmark's environment


def servers(tmp: Path, jpegs: list[bytes], batch_images: int) -> list[Server]:
    frame = "/inference/analyze-frame"
    host = ["--host", "127.0.0.1", "--port", "{port}"]
    return [
        Server(
            "service",
            [str(BIN / "bentoml"), "serve", "serving.service:Detector", *host],
            "/health",
            {
                "service": form_load(frame, jpegs),
                "service_raw": raw_load(frame + "/raw", jpegs),
                "service_batch": form_load("/inference/analyze-frames", jpegs, "images", batch_images),
            },
        ),
        # serving.workers=2: two BentoML worker processes, one batcher each (issue 16: 1 against 2 workers)
        Server(
            "service_2_workers",
            [str(BIN / "bentoml"), "serve", "serving.service:Detector", *host],
            "/health",
            {"service_2_workers": form_load(frame, jpegs)},
            {"DFDETECT_PARAMS": str(tmp / "params_2_workers.yaml")},
        ),
        # serving.batch_wait_ms=0: the batcher never holds a part-full batch (the hold against none, same run)
        Server(
            "service_no_hold",
            [str(BIN / "bentoml"), "serve", "serving.service:Detector", *host],
            "/health",
            {"service_no_hold": form_load(frame, jpegs)},
            {"DFDETECT_PARAMS": str(tmp / "params_no_hold.yaml")},
        ),
        # serving.prediction_log on (a folder): every verdict logged (issue 17: <= 5 % of throughput at 32 clients)
        Server(
            "service_logged",
            [str(BIN / "bentoml"), "serve", "serving.service:Detector", *host],
            "/health",
            {"service_logged": form_load(frame, jpegs)},
            {"DFDETECT_PARAMS": str(tmp / "params_logged.yaml")},
        ),
        Server(
            "fastapi",
            [sys.executable, str(HERE / "fastapi_server.py"), "--params", str(tmp / "params.yaml"), *host],
            "/health",
            {"fastapi": form_load(frame, jpegs)},
        ),
        Server(
            "bentoml_batchable",
            [
                str(BIN / "bentoml"),
                "serve",
                "bentoml_batchable_service:BatchableDetector",
                "--working-dir",
                str(HERE),
                *host,
            ],
            "/readyz",
            {"bentoml_batchable": form_load(frame, jpegs)},
        ),
        Server(
            "baseline",
            [
                sys.executable,
                str(HERE / "baseline_server.py"),
                "--checkpoint",
                str(tmp / "models" / "best.pt"),
                "--port",
                "{port}",
            ],
            "/health",
            {BASELINE: form_load(frame, jpegs)},
        ),
    ]


def wait_ready(proc: subprocess.Popen, cmd: list[str], health: str, log: Path, timeout: float = 300) -> None:
    """Return once `health` answers 200 (and not `"ready": false`); raise if the server exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = requests.get(health, timeout=2)
            if r.status_code == 200:
                try:
                    ready = (
                        r.json().get("ready", True)
                        if r.headers.get("content-type", "").startswith("application/json")
                        else True
                    )
                except ValueError:
                    ready = True
                if ready:
                    return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{' '.join(cmd[:4])} not ready within {timeout:g} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> bool:
    """SIGTERM to the whole process group, SIGKILL after 20 s; True when no process of the group, and none of
    the server's workers (BentoML starts each in a session of its own, outside the group), is left."""
    workers = descendants(proc.pid)
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s  # the leader is gone: give its children the same time
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    workers_gone = stop_processes(workers)
    return not group_alive(proc.pid) and workers_gone


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextlib.contextmanager
def running(server: Server, prefix: list[str], env: dict, log: Path, stopped: dict):
    """The server on a free port for the block; stopped by process group whatever happens inside."""
    port = free_port()
    cmd = [*prefix, *(a.replace("{port}", str(port)) for a in server.command)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**env, **server.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(proc, cmd, f"http://127.0.0.1:{port}{server.health}", log)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        stopped[server.name] = stop(proc)


def in_process_child(prefix: list[str], env: dict, images: Path, seconds: float) -> dict:
    """The in-process limit in a fresh process, pinned like the servers are (benchmarks/in_process.py)."""
    done = subprocess.run(
        [
            *prefix,
            sys.executable,
            str(HERE / "in_process.py"),
            "--images",
            str(images),
            "--seconds",
            str(seconds),
            "--batches",
            ",".join(str(b) for b in SMALL_BATCHES),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"in_process.py failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_layout(layout: str, args, tmp: Path, env: dict, jpegs: list[bytes]) -> dict:
    prefix = ["taskset", "-c", str(args.server_core)] if layout == "pinned" else []
    everything = os.sched_getaffinity(0)
    if layout == "pinned":  # this thread drives the load; threads started from now on inherit the core
        os.sched_setaffinity(0, {args.client_core})
    out = {
        "client_cores": sorted(os.sched_getaffinity(0)),
        "server_cores": [args.server_core] if layout == "pinned" else sorted(everything),
        "servers": {},
        "stopped": {},
        "failures": {},
    }
    try:
        out["in_process"] = in_process_child(prefix, env, tmp / "data" / "test", args.seconds)
        model_ms = out["in_process"]["cpu_ms_per_image"]
        for server in servers(tmp, jpegs, args.batch_images):
            wanted = {name: load for name, load in server.variants.items() if name in args.servers}
            if not wanted:
                continue
            try:
                with running(server, prefix, env, tmp / f"{layout}_{server.name}.log", out["stopped"]) as (url, pid):
                    for name, load in wanted.items():
                        drive(url, load, 4, args.warmup, timeout_s=args.timeout)  # warm-up, not recorded
                        levels = []
                        for clients in args.clients:
                            before = batch_counts(url)
                            levels.append(drive(url, load, clients, args.seconds, pid, args.timeout))
                            levels[-1]["mean_model_batch"] = mean_batch(before, batch_counts(url))
                        for level in levels:
                            level["http_path_cpu_ms_per_request"] = (
                                None if name == BASELINE else http_path_cpu(level, model_ms)
                            )
                            level["http_path_cpu_ms_at_served_batches"] = (
                                None
                                if name == BASELINE or level["mean_model_batch"] is None
                                else http_path_cpu(
                                    level, cost_at(out["in_process"]["by_batch"], level["mean_model_batch"])
                                )
                            )
                        out["servers"][name] = levels
                        print(json.dumps({"layout": layout, "server": name, "levels": levels}), flush=True)
            except RuntimeError as exc:  # record it and measure the other servers; main() exits non-zero
                out["failures"][server.name] = str(exc)[-3000:]
                print(f"{layout} {server.name} failed: {str(exc)[-1500:]}", file=sys.stderr, flush=True)
    finally:
        os.sched_setaffinity(0, everything)
    return out


def batch_counts(url: str) -> tuple[float, float] | None:
    """(images, model calls) so far from the server's dfdetect_batch_size histogram; None where it has none."""
    try:
        text = requests.get(url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    found = {}
    for line in text.splitlines():
        for key in ("dfdetect_batch_size_sum", "dfdetect_batch_size_count"):
            if line.startswith(key + " ") or line.startswith(key + "{"):
                found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return (found["dfdetect_batch_size_sum"], found["dfdetect_batch_size_count"]) if len(found) == 2 else None


def mean_batch(before, after) -> float | None:
    """Images per model call in the window between two batch_counts."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def cost_at(by_batch: dict, batch: float) -> float:
    """In-process CPU ms per image at a mean batch size, interpolated between the measured sizes."""
    measured = sorted((int(size), cost) for size, cost in by_batch.items())  # JSON keys are strings
    return float(np.interp(batch, [size for size, _ in measured], [cost for _, cost in measured]))


def at(levels: list[dict], clients: int) -> dict | None:
    return next((lv for lv in levels if lv["clients"] == clients), None)


def http_path_cpu(level: dict, model_ms: float) -> float | None:
    """Server CPU per answered request beyond the model's: the window's CPU less the in-process cost of the
    images actually scored (the 200s), over every answered request (a 503 costs HTTP work, and no model)."""
    cpu = level["server_cpu_ms_per_request"]
    answered = level["requests"] + sum(n for kind, n in level["errors_by_kind"].items() if kind.startswith("HTTP"))
    if cpu is None or not answered:
        return None
    scored = level["requests"] * level["images_per_request"]
    return round((cpu * answered - model_ms * scored) / answered, 3)


def pinned_targets(pinned: dict, max_latency_ms: int, clients: int = 32) -> dict:
    """Issue 16's targets on the pinned layout at 32 clients, for each service variant measured."""
    limit_ips = pinned["in_process"]["images_per_s"]
    peers = {n: at(lv, clients) for n, lv in pinned["servers"].items() if n not in SERVICE_VARIANTS}
    peers = {n: lv["images_per_s"] for n, lv in peers.items() if lv}
    targets = {}
    for name in SERVICE_VARIANTS:
        level = at(pinned["servers"].get(name, []), clients)
        if level is None:
            continue
        levels = pinned["servers"][name]
        non_503 = sum(n for lv in levels for kind, n in lv["errors_by_kind"].items() if kind != "HTTP 503")
        targets[name] = {
            "vs_in_process_limit": round(level["images_per_s"] / limit_ips, 3),
            "at_least_0.9": level["images_per_s"] >= 0.9 * limit_ips,
            "vs_peers": {n: round(level["images_per_s"] / v, 2) if v else None for n, v in peers.items()},
            "at_least_each_peer": all(level["images_per_s"] >= v for v in peers.values()),
            "http_path_cpu_ms_per_request": level["http_path_cpu_ms_per_request"],
            "http_path_at_most_1ms": level["http_path_cpu_ms_per_request"] is not None
            and level["http_path_cpu_ms_per_request"] <= 1.0,
            # not the target's measure: the same, less the model's cost at the batches the server formed
            "mean_model_batch": level.get("mean_model_batch"),
            "http_path_cpu_ms_at_served_batches": level.get("http_path_cpu_ms_at_served_batches"),
            "p99_ms": level["p99_ms"],
            "p99_within_max_latency_ms": level["p99_ms"] is not None and level["p99_ms"] <= max_latency_ms,
            "errors_at_fewer_clients": sum(lv["errors"] for lv in levels if lv["clients"] < clients),
            "errors_other_than_503": non_503,
        }
    return {"clients": clients, "in_process_limit_images_per_s": limit_ips, **targets}


def client_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated client counts like 1,8,32,64; got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be at least 1; got {text!r}")
    return counts


def names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        chosen = [n for n in text.split(",") if n]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
        return chosen

    return parse


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "onnx", "onnx-int8"],
        help="serving.runtime of every server but the baseline (auto: what the service picks here)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=15,
        help="measured load per server and client count, and the in-process limit's duration (default 15)",
    )
    ap.add_argument("--warmup", type=float, default=3, help="unrecorded load (4 clients) before each measured variant")
    ap.add_argument(
        "--clients",
        type=client_counts,
        default=[1, 8, 32, 64],
        help="comma-separated concurrent client counts (default 1,8,32,64)",
    )
    ap.add_argument(
        "--layouts",
        type=names(("pinned", "unpinned")),
        default=["pinned", "unpinned"],
        help="pinned: load generator on --client-core, servers and the in-process limit on "
        "--server-core; unpinned: all on every core (default both)",
    )
    ap.add_argument(
        "--servers",
        type=names(VARIANTS),
        default=list(VARIANTS),
        help="comma-separated variants to measure (default all): " + ", ".join(VARIANTS),
    )
    ap.add_argument("--client-core", type=int, default=0, help="the core of the load generator when pinned (default 0)")
    ap.add_argument("--server-core", type=int, default=1, help="the core of each server when pinned (default 1)")
    ap.add_argument("--batch-images", type=int, default=8, help="images per request for service_batch (default 8)")
    ap.add_argument(
        "--timeout", type=float, default=30, help="client timeout per request in seconds (a timeout is an error)"
    )
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of the benchmark model (default 4)")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "serving.json",
        help="JSON result file (default benchmarks/results/serving.json; write smoke runs elsewhere)",
    )
    args = ap.parse_args()
    cores = os.sched_getaffinity(0)
    if "pinned" in args.layouts and (
        args.client_core == args.server_core or not {args.client_core, args.server_core} <= cores
    ):
        ap.error(
            f"--client-core and --server-core must be two different cores of {sorted(cores)} for the pinned layout"
        )
    if not 1 <= args.batch_images:
        ap.error("--batch-images must be at least 1")
    return args


def main():
    args = parse_args()

    from dfdetect import promotion, registry
    from dfdetect.config import load_params, parse_params
    from dfdetect.data import load_split
    from dfdetect.evaluate import evaluate
    from dfdetect.metrics import roc_auc
    from dfdetect.model_set import ServedModel
    from dfdetect.prepare import prepare
    from dfdetect.sample_data import generate
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
    (tmp / "params_2_workers.yaml").write_text(yaml.safe_dump({**raw, "serving": {**raw["serving"], "workers": 2}}))
    (tmp / "params_no_hold.yaml").write_text(
        yaml.safe_dump({**raw, "serving": {**raw["serving"], "batch_wait_ms": 0.0}})
    )
    logged = {**raw["serving"], "prediction_log": str(tmp / "prediction_log")}
    (tmp / "params_logged.yaml").write_text(yaml.safe_dump({**raw, "serving": logged}))
    generate(tmp / "data", {"train": 300, "val": 100, "test": 100}, size=128, seed=42)
    prepare(tmp / "data", tmp / "prepared", params.prepare, workers=2)
    train(params, tmp / "prepared", tmp / "models", tmp / "history.csv")
    evaluate(
        params, tmp / "prepared", tmp / "models", tmp / "eval", tmp / "eval" / "metrics.json", tmp / "eval" / "plots"
    )
    registry.register(params, tmp / "models", tmp / "eval" / "metrics.json", tmp / "prepared")
    promotion.promote(params, tmp / "prepared")
    loaded = registry.load("champion", params=params)
    jpegs = [p.read_bytes() for p in sorted((tmp / "data" / "test").rglob("*.jpg"))]

    # In this process, on all cores: the runtime against eager fp32, on the test split (as in the first version).
    test = load_split(tmp / "prepared", "test")
    served = ServedModel(copy.deepcopy(loaded), "cpu", args.runtime)  # each owns its weights and memory format
    eager = ServedModel(copy.deepcopy(loaded), "cpu", "torch", precision="fp32")
    auc_runtime, auc_eager = (
        roc_auc(test.labels, served.predict(test.images[:]), 0.5),
        roc_auc(test.labels, eager.predict(test.images[:]), 0.5),
    )
    size = loaded.preprocess.image_size
    limit_ips = limit(served.predict, size, jpegs, args.seconds)["images_per_s"]
    eager_speed = limit(eager.predict, size, jpegs, args.seconds)["images_per_s"]
    runtime_name = served.runtime_name
    del served, eager

    env = {
        **os.environ,
        "DFDETECT_PARAMS": str(tmp / "params.yaml"),
        "MLFLOW_TRACKING_URI": uri,
        "BENTOML_HOME": str(tmp / "bentoml"),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    results = {
        "benchmark": "serving",
        "runtime": runtime_name,
        "seconds_per_level": args.seconds,
        "machine": f"{os.cpu_count()} CPUs",
        "model": loaded.name + "/" + loaded.version,
        "command": " ".join(["python", "benchmarks/serving.py", *sys.argv[1:]]),
        "in_process_limit_images_per_s": round(limit_ips, 1),
        "eager_fp32_in_process_images_per_s": round(eager_speed, 1),
        "roc_auc_runtime": round(auc_runtime, 4),
        "roc_auc_eager_fp32": round(auc_eager, 4),
        "clients": args.clients,
        "batch_images": args.batch_images,
        "layouts": {},
    }
    for layout in args.layouts:
        results["layouts"][layout] = measure_layout(layout, args, tmp, env, jpegs)

    # The first version's keys, from the unpinned layout (or the first one measured).
    legacy = results["layouts"].get("unpinned") or results["layouts"][args.layouts[0]]
    results["legacy_keys_from_layout"] = "unpinned" if "unpinned" in results["layouts"] else args.layouts[0]
    headline = 32 if 32 in args.clients else max(args.clients)
    if "service" in legacy["servers"]:
        results["service"] = legacy["servers"]["service"]
    if BASELINE in legacy["servers"]:
        results["baseline_one_image_fp32"] = at(legacy["servers"][BASELINE], headline)
    if "service" in results and "baseline_one_image_fp32" in results:
        at32 = at(results["service"], headline)["images_per_s"]
        base = results["baseline_one_image_fp32"]["images_per_s"]
        results["targets"] = {
            "service_at_32_vs_in_process_limit": round(at32 / limit_ips, 3),
            "at_least_0.9": at32 >= 0.9 * limit_ips,
            "service_at_32_vs_one_image_fp32_server": round(at32 / base, 2) if base else None,
            "at_least_3x": at32 >= 3 * base,
            "runtime_vs_eager_fp32": round(limit_ips / eager_speed, 2),
            "runtime_at_least_2.5x": limit_ips >= 2.5 * eager_speed,
            "roc_auc_difference": round(abs(auc_runtime - auc_eager), 4),
            "roc_auc_within_0.005": abs(auc_runtime - auc_eager) <= 0.005,
            "at_clients": headline,
        }
    if "pinned" in results["layouts"]:
        results["targets_pinned"] = pinned_targets(
            results["layouts"]["pinned"], params.serving.max_latency_ms, headline
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    failed = {f"{lay}/{name}": msg for lay, r in results["layouts"].items() for name, msg in r["failures"].items()}
    left = [f"{lay}/{name}" for lay, r in results["layouts"].items() for name, ok in r["stopped"].items() if not ok]
    if failed or left:
        sys.exit(f"failed: {sorted(failed)}; processes left running: {left}")


if __name__ == "__main__":
    main()
