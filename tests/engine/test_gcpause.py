"""A round keeps the garbage collector off what it holds alive, and gives it back when it settles."""

import asyncio
import gc
import weakref

import pytest

from pocketbatch.engine import gcpause
from pocketbatch.engine.collector import map_parallel


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def nothing_frozen(monkeypatch):
    monkeypatch.setattr(gcpause, "FREEZE_FROM", 2)  # rounds this small freeze too, for the tests
    gc.unfreeze()
    yield
    gc.unfreeze()
    assert gcpause._rounds == 0


async def test_what_is_alive_when_a_round_starts_is_frozen_until_it_settles():
    cycle = Cycle()
    ref = weakref.ref(cycle)
    seen = []

    async def item(i):
        await asyncio.sleep(0.01)  # every item has started
        if i == 0:
            nonlocal cycle
            cycle = None  # garbage now, but only the collector can free a cycle
            gc.collect()
            seen.append((gc.get_freeze_count(), ref() is not None))
        return i

    assert await map_parallel(item, range(3)) == [0, 1, 2]
    frozen_during, alive_during = seen[0]
    assert frozen_during > 0 and alive_during  # frozen: the collector did not look at it
    assert gc.get_freeze_count() == 0  # thawed once the round settled
    gc.collect()
    assert ref() is None  # and then collected


async def test_a_bounded_round_freezes_nothing():
    counts = []

    async def item(i):
        await asyncio.sleep(0)
        counts.append(gc.get_freeze_count())

    await map_parallel(item, range(4), limit=2)
    assert counts == [0, 0, 0, 0]


async def test_a_round_below_freeze_from_freezes_nothing(monkeypatch):
    monkeypatch.setattr(gcpause, "FREEZE_FROM", 10_000)
    counts = []

    async def item(i):
        await asyncio.sleep(0)
        counts.append(gc.get_freeze_count())

    await map_parallel(item, range(3))
    assert counts == [0, 0, 0]


async def test_two_rounds_at_once_thaw_when_the_last_one_settles():
    first_done = asyncio.Event()
    after_first = []

    async def quick(i):
        await asyncio.sleep(0)

    async def slow(i):
        await first_done.wait()
        await asyncio.sleep(0)
        after_first.append(gc.get_freeze_count())

    async def first():
        await map_parallel(quick, range(2))
        first_done.set()

    await asyncio.gather(first(), map_parallel(slow, range(2)))
    assert all(count > 0 for count in after_first)  # the other round still held the frozen set
    assert gc.get_freeze_count() == 0


async def test_someone_elses_freeze_is_left_alone():
    gc.freeze()  # as a pre-fork server does before forking its workers
    theirs = gc.get_freeze_count()
    counts = []

    async def item(i):
        await asyncio.sleep(0)
        counts.append(gc.get_freeze_count())

    await map_parallel(item, range(2))
    assert max(counts) <= theirs  # nothing more frozen
    assert 0 < gc.get_freeze_count() <= theirs  # and not thawed


def test_the_freeze_at_import_is_thawed_with_a_rounds():
    gcpause.freeze_long_lived()
    assert gc.get_freeze_count() > 0

    async def item(i):
        await asyncio.sleep(0)

    asyncio.run(map_parallel(item, range(2)))
    assert gc.get_freeze_count() == 0
