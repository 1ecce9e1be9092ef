"""asyncio helpers shared by the operator and the runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
