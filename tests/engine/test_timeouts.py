import asyncio
import sys

import pytest

from pocketbatch.engine.timeouts import within
from pocketbatch.errors import TransientError


async def answer(after: float, value: str = "ok") -> str:
    await asyncio.sleep(after)
    return value


async def test_a_call_in_time_returns_its_answer():
    assert await within(answer(0), 5) == "ok"


async def test_a_call_past_its_timeout_is_a_transient_error_and_the_task_goes_on():
    with pytest.raises(TransientError, match=r"timed out after 0.05s"):
        await within(answer(10), 0.05)
    if sys.version_info >= (3, 11):
        assert asyncio.current_task().cancelling() == 0  # the timeout's cancellation was taken back
    assert await answer(0, "next") == "next"  # not cancelled again at its next await


async def test_calls_sharing_a_timer_each_get_their_own_outcome():
    async def one(i: int) -> str | Exception:
        try:
            return await within(answer(10 if i % 2 else 0.001, f"item {i}"), 0.1)
        except TransientError as e:
            return e

    outcomes = await asyncio.gather(*(one(i) for i in range(40)))
    assert outcomes[::2] == [f"item {i}" for i in range(0, 40, 2)]
    assert all(isinstance(o, TransientError) for o in outcomes[1::2])


async def test_a_cancellation_from_outside_stays_a_cancellation():
    task = asyncio.ensure_future(within(answer(10), 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_outside_a_running_loop_it_is_a_runtime_error():
    coro = answer(0)
    with pytest.raises(RuntimeError):
        within(coro, 1).send(None)
    coro.close()
