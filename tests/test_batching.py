"""The serving process's adaptive batcher: requests that wait while the model is busy are scored together."""

import asyncio
import threading

import numpy as np
import pytest

from dfdetect.batching import BatcherDead, Demand, MicroBatcher, Overloaded


class GatedModel:
    """Scores an image as its first pixel; the first call waits for `release` so others can queue."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[tuple[int, str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, images: np.ndarray, arm: str) -> list:
        self.calls.append((len(images), arm))
        self.started.set()
        self.release.wait(5)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise ValueError("model failed")
        return [(int(img[0, 0, 0]), arm) for img in images]


def images(*values: int, side: int = 4) -> np.ndarray:
    return np.stack([np.full((side, side, 3), v, np.uint8) for v in values])


async def busy_then(model: GatedModel, batcher: MicroBatcher, requests: list[tuple[np.ndarray, str]]):
    """One request occupies the model; `requests` queue meanwhile; then the model is released."""
    first = asyncio.ensure_future(batcher.submit(images(0)))
    await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 5)
    rest = [asyncio.ensure_future(batcher.submit(imgs, arm)) for imgs, arm in requests]
    await asyncio.sleep(0.05)
    model.release.set()
    return await first, await asyncio.gather(*rest, return_exceptions=True)


def test_requests_queued_while_the_model_is_busy_share_one_call_and_get_their_own_results():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)
    first, rest = asyncio.run(busy_then(model, batcher, [(images(v), "primary") for v in range(1, 6)]))
    assert model.calls == [(1, "primary"), (5, "primary")]
    assert first == [(0, "primary")]
    assert rest == [[(v, "primary")] for v in range(1, 6)]


def test_batches_respect_max_batch_size_and_keep_a_requests_images_together():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=4, max_latency_ms=5000)
    requests = [
        (images(1), "primary"),
        (images(2, 3), "primary"),
        (images(4, 5), "primary"),
        (images(*range(6, 12)), "primary"),
    ]
    _, rest = asyncio.run(busy_then(model, batcher, requests))
    # 1 + 2 fit in 4; the pair 4, 5 would overflow, so it opens the next batch; 6 images run alone
    assert [n for n, _ in model.calls] == [1, 3, 2, 6]
    assert [v for v, _ in rest[3]] == list(range(6, 12))


def test_each_arm_is_scored_by_its_own_call():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)
    _, rest = asyncio.run(
        busy_then(model, batcher, [(images(1), "primary"), (images(2), "challenger"), (images(3), "primary")])
    )
    assert sorted(model.calls[1:]) == [(1, "challenger"), (2, "primary")]
    assert rest == [[(1, "primary")], [(2, "challenger")], [(3, "primary")]]


def test_a_request_that_waited_past_max_latency_is_refused_as_overloaded():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=10)
    _, rest = asyncio.run(busy_then(model, batcher, [(images(1), "primary")]))
    assert isinstance(rest[0], Overloaded) and "max_latency_ms" in str(rest[0])
    assert model.calls == [(1, "primary")]  # never reached the model


def test_a_failing_call_fails_its_requests_and_the_batcher_goes_on():
    model = GatedModel(fail_on=2)
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)

    async def scenario():
        first, rest = await busy_then(model, batcher, [(images(1), "primary"), (images(2), "primary")])
        after = await batcher.submit(images(7))
        return first, rest, after

    first, rest, after = asyncio.run(scenario())
    assert first == [(0, "primary")]
    assert all(isinstance(r, ValueError) for r in rest)
    assert after == [(7, "primary")]


def test_an_idle_batcher_answers_a_lone_request_at_once():
    model = GatedModel()
    model.release.set()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)
    assert asyncio.run(batcher.submit(images(9))) == [(9, "primary")]
    assert model.calls == [(1, "primary")]
    batcher.close()


@pytest.mark.parametrize("n", [1, 3])
def test_results_keep_request_order_within_a_batch(n):
    model = GatedModel()
    model.release.set()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(images(*range(10 * k, 10 * k + n))) for k in range(5)))

    out = asyncio.run(scenario())
    assert [[v for v, _ in r] for r in out] == [list(range(10 * k, 10 * k + n)) for k in range(5)]


def test_requests_of_different_image_sizes_queued_together_are_each_answered_and_the_batcher_goes_on():
    """Two concurrent /score calls with other sizes once killed the loop (np.concatenate outside the try)."""
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=5000)

    async def scenario():
        first, rest = await busy_then(
            model,
            batcher,
            [(images(1, side=4), "primary"), (images(2, side=9), "primary"), (images(3, side=4), "primary")],
        )
        after = await batcher.submit(images(5, side=6))
        return first, rest, (after, batcher.alive)

    first, rest, (after, alive) = asyncio.run(scenario())
    assert rest == [[(1, "primary")], [(2, "primary")], [(3, "primary")]]
    assert sorted(model.calls[1:3]) == [(1, "primary"), (2, "primary")]  # one call per shape
    assert after == [(5, "primary")] and alive


def test_a_batcher_whose_loop_died_is_not_alive_fails_what_was_queued_and_refuses_new_requests():
    model = GatedModel()
    calls = []

    def on_batch(n):
        calls.append(n)
        raise KeyError("metrics hook broke")  # outside the per-group handler: stands for a bug in the loop

    batcher = MicroBatcher(model, max_batch_size=1, max_latency_ms=5000, on_batch=on_batch)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(images(0)))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(images(1)))]
        await asyncio.sleep(0.05)
        model.release.set()
        first, *rest = await asyncio.gather(first, *rest, return_exceptions=True)
        return first, rest, batcher.alive

    first, rest, alive = asyncio.run(scenario())
    assert isinstance(first, BatcherDead) and isinstance(rest[0], BatcherDead) and not alive
    with pytest.raises(BatcherDead, match="restart"):
        asyncio.run(batcher.submit(images(2)))


def test_a_full_queue_refuses_at_once_as_overloaded():
    model = GatedModel()
    batcher = MicroBatcher(model, max_batch_size=2, max_latency_ms=5000, max_queued_images=3)
    _, rest = asyncio.run(
        busy_then(model, batcher, [(images(1, 2), "primary"), (images(3), "primary"), (images(4), "primary")])
    )
    assert rest[0] == [(1, "primary"), (2, "primary")] and rest[1] == [(3, "primary")]
    assert isinstance(rest[2], Overloaded) and "queued" in str(rest[2])


async def closed_loop(batcher: MicroBatcher, demand: Demand, clients: int, rounds: int) -> list:
    """`clients` callers that each send `rounds` requests one after the other, the way a load generator
    does; the service holds each request from its body to its answer (`with demand`). Client k sends its
    next request k x 10 ms after its answer, so without a hold the batches would split."""

    async def client(k: int) -> list:
        answers = []
        for r in range(rounds):
            with demand:
                answers.append(await batcher.submit(images(10 * r + k)))
            await asyncio.sleep(0.01 * k)
        return answers

    return await asyncio.gather(*(client(k) for k in range(clients)))


@pytest.mark.parametrize("batch_wait_ms, calls", [(0, None), (2000, [4, 4, 4])])
def test_a_free_model_holds_a_part_full_batch_for_the_clients_it_just_served(batch_wait_ms, calls):
    model = GatedModel()
    model.release.set()
    demand = Demand()
    batcher = MicroBatcher(model, 32, max_latency_ms=5000, batch_wait_ms=batch_wait_ms, demand=demand)
    answers = asyncio.run(closed_loop(batcher, demand, clients=4, rounds=3))
    assert answers == [[[(10 * r + k, "primary")] for r in range(3)] for k in range(4)]
    sizes = [n for n, _ in model.calls]
    if calls is None:  # without the hold, the staggered clients are scored apart
        assert len(sizes) > 3 and sizes[0] == 4
    else:
        assert sizes == calls
    assert demand.now == 0


def test_a_lone_client_is_never_held():
    model = GatedModel()
    model.release.set()
    demand = Demand()
    batcher = MicroBatcher(model, 32, max_latency_ms=5000, batch_wait_ms=4000, demand=demand)

    async def scenario():  # a hold would take 4 s a request: the deadline is far below that
        return await asyncio.wait_for(closed_loop(batcher, demand, clients=1, rounds=3), timeout=3)

    assert asyncio.run(scenario()) == [[[(r * 10, "primary")] for r in range(3)]]
    assert model.calls == [(1, "primary")] * 3


def test_the_hold_ends_at_batch_wait_ms_when_the_expected_clients_do_not_come():
    model = GatedModel()
    model.release.set()
    demand = Demand()
    batcher = MicroBatcher(model, 32, max_latency_ms=5000, batch_wait_ms=50, demand=demand)

    async def scenario():
        with demand, demand:  # two requests held that never reach the model (refused before it, say)
            with demand:
                return await asyncio.wait_for(batcher.submit(images(5)), timeout=3)

    assert asyncio.run(scenario()) == [(5, "primary")]
    assert model.calls == [(1, "primary")] and demand.now == 0


def test_a_hold_as_long_as_max_latency_is_refused():
    with pytest.raises(ValueError, match="batch_wait_ms"):
        MicroBatcher(GatedModel(), 32, max_latency_ms=100, batch_wait_ms=100)
