"""asyncio helpers: bounded work that is started as it is decided."""

from __future__ import annotations

import asyncio

import pytest

from waso.tasks import Bounded


def test_bounded_work_holds_at_most_ahead_unfinished_and_collects_every_result() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        unfinished = 0
        most = 0

        async def work(value: int) -> int:
            nonlocal unfinished, most
            unfinished += 1
            most = max(most, unfinished)
            await gate.wait()
            unfinished -= 1
            if value == 3:
                raise ValueError("three")
            return value

        async with Bounded(2) as bounded:
            await bounded.start(lambda: work(1))
            await bounded.start(lambda: work(2))
            blocked = asyncio.ensure_future(bounded.start(lambda: work(3)))
            await asyncio.sleep(0)  # one turn of the loop (no clock): the third start runs until it waits for room
            assert not blocked.done()  # no room until one finishes
            gate.set()
            await blocked
            await bounded.start(lambda: work(4))
        assert most == 2
        assert sorted(r for r in bounded.results if isinstance(r, int)) == [1, 2, 4]
        assert [str(r) for r in bounded.results if isinstance(r, ValueError)] == ["three"]
        assert bounded.started == 4

    asyncio.run(scenario())


def test_a_failed_block_cancels_the_work_it_started() -> None:
    async def scenario() -> asyncio.Event:
        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        async def failing_pass() -> None:
            async with Bounded(4) as bounded:
                await bounded.start(forever)
                await asyncio.sleep(0)  # one turn of the loop (no clock): the work has started
                raise RuntimeError("the pass failed")

        with pytest.raises(RuntimeError):
            await failing_pass()
        return cancelled

    assert asyncio.run(scenario()).is_set()
