"""Group commit for async callers: many concurrent calls, one flush.

Each caller submits one item and awaits its own result. A writer takes every item waiting at that moment (up
to `max_group`) and hands them to `flush` in one call: while one flush is in flight the next group gathers,
so the group size follows the load with no timer, and a lone caller never waits for company.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What a flush gives each item of its group: the item's result, or the error that is the item's alone.
Flush = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class GroupWriter(Generic[T, R]):
    """max_group: most items one flush takes. writers: flushes that may run at once (one connection each)."""

    def __init__(self, flush: Flush[T, R], *, max_group: int, writers: int) -> None:
        if max_group < 1 or writers < 1:
            raise ValueError("max_group and writers must be at least 1")
        self._flush = flush
        self._max_group = max_group
        self._writers = writers
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []  # started by the first submit, on its event loop
        self._closed = False

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError("the group writer is closed")
        if self._wake is None:
            self._wake = asyncio.Event()
            self._tasks = [asyncio.create_task(self._write(self._wake)) for _ in range(self._writers)]
        result: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, result))
        self._wake.set()
        return await result

    async def close(self) -> None:
        """Stop the writers; items still waiting get a RuntimeError (the flushes in flight finish first)."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._waiting:
            _, result = self._waiting.popleft()
            if not result.done():
                result.set_exception(RuntimeError("the group writer closed"))

    async def _write(self, wake: asyncio.Event) -> None:
        while True:
            if not self._waiting:
                wake.clear()
                await wake.wait()
                continue
            group: list[tuple[T, asyncio.Future[R]]] = []
            while self._waiting and len(group) < self._max_group:
                item, result = self._waiting.popleft()
                if not result.cancelled():  # its caller gave up (client gone): nothing to write for it
                    group.append((item, result))
            if not group:
                continue
            try:
                outcomes: Sequence[R | BaseException] = await asyncio.shield(self._flush([i for i, _ in group]))
            except asyncio.CancelledError:
                for _, result in group:
                    if not result.done():
                        result.set_exception(RuntimeError("the group writer closed"))
                raise
            except Exception as exc:  # the whole group failed alike (the store is down)
                outcomes = [exc] * len(group)
            for (_, result), outcome in zip(group, outcomes, strict=True):
                if result.done():
                    continue
                if isinstance(outcome, BaseException):
                    result.set_exception(outcome)
                else:
                    result.set_result(outcome)
