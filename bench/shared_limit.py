"""Several processes against one key's limit: pocketbatch with the limit shared through Redis
(POCKETBATCH_REDIS_URL), the same processes without Redis, and LiteLLM's Router sharing its rpm through
the same Redis.

    .venv/bin/python bench/shared_limit.py                    # 4 processes x 250 calls, 50 req/s
    .venv/bin/python bench/shared_limit.py --processes 2 --calls 100 --only redis

Each process is the seed's node in a fresh interpreter (bench/user_flow.py), started together, against
one loopback server (bench/servers.py: 50 req/s, burst 5, 50 ms a call, 429 with Retry-After beyond, no
rate-limit headers). "configured": POCKETBATCH_OPENAI_RPM at 0.95 of the server's limit in every process
(LiteLLM: its Router's rpm likewise); "nothing configured": each process learns. The share of the limit
is the server's accepted requests over the span from the first process's start to the last one's end.
Also: the median round trip of one shared acquire (the Lua reserve script) on loopback Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from servers import LoopbackServer  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    contestant: str  # bench/user_flow.py's: node | litellm
    redis: bool
    configured: bool


CASES = (
    Case("pocketbatch, Redis, configured", "node", True, True),
    Case("pocketbatch, Redis, nothing configured", "node", True, False),
    Case("pocketbatch, no Redis, configured", "node", False, True),
    Case("pocketbatch, no Redis, nothing configured", "node", False, False),
    Case("LiteLLM Router, rpm through Redis", "litellm", True, True),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.port = free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", self.dir], stdout=subprocess.DEVNULL)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.01)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_case(case: Case, server: LoopbackServer, redis: Redis, args) -> dict:
    server.reset()
    redis.flush()
    time.sleep(0.5)  # the server's bucket is full again
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POCKETBATCH_", "BENCH_")) and not k.endswith(("_API_KEY", "_BASE_URL"))
    }
    env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=server.base_url, POCKETBATCH_MODE="concurrent")
    env.update(POCKETBATCH_JOURNAL="off", LITELLM_LOG="ERROR")
    if case.configured and case.contestant == "node":
        env["POCKETBATCH_OPENAI_RPM"] = str(round(0.95 * args.rate * 60))
    if case.redis:
        env["POCKETBATCH_REDIS_URL" if case.contestant == "node" else "BENCH_REDIS_URL"] = redis.url
    command = [sys.executable, str(HERE / "user_flow.py"), case.contestant, "--calls", str(args.calls)]
    command += ["--rate", str(args.rate)]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(args.processes)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{case.name} failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    s = server.stats()
    start = min(o["started_at"] for o in outs)
    span = max(o["started_at"] + o["seconds"] for o in outs) - start
    return {
        "case": case.name,
        "calls": args.calls * args.processes,
        "lost": sum(o["lost"] for o in outs),
        "requests": s["requests"],
        "rate_limited": s["rate_limited"],
        "share_429": s["rate_limited"] / s["requests"] if s["requests"] else 0.0,
        "of_limit": s["ok"] / span / args.rate,
        "seconds": span,
    }


async def reserve_round_trip(url: str, n: int = 2000) -> float:
    """Median seconds of one shared acquire's Lua reserve on this Redis."""
    from pocketbatch.engine.shared_limits import SharedLimit

    shared = SharedLimit(url, "bench", "m", "")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await shared.reserve(1e9, 4, float("inf"), 1, 1)
        times.append(time.perf_counter() - t)
    await shared.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--calls", type=int, default=250, help="calls per process")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--only", choices=("redis", "no-redis", "litellm"), default=None)
    args = parser.parse_args()
    cases = [
        c
        for c in CASES
        if args.only is None
        or (args.only == "litellm" and c.contestant == "litellm")
        or (args.only == "redis" and c.redis and c.contestant == "node")
        or (args.only == "no-redis" and not c.redis)
    ]
    redis = Redis()
    try:
        print(f"{args.processes} processes x {args.calls} calls, one server at {args.rate:g} req/s")
        print("| case | lost | 429s | of the limit | time |")
        print("|---|---|---|---|---|")
        with LoopbackServer(rate=args.rate) as server:
            for case in cases:
                r = run_case(case, server, redis, args)
                print(
                    f"| {r['case']} | {r['lost']}/{r['calls']} | {r['rate_limited']} ({r['share_429']:.1%}) "
                    f"| **{r['of_limit']:.2f}** | {r['seconds']:.1f} s |",
                    flush=True,
                )
        median = asyncio.run(reserve_round_trip(redis.url))
        print(f"shared acquire (one Lua reserve on loopback Redis): median {median * 1000:.2f} ms")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
