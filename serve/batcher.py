"""Dynamic batching: the queries of concurrent requests scored together.

Requests wait in a bounded queue; a worker takes the first, then whatever arrives within
`max_wait` seconds up to `max_batch` queries, and runs them as one retriever call in a thread
(the event loop keeps accepting requests meanwhile). A full queue refuses at once (`QueueFull`,
HTTP 503 with Retry-After) instead of growing without bound. Requests asking for different k are
answered from one call at the largest k (the top-k of a ranking is the prefix of its top-K);
different shortlists (or image queries of different region counts) run as separate calls. When
a batched call fails on a user error (one request's image that its encoder turns into NaN), each
request of that batch is run alone, so only the bad one fails.

Written here rather than taken from a library: Ray Serve's `@serve.batch` does this inside a Ray
cluster, and no small ASGI library batches calls into a synchronous, thread-safe runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scan_deploy.errors import UserError

Run = Callable[[Sequence[Any], int, int | None], list[list[Any]]]  # (queries, k, shortlist)


class QueueFull(Exception):
    """The batcher's queue holds `max_queue` requests: the caller should retry later."""


@dataclass
class _Pending:
    queries: Sequence[Any]
    k: int
    shortlist: int | None
    key: Any  # requests of one key run in one call (the shortlist, the region count)
    future: asyncio.Future = field(repr=False)


class Batcher:
    """One kind of query (text or image) batched for `run`; `start()` inside the event loop,
    `close()` to stop (pending requests get an error)."""

    def __init__(
        self,
        run: Run,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        self._run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._observe = observe or (lambda queries, depth: None)
        self._worker: asyncio.Task | None = None
        self._taken: list[_Pending] = []  # the batch the worker holds, answered or not

    @property
    def depth(self) -> int:
        """Requests waiting."""
        return self._queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            self._taken.append(self._queue.get_nowait())
        for pending in self._taken:  # in flight, taken but not yet run, or waiting
            _settle(pending, QueueFull("the server is shutting down"))
        self._taken = []

    async def submit(
        self, queries: Sequence[Any], k: int, shortlist: int | None, key: Any = None
    ) -> list[list[Any]]:
        """The hits of each query, once its batch has run; QueueFull when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(queries, k, shortlist, (shortlist, key), future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting") from None
        return await future

    async def _serve(self) -> None:
        while True:
            self._taken = []
            batch = await self._collect()
            self._observe(sum(len(p.queries) for p in batch), self.depth)
            for _, group in itertools.groupby(
                sorted(batch, key=lambda p: repr(p.key)), key=lambda p: repr(p.key)
            ):
                await self._answer(list(group))

    async def _collect(self) -> list[_Pending]:
        """The first waiting request, then those arriving within max_wait, up to max_batch
        queries."""
        batch = self._taken
        batch.append(await self._queue.get())
        count = len(batch[0].queries)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while count < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                pending = await asyncio.wait_for(self._queue.get(), left)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on, not in 3.10
                break
            batch.append(pending)
            count += len(pending.queries)
        return batch

    async def _answer(self, group: list[_Pending]) -> None:
        k = max(p.k for p in group)
        queries = [q for p in group for q in p.queries]
        try:
            results = await asyncio.to_thread(self._run, queries, k, group[0].shortlist)
        except UserError as exc:
            if len(group) == 1:
                _settle(group[0], exc)
                return
            for pending in group:  # only the request at fault fails
                if not pending.future.done():
                    await self._answer([pending])
            return
        except Exception as exc:  # a bug: every request of the batch is told
            for pending in group:
                _settle(pending, exc)
            return
        start = 0
        for pending in group:
            stop = start + len(pending.queries)
            _settle(pending, [hits[: pending.k] for hits in results[start:stop]])
            start = stop


def _settle(pending: _Pending, outcome: Any) -> None:
    if pending.future.done():  # the client went away
        return
    if isinstance(outcome, BaseException):
        pending.future.set_exception(outcome)
    else:
        pending.future.set_result(outcome)
