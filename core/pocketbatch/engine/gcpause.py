"""Pausing the cyclic garbage collector while a large round builds or reads state that stays alive.

The collector runs each time allocations outnumber deallocations by a threshold, and walks what is alive.
While 100,000 items start and wait in a round, or a job's 50,000 results are read, almost nothing is
freed and nothing forms a cycle, so it would walk the growing live set again and again for nothing: about
a quarter of the client-side time of both (bench/node_path.py, bench/batch.py). The pause covers only
those stretches; the collector is back on (if it was on) as soon as they end.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Below this many items a round's state is too small for the collector's walks to matter.
PAUSE_FROM = 1_000


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
