"""One process of the shared-limit tests: sends N requests through the engine to a ServerProvider and
writes the books (when each request reached the "server", by the real clock) as JSON.

python shared_worker.py N OUT.json [--skew SECONDS] [--429 RETRY_AFTER]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import FAST, ServerProvider, requests
from pocketbatch.engine import concurrent
from pocketbatch.engine.limits import limiter_for
from pocketbatch.errors import RateLimitError

real_time = time.time


async def main(n: int, skew: float, retry_after: float | None) -> dict:
    if skew:  # this process's clocks run `skew` seconds ahead; the books keep the real one
        monotonic, wall = time.monotonic, time.time
        time.monotonic = lambda: monotonic() + skew
        time.time = lambda: wall() + skew
    provider = ServerProvider()
    if retry_after is not None:
        too_many = RateLimitError("429", status=429, retry_after=retry_after)
        provider.fail = {f"item {i}": too_many for i in range(n)}
    results = await concurrent.run_all(provider, requests(n), policy=FAST)
    limiter = limiter_for(provider, "m")
    await asyncio.gather(*limiter._tasks)  # writes to Redis still under way
    offset = real_time() - time.monotonic()
    return {
        "hits": [h.t + offset for h in provider.hits],
        "statuses": [h.status for h in provider.hits],
        "ok": sum(1 for r in results if not isinstance(r, Exception)),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    skew = float(args[args.index("--skew") + 1]) if "--skew" in args else 0.0
    retry = float(args[args.index("--429") + 1]) if "--429" in args else None
    Path(args[1]).write_text(json.dumps(asyncio.run(main(int(args[0]), skew, retry))))
