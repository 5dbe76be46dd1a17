"""Adaptive batching inside the serving process: concurrent requests' images are scored in one model call.

The policy is the one that keeps both latency and throughput good without tuning a wait: while the model
scores one batch, new requests queue; as soon as it is free it takes everything waiting (up to
`max_batch_size` images) at once. An idle service therefore answers a lone request immediately, and a busy
one forms batches as large as its load. A request that waited `max_latency_ms` without reaching the model
is refused as overloaded (HTTP 503) rather than answered late, which is how BentoML's own batching behaves.

Scoring in the process that parsed the request, instead of calling a second BentoML service, saves a
serialisation and an HTTP round trip per request (benchmarks/README.md has what the service measures).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class Overloaded(RuntimeError):
    """A request waited longer than max_latency_ms for the model."""


@dataclass
class _Pending:
    images: np.ndarray
    arm: str
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """`await submit(images, arm)` -> one result per image; `score(images, arm)` runs batches in one thread.

    Images of one request stay in one batch and one arm (a video's frames share one model version).
    `on_batch(n_images)` is called for every batch run (metrics).
    """

    def __init__(self, score: Callable[[np.ndarray, str], list], max_batch_size: int, max_latency_ms: float,
                 on_batch: Callable[[int], None] | None = None):
        self.score, self.max_batch_size = score, max_batch_size
        self.max_wait_s = max_latency_ms / 1000
        self.on_batch = on_batch or (lambda n: None)
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # one model call at a time: concurrent calls would only fight over the same cores
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dfdetect-batch")

    async def submit(self, images: np.ndarray, arm: str = "primary") -> list:
        loop = asyncio.get_running_loop()
        if self._worker is None:  # bound to the serving event loop on first use
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="dfdetect-batcher")
        future = loop.create_future()
        self._waiting.append(_Pending(images, arm, future))
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        """The first waiting request and the ones after it that fit (a request never waits for new ones)."""
        batch = [self._waiting.popleft()]
        size = len(batch[0].images)
        while self._waiting and size + len(self._waiting[0].images) <= self.max_batch_size:
            size += len(self._waiting[0].images)
            batch.append(self._waiting.popleft())
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            now = time.monotonic()
            live = []
            for p in batch:
                if p.future.cancelled():  # the client went away
                    continue
                if now - p.queued_at > self.max_wait_s:
                    p.future.set_exception(Overloaded(
                        f"waited {1000 * (now - p.queued_at):.0f} ms for the model, over serving.max_latency_ms"))
                    continue
                live.append(p)
            for arm in dict.fromkeys(p.arm for p in live):  # one model call per version asked for
                group = [p for p in live if p.arm == arm]
                images = np.concatenate([p.images for p in group])
                try:
                    results = await loop.run_in_executor(self._executor, self.score, images, arm)
                except Exception as exc:  # every request of the batch learns why
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                self.on_batch(len(images))
                start = 0
                for p in group:
                    if not p.future.done():
                        p.future.set_result(results[start:start + len(p.images)])
                    start += len(p.images)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
