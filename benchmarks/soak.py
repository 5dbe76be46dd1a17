"""Soak: mixed valid and hostile traffic against `bentoml serve` for a fixed time.

It trains and registers a small model on generated sample data (a throw-away SQLite registry; the model is
not what is measured), starts the service, and drives `--clients` concurrent clients for `--seconds`, each
request drawn from a mix of valid frames, /score arrays, explanations and videos, and hostile requests
(random bytes, truncated and sliver images, playlists posing as videos, malformed multipart, wrong fields,
bad /score values, oversized bodies). It reports requests and answers by status and kind, latency
percentiles of the valid kinds, and the service's resident memory (its process and all descendants) sampled over time.
The service passes when no answer is a 5xx other than 503 "overloaded", nothing times out, and memory after
warm-up stays flat (growth from the first to the last quarter under --max-growth-mb).

    python benchmarks/soak.py [--seconds 300] [--clients 8] [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (BentoML's arbiter starts the workers)."""
    parents = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


def png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG")
    return buf.getvalue()


def request_kinds(jpegs: list[bytes], video: bytes, size: int, max_batch: int):
    """name -> (valid?, a function making one request with a session and base URL)."""
    frame = "/inference/analyze-frame"

    def post_image(data, name="f.jpg", field="image", **form):
        return lambda s, url: s.post(url + frame, files={field: (name, data, "image/jpeg")}, data=form, timeout=60)

    pixels = np.random.default_rng(0).integers(0, 256, (4, size, size, 3)).tolist()
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    return {
        "frame": (True, lambda s, url: post_image(random.choice(jpegs))(s, url)),
        "score": (True, lambda s, url: s.post(url + "/score", json={"images": pixels}, timeout=60)),
        "explain": (True, lambda s, url: post_image(random.choice(jpegs), explain="true")(s, url)),
        "video": (
            True,
            lambda s, url: s.post(url + "/inference/analyze-video", files={"video": ("c.mp4", video)}, timeout=60),
        ),
        "random-bytes": (False, lambda s, url: post_image(os.urandom(random.randint(1, 4096)))(s, url)),
        "truncated": (False, lambda s, url: post_image(random.choice(jpegs)[:200])(s, url)),
        "sliver": (False, post_image(png(30000, 1), "s.png")),
        "wrong-field": (False, post_image(jpegs[0], field="file")),
        "text-field": (
            False,
            lambda s, url: s.post(url + frame, data={"image": "http://example.com/a.jpg"}, timeout=60),
        ),
        "urlencoded": (
            False,
            lambda s, url: s.post(
                url + frame, data="image=x", timeout=60, headers={"Content-Type": "application/x-www-form-urlencoded"}
            ),
        ),
        "no-boundary": (
            False,
            lambda s, url: s.post(
                url + frame, data=b"--x\r\n\r\n", timeout=60, headers={"Content-Type": "multipart/form-data"}
            ),
        ),
        "long-name": (False, post_image(jpegs[0], "n" * 300 + ".jpg")),
        "huge-frame-number": (False, post_image(jpegs[0], frameNumber="9" * 5001)),
        "playlist": (
            False,
            lambda s, url: s.post(url + "/inference/analyze-video", files={"video": ("x.m3u8", playlist)}, timeout=60),
        ),
        "score-values": (
            False,
            lambda s, url: s.post(url + "/score", json={"images": [[[[300, None, 1.5]]]]}, timeout=60),
        ),
        "score-oversize": (
            False,
            lambda s, url: s.post(
                url + "/score",
                data=b"[" + b"0," * 9_000_000 + b"0]",
                timeout=60,
                headers={"Content-Type": "application/json"},
            ),
        ),
        "score-too-many": (
            False,
            lambda s, url: s.post(
                url + "/score", timeout=60, json={"images": np.zeros((max_batch + 1, 2, 2, 3), np.uint8).tolist()}
            ),
        ),
    }


def train_and_register(tmp: Path):
    """A small champion on generated data (the HTTP path is measured, not the model), its JPEGs and a video."""
    import av

    from dfdetect import promotion, registry
    from dfdetect.config import load_params, parse_params
    from dfdetect.evaluate import evaluate
    from dfdetect.prepare import prepare
    from dfdetect.sample_data import generate
    from dfdetect.train import train

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["model"].update(name="custom_cnn", pretrained=False)
    raw["prepare"]["image_size"] = 64
    raw["train"].update(epochs=2, sbi={"mode": "none", "prob": 0.5}, wise_alpha=1.0)  # nothing to mix back
    raw["evaluate"]["robustness"] = False
    raw["promotion"]["floors"] = {}
    raw["serving"].update(device="cpu", poll_interval_s=5)
    params = parse_params(raw)
    generate(tmp / "data", {"train": 60, "val": 20, "test": 20}, size=96, seed=1)
    prepare(tmp / "data", tmp / "prepared", params.prepare, workers=2)
    train(params, tmp / "prepared", tmp / "models", tmp / "history.csv")
    evaluate(
        params, tmp / "prepared", tmp / "models", tmp / "eval", tmp / "eval" / "metrics.json", tmp / "eval" / "plots"
    )
    registry.register(params, tmp / "models", tmp / "eval" / "metrics.json", tmp / "prepared")
    promotion.promote(params, tmp / "prepared")
    jpegs = [p.read_bytes() for p in sorted((tmp / "data" / "test").rglob("*.jpg"))]
    frames = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs[:30]]
    with av.open(str(tmp / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())
    return params, uri, jpegs, (tmp / "clip.mp4").read_bytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="how long the traffic runs")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--hostile-share", type=float, default=0.5, help="share of requests drawn from the hostile kinds")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument(
        "--max-growth-mb",
        type=float,
        default=100.0,
        help="pass when the mean RSS of the last quarter exceeds the second quarter's by less",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json", help="JSON result file")
    args = ap.parse_args()

    from dfdetect.io_utils import atomic_write_json
    from dfdetect.servers import start_bento

    tmp = Path(tempfile.mkdtemp(prefix="dfdetect-soak-"))
    params, uri, jpegs, video = train_and_register(tmp)
    raw = params.model_dump(mode="json")
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    kinds = request_kinds(jpegs, video, params.prepare.image_size, params.serving.max_batch_size)
    valid = [k for k, (ok, _) in kinds.items() if ok]
    hostile = [k for k, (ok, _) in kinds.items() if not ok]

    server = start_bento(REPO, tmp / "params.yaml", uri, tmp / "bentoml", log_dir=tmp)
    statuses: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    memory: list[tuple[float, float]] = []
    stop = threading.Event()
    began = time.monotonic()

    def client(seed: int):
        rng = random.Random(seed)
        session = requests.Session()
        while not stop.is_set():
            kind = rng.choice(hostile if rng.random() < args.hostile_share else valid)
            started = time.perf_counter()
            try:
                status = str(kinds[kind][1](session, server.url).status_code)
            except requests.Timeout:
                status = "timeout"
            except requests.ConnectionError:
                status = "connection-error"
            statuses[kind][status] += 1
            if kinds[kind][0] and status == "200":
                latencies[kind].append(time.perf_counter() - started)

    def sampler():
        while not stop.wait(args.sample_every):
            memory.append((round(time.monotonic() - began, 1), round(tree_rss_mb(server.proc.pid), 1)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)] + [
        threading.Thread(target=sampler)
    ]
    try:
        memory.append((0.0, round(tree_rss_mb(server.proc.pid), 1)))
        for t in threads:
            t.start()
        deadline = began + args.seconds
        while time.monotonic() < deadline:
            time.sleep(1)
            print(
                f"\r{time.monotonic() - began:6.0f}/{args.seconds:.0f} s  {sum(sum(c.values()) for c in statuses.values())} "
                f"requests  RSS {memory[-1][1]:.0f} MB",
                end="",
                flush=True,
            )
        print()
    finally:
        stop.set()
        for t in threads:
            t.join(90)
        alive = requests.get(server.url + "/livez", timeout=10).status_code
        server.stop()

    by_status = Counter()
    for c in statuses.values():
        by_status.update(c)
    bad = {
        s: n
        for s, n in by_status.items()
        if s in ("timeout", "connection-error") or (s.isdigit() and int(s) >= 500 and s != "503")
    }
    rss = [m for _, m in memory]
    quarter = max(1, len(rss) // 4)
    growth = float(np.mean(rss[-quarter:]) - np.mean(rss[quarter : 2 * quarter])) if len(rss) >= 4 else 0.0
    result = {
        "benchmark": "soak",
        "seconds": args.seconds,
        "clients": args.clients,
        "hostile_share": args.hostile_share,
        "machine": f"{os.cpu_count()} CPUs",
        "model": f"{params.model.name} {params.prepare.image_size}px (sample data)",
        "requests": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(statuses.items())},
        "latency_ms": {
            k: {
                "p50": round(1000 * float(np.percentile(v, 50)), 1),
                "p99": round(1000 * float(np.percentile(v, 99)), 1),
            }
            for k, v in sorted(latencies.items())
            if v
        },
        "rss_mb": {
            "start": rss[0],
            "peak": max(rss),
            "end": rss[-1],
            "growth_last_vs_second_quarter": round(growth, 1),
            "samples": memory,
        },
        "livez_after": alive,
        "passed": {
            "no_5xx_but_overloaded": not bad,
            "flat_memory": growth < args.max_growth_mb,
            "live_after": alive == 200,
        },
        "command": "python benchmarks/soak.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    atomic_write_json(args.out, result)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "rss_mb"}
            | {"rss_mb": {k: v for k, v in result["rss_mb"].items() if k != "samples"}},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
