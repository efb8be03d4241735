"""Keeping the cyclic garbage collector off what a round holds alive.

The collector runs each time allocations outnumber deallocations by a threshold, and walks what is alive.
A round's items all stay alive until it settles: 100,000 waiting items are about two million objects,
which it would walk again and again for nothing (a fifth of the node path's time, bench/node_path.py).
So:
- while an unbounded round's items start, or a job's results are read, the collector is paused
  (`cyclic_gc_paused`): almost nothing is freed then and nothing forms a cycle;
- once an unbounded round's items (at least FREEZE_FROM) have started, what is alive is frozen
  (`frozen_until_settled`) until the round settles: the collector skips it, reference counting still
  frees it, and it is thawed when the last such round ends, so a cycle that became garbage among it
  meanwhile is collected then.

pocketbatch freezes what is alive at import too (__init__.py); a round's thaw ends that freeze as well.
If something else froze objects before a round (a pre-fork server's gc.freeze()), rounds leave the frozen
set alone; one frozen while a round holds its freeze is thawed with it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Below this many items a round's state is too small for the collector's walks to matter.
PAUSE_FROM = 1_000

# Below this many items freezing does not pay: the check for someone else's freeze walks the frozen set.
FREEZE_FROM = 10_000

_lock = threading.Lock()  # rounds of several threads' loops share the one collector
_rounds = 0  # rounds holding the frozen set
# How many frozen objects are pocketbatch's while no round holds any: frozen objects still die, so more
# than this is someone else's freeze. (Counting walks them all, so it is done only then.)
_ours = 0


@contextmanager
def cyclic_gc_paused(items: int = PAUSE_FROM) -> Iterator[None]:
    """Pause the collector for the block when it concerns at least PAUSE_FROM items (by default, always)."""
    enabled = gc.isenabled()
    if items >= PAUSE_FROM:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def frozen_until_settled(items: int) -> Iterator[Callable[[], None]]:
    """Gives `freeze()`: called once a round's items have started, it freezes what is alive until the block
    ends (and every other round that froze with it has ended too); nothing below FREEZE_FROM items."""
    frozen = False

    def freeze() -> None:
        nonlocal frozen
        global _rounds
        with _lock:
            if frozen or items < FREEZE_FROM or (_rounds == 0 and gc.get_freeze_count() > _ours):
                return
            gc.freeze()
            _rounds, frozen = _rounds + 1, True

    try:
        yield freeze
    finally:
        if frozen:
            _thaw()


def _thaw() -> None:
    global _rounds, _ours
    with _lock:
        _rounds -= 1
        if _rounds == 0:
            gc.unfreeze()
            _ours = 0


def freeze_long_lived() -> None:
    """Collect once, then freeze what is left: at import, what the SDKs leave lives as long as the process."""
    global _ours
    with _lock:
        gc.collect()
        gc.freeze()
        _ours = gc.get_freeze_count()
