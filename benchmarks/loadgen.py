"""The load generator of benchmarks/serving.py: closed-loop clients on one asyncio loop, and the server's CPU.

Request bodies are encoded once, before the clock starts: the clients share the machine with the server (or
one core of it when pinned), so they must spend their CPU on sending, not on building requests. The server's
CPU time (its process and every descendant: BentoML's arbiter starts the workers) is read at the start and
at the end of the measured window, so CPU per request counts exactly the requests answered inside it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import psutil

BOUNDARY = "dfdetect-bench"


@dataclass(frozen=True)
class Load:
    """What one measured variant sends: the bodies (cycled), their headers, and the images in each."""

    path: str
    bodies: list[bytes]
    headers: dict = field(default_factory=dict)
    images_per_request: int = 1


def multipart(files: list[bytes], field_name: str = "image") -> bytes:
    """A multipart/form-data body with `field_name` given once per file (one image, or a batch)."""
    parts = [
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="f{i}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def form_load(path: str, jpegs: list[bytes], field_name: str = "image", per_request: int = 1) -> Load:
    """Multipart requests of `per_request` images each (the same images in the same order for every server)."""
    groups = [[jpegs[(i + k) % len(jpegs)] for k in range(per_request)] for i in range(0, len(jpegs), per_request)]
    return Load(
        path,
        [multipart(g, field_name) for g in groups],
        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        per_request,
    )


def raw_load(path: str, jpegs: list[bytes]) -> Load:
    """Each image as the whole request body (the service's /inference/analyze-frame/raw)."""
    return Load(path, list(jpegs), {"Content-Type": "image/jpeg"})


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its living descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def error_kind(exc: BaseException) -> str:
    import aiohttp

    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection"
    return type(exc).__name__


def percentile(ms: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(ms, q)), 1) if len(ms) else None


def drive(
    base_url: str, load: Load, clients: int, seconds: float, server_pid: int | None = None, timeout_s: float = 30.0
) -> dict:
    """`clients` connections posting back to back for `seconds`; throughput, latency of the 200s, errors by
    kind (HTTP status, timeout, connection), and the server's CPU milliseconds per answered request."""
    import aiohttp

    url = base_url + load.path
    latencies, errors = [], Counter()
    cpu = {}

    async def client(session, k: int, deadline: float):
        i = k
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.post(url, data=load.bodies[i % len(load.bodies)], headers=load.headers) as r:
                    await r.read()
                    problem = None if r.status == 200 else f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = error_kind(exc)
            if time.perf_counter() < deadline:  # count what completes inside the window only
                if problem is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[problem] += 1
            i += clients

    async def sample_cpu_at(deadline: float):
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        cpu["end"] = tree_cpu_s(server_pid) if server_pid else 0.0

    async def run():
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as session:
            cpu["start"] = tree_cpu_s(server_pid) if server_pid else 0.0
            deadline = time.perf_counter() + seconds
            await asyncio.gather(sample_cpu_at(deadline), *(client(session, k, deadline) for k in range(clients)))

    asyncio.run(run())
    ms = np.array(latencies) * 1000
    answered = len(latencies) + sum(n for kind, n in errors.items() if kind.startswith("HTTP"))
    cpu_ms = (cpu["end"] - cpu["start"]) * 1000 if server_pid else None
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": sorted(errors),
        "errors_by_kind": dict(sorted(errors.items())),
        "images_per_request": load.images_per_request,
        "requests_per_s": round(len(latencies) / seconds, 1),
        "images_per_s": round(len(latencies) * load.images_per_request / seconds, 1),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "server_cpu_ms_per_request": round(cpu_ms / answered, 3) if cpu_ms is not None and answered else None,
        "server_cpu_ms_per_image": (
            round(cpu_ms / (len(latencies) * load.images_per_request), 3) if cpu_ms is not None and latencies else None
        ),
    }
