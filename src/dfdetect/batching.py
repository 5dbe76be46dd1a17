"""Adaptive batching inside the serving process: concurrent requests' images are scored in one model call.

The policy is the one that keeps both latency and throughput good without tuning a wait: while the model
scores one batch, new requests queue; as soon as it is free it takes everything waiting (up to
`max_batch_size` images) at once. An idle service therefore answers a lone request immediately, and a busy
one forms batches as large as its load. A request that waited `max_latency_ms` without reaching the model
is refused as overloaded (HTTP 503) rather than answered late, which is how BentoML's own batching behaves.

Under load that policy alone splits a steady set of clients into two alternating halves: while one half is
scored, the other is answered and sends its next requests, so batches hold half the clients and the model runs
at its cost for half the batch. With `batch_wait_ms`, a free model holds a part-full batch, up to that long,
for the requests the service held during the last batch (`Demand`, counted by the service from body read to
answer); a lone client is never held, since the only request the service held is the one waiting.

Scoring in the process that parsed the request, instead of calling a second BentoML service, saves a
serialisation and an HTTP round trip per request (benchmarks/README.md has what the service measures).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """A request waited longer than max_latency_ms for the model, or the queue is full."""


class BatcherDead(RuntimeError):
    """The batching loop stopped: the service is not live and must be restarted (/livez says so)."""


class Demand:
    """How many requests the service holds now, and the most it held since the batcher last asked.

    The service counts a request from its parsed body to its answer (`with demand:`); the batcher reads the
    peak when it forms a batch: the clients that were in the service meanwhile are the ones about to send
    again. Only the event loop touches it, so no lock."""

    def __init__(self):
        self.now = 0
        self._peak = 0

    def __enter__(self) -> Demand:
        self.now += 1
        self._peak = max(self._peak, self.now)
        return self

    def __exit__(self, *exc) -> None:
        self.now -= 1

    def take_peak(self) -> int:
        """The most requests held since the last call; the count starts again from those held now."""
        peak, self._peak = self._peak, self.now
        return peak


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

    def __init__(
        self,
        score: Callable[[np.ndarray, str], list],
        max_batch_size: int,
        max_latency_ms: float,
        on_batch: Callable[[int], None] | None = None,
        max_queued_images: int | None = None,
        batch_wait_ms: float = 0.0,
        demand: Demand | None = None,
    ):
        self.score, self.max_batch_size = score, max_batch_size
        self.max_wait_s = max_latency_ms / 1000
        if batch_wait_ms < 0 or batch_wait_ms >= max_latency_ms:
            raise ValueError(f"batch_wait_ms: expected 0 <= {batch_wait_ms} < max_latency_ms ({max_latency_ms})")
        self.batch_wait_s, self.demand = batch_wait_ms / 1000, demand
        self.on_batch = on_batch or (lambda n: None)
        # a bounded queue: beyond it a request is refused at once (503) instead of waiting to time out
        self.max_queued_images = max_queued_images or 8 * max_batch_size
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._died: BaseException | None = None
        self._current: list[_Pending] = []  # the batch being scored (failed too if the loop dies)
        # one model call at a time: concurrent calls would only fight over the same cores
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dfdetect-batch")

    @property
    def alive(self) -> bool:
        """False once the batching loop has stopped for any reason other than close()."""
        return self._died is None and not (self._worker is not None and self._worker.done())

    async def submit(self, images: np.ndarray, arm: str = "primary") -> list:
        if not isinstance(images, np.ndarray) or images.ndim < 1 or len(images) == 0:
            raise ValueError("images: expected a non-empty array of images")
        if not self.alive:
            raise BatcherDead(f"the batcher stopped ({self._died!r}); the service needs a restart")
        if self._waiting and self._queued_images + len(images) > self.max_queued_images:
            raise Overloaded(f"{self._queued_images} images already queued (limit {self.max_queued_images})")
        loop = asyncio.get_running_loop()
        if self._worker is None:  # bound to the serving event loop on first use
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="dfdetect-batcher")
        future = loop.create_future()
        self._waiting.append(_Pending(images, arm, future))
        self._queued_images += len(images)
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        """The first waiting request and the ones after it that fit (a request never waits for new ones)."""
        batch = [self._waiting.popleft()]
        size = len(batch[0].images)
        while self._waiting and size + len(self._waiting[0].images) <= self.max_batch_size:
            size += len(self._waiting[0].images)
            batch.append(self._waiting.popleft())
        self._queued_images -= size
        return batch

    async def _run(self) -> None:
        try:
            while True:
                if not self._waiting:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._gather()
                self._current = self._take_batch()
                await self._run_batch(self._current)
                self._current = []
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug in the loop itself: fail everything queued, report not live
            self._died = exc
            log.error("the batcher stopped; /livez now fails so the service is restarted", exc_info=exc)
            for p in [*self._current, *self._waiting]:
                if not p.future.done():
                    p.future.set_exception(BatcherDead(f"the batcher stopped: {exc!r}"))
            self._waiting.clear()
            self._queued_images = 0

    async def _gather(self) -> None:
        """Hold a part-full batch, up to batch_wait_ms, while fewer requests wait than the service held during
        the last batch (those clients are about to send again); a lone request is never held."""
        if not self.batch_wait_s or self.demand is None:
            return
        expected = self.demand.take_peak()
        deadline = time.monotonic() + self.batch_wait_s
        while len(self._waiting) < expected and self._queued_images < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        live = []
        for p in batch:
            if p.future.done():  # the client went away
                continue
            if now - p.queued_at > self.max_wait_s:
                p.future.set_exception(
                    Overloaded(f"waited {1000 * (now - p.queued_at):.0f} ms for the model, over serving.max_latency_ms")
                )
                continue
            live.append(p)
        # One model call per version asked for and per image shape and type: images that cannot be stacked
        # are never concatenated, so one request's odd input cannot fail (or stop) the others.
        groups: dict[tuple, list[_Pending]] = {}
        for p in live:
            groups.setdefault((p.arm, p.images.shape[1:], p.images.dtype.str), []).append(p)
        for (arm, _, _), group in groups.items():
            try:
                images = np.concatenate([p.images for p in group])
                results = await loop.run_in_executor(self._executor, self.score, images, arm)
                if len(results) != len(images):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(images)} images")
            except Exception as exc:  # every request of the group learns why; the loop goes on
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.on_batch(len(images))
            start = 0
            for p in group:
                if not p.future.done():
                    p.future.set_result(results[start : start + len(p.images)])
                start += len(p.images)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
