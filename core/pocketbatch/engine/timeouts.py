"""POCKETBATCH_TIMEOUT for every attempt, with one timer for many calls instead of one timer each.

asyncio.timeout arms a TimerHandle per call, and the loop orders its timers with a heap whose comparisons
run in Python: at 100,000 calls that was about 10 µs a call, more than the rest of a call's bookkeeping.
Here the calls whose deadlines fall in the same slice (1/16 of the timeout) share one timer, which cancels
the tasks still inside their call when it fires; the call then raises TransientError, as a timed-out
attempt did before. A call may so run up to 1/16 of its timeout longer than asked, never shorter.
"""

from __future__ import annotations

import asyncio
import math
import sys
import weakref
from collections.abc import Awaitable
from typing import TypeVar

from ..errors import TransientError

T = TypeVar("T")

SLICES = 16  # deadline slices per timeout: how much later than asked a call may be stopped (1/16)


class _Slice:
    """The calls whose deadlines fall in one slice, and the one timer that stops them."""

    __slots__ = ("expired", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.expired: set[asyncio.Task] = set()


_slices: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[float, int], _Slice]] = (
    weakref.WeakKeyDictionary()
)
_last: tuple[asyncio.AbstractEventLoop, dict[tuple[float, int], _Slice]] | None = None  # the loop used last


def _expire(loop_slices: dict[tuple[float, int], _Slice], key: tuple[float, int]) -> None:
    piece = loop_slices.pop(key)
    piece.expired = piece.tasks
    piece.tasks = set()
    for task in piece.expired:
        task.cancel()


async def within(aw: Awaitable[T], seconds: float) -> T:
    """Await `aw`, or raise TransientError("timed out after …") once `seconds` have passed."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("a timeout needs a task, as asyncio.timeout does")
    loop = task.get_loop()
    global _last
    last = _last  # a WeakKeyDictionary lookup costs more than the rest of this
    if last is not None and last[0] is loop:
        loop_slices = last[1]
    else:
        loop_slices = _slices.get(loop)
        if loop_slices is None:
            loop_slices = _slices[loop] = {}
        _last = (loop, loop_slices)
    width = seconds / SLICES
    key = (seconds, math.ceil((loop.time() + seconds) / width))
    piece = loop_slices.get(key)
    if piece is None:
        piece = loop_slices[key] = _Slice()
        loop.call_at(key[1] * width, _expire, loop_slices, key)
    piece.tasks.add(task)
    cancelling = task.cancelling() if sys.version_info >= (3, 11) else 0
    try:
        return await aw
    except asyncio.CancelledError:
        if task not in piece.expired:
            raise  # cancelled by someone else: theirs to handle
        piece.expired.discard(task)
        if sys.version_info >= (3, 11) and task.uncancel() > cancelling:
            raise  # cancelled from outside as well: that cancellation wins, as with asyncio.timeout
        raise TransientError(f"timed out after {seconds:g}s") from None
    finally:
        piece.tasks.discard(task)
