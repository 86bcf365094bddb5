"""The batcher alone, on a fake retriever call: batching within the wait, k per request, keys
apart, the bad request alone failing, a full queue refusing, closing."""

import asyncio
import threading

import pytest
from scan_deploy.serve.batcher import Batcher, QueueFull

from scan_deploy.errors import UserError


class FakeRun:
    """Hits of query q are [q*10, q*10+1, ...] (k of them); records each call."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[list, int, int | None]] = []
        self.fail_on, self.gate = fail_on, gate

    def __call__(self, queries, k, shortlist):
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append((list(queries), k, shortlist))
        if self.fail_on in queries:
            raise UserError(f"query {self.fail_on}: bad")
        return [[q * 10 + i for i in range(k)] for q in queries]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_concurrent_requests_run_as_one_call_and_get_their_own_k():
    fake = FakeRun()

    async def main():
        batcher = Batcher(fake, max_batch=16, max_wait=0.2, max_queue=8)
        batcher.start()
        answers = await asyncio.gather(
            batcher.submit([1, 2], 2, None),
            batcher.submit([3], 4, None),
            batcher.submit([4], 1, None),
        )
        await batcher.close()
        return answers

    answers = run(main())
    assert answers == [[[10, 11], [20, 21]], [[30, 31, 32, 33]], [[40]]]
    assert fake.calls == [([1, 2, 3, 4], 4, None)]  # one call at the largest k


def test_max_batch_and_keys_split_the_calls():
    fake = FakeRun()

    async def main():
        batcher = Batcher(fake, max_batch=2, max_wait=0.2, max_queue=8)
        batcher.start()
        await asyncio.gather(
            batcher.submit([1], 1, None),
            batcher.submit([2], 1, 50),  # another shortlist: another call
            batcher.submit([3], 1, None),  # past max_batch: the next batch
        )
        await batcher.close()

    run(main())
    assert sorted(map(str, fake.calls)) == sorted(
        map(str, [([1], 1, None), ([2], 1, 50), ([3], 1, None)])
    )


def test_a_bad_request_fails_alone():
    fake = FakeRun(fail_on=2)

    async def main():
        batcher = Batcher(fake, max_batch=16, max_wait=0.2, max_queue=8)
        batcher.start()
        results = await asyncio.gather(
            batcher.submit([1], 1, None), batcher.submit([2], 1, None), return_exceptions=True
        )
        await batcher.close()
        return results

    good, bad = run(main())
    assert good == [[10]]
    assert isinstance(bad, UserError) and str(bad) == "query 2: bad"


def test_a_full_queue_refuses_at_once_and_close_fails_the_waiting():
    gate = threading.Event()  # holds the first call in its thread
    fake = FakeRun(gate=gate)

    async def main():
        batcher = Batcher(fake, max_batch=1, max_wait=0, max_queue=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1], 1, None))
        await asyncio.sleep(0.05)  # the worker took it and waits on the gate
        second = asyncio.ensure_future(batcher.submit([2], 1, None))  # queued
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="1 requests are waiting"):
            await batcher.submit([3], 1, None)
        assert batcher.depth == 1
        gate.set()
        assert await first == [[10]]
        assert await second == [[20]]
        blocked = threading.Event()
        fake.gate = blocked
        third = asyncio.ensure_future(batcher.submit([4], 1, None))
        fourth = asyncio.ensure_future(batcher.submit([5], 1, None))
        await asyncio.sleep(0.05)
        await batcher.close()
        blocked.set()
        return await asyncio.gather(third, fourth, return_exceptions=True)

    third, fourth = run(main())
    assert isinstance(third, QueueFull) and isinstance(fourth, QueueFull)  # in flight, waiting
    assert str(third) == "the server is shutting down"
