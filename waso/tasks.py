"""asyncio helpers shared by the operator and the runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any


async def first_of(*awaitables: Awaitable[Any]) -> Any:
    """Wait for the first awaitable to finish, cancel the rest, return its result (None if not the first)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    first = tasks[0]
    return first.result() if first in done else None


class Bounded:
    """Work started as it is decided, at most ``ahead`` unfinished at once; results (or exceptions) in the order
    they finish. Leaving the ``async with`` waits for all of it, or cancels it when the block failed.

    A pass decides ten thousand writes at once after a restart: each held its desired status until written,
    the operator's peak memory. Started as they come, only ``ahead`` are held, and the first is written at once.
    """

    def __init__(self, ahead: int) -> None:
        self._room = asyncio.Semaphore(ahead)
        self._running: set[asyncio.Task[Any]] = set()
        self.results: list[Any] = []
        self.started = 0

    async def start(self, work: Callable[[], Awaitable[Any]]) -> None:
        """Start ``work()`` once there is room (its coroutine is not even made before)."""
        await self._room.acquire()
        self.started += 1
        task = asyncio.ensure_future(work())
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        self._room.release()
        if not task.cancelled():
            self.results.append(task.exception() or task.result())

    async def __aenter__(self) -> Bounded:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            while error is None and self._running:
                await asyncio.wait(set(self._running))
        finally:
            left = list(self._running)  # the block failed, or this wait was cancelled: so is the work
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
