"""pocketbatch.ray.map_flow with 1, 2 and 4 actors sharing one limit through Redis, and Ray's own LLM HTTP
stage (ray.data.llm HttpRequestProcessorConfig), against one loopback OpenAI-compatible server, on the
same rows, in one run.

    python bench/ray.py [--rows 1500] [--rate 50] [--batch-size 250]

Needs the `ray` extra, a redis-server on PATH, and aiohttp for Ray's HTTP stage (`pip install aiohttp`).

For each contestant: rows out and rows lost (a row whose answer is an error, or a failed run), the
server's 429s, rows per second end to end (actor start-up included), and the share of the server's
limit its answered requests took from the first request to the last answer. pocketbatch runs with the
limit configured as its user would (POCKETBATCH_OPENAI_RPM = the server's, TPM unlimited: the server limits
requests only); Ray's stage gets qps = the server's limit, its natural setting, and as many actors as
pocketbatch's 2-actor run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named ray.py: keep its own folder off the path, so `import ray` finds Ray.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import ray  # noqa: E402
import ray.data  # noqa: E402

from bench.servers import LoopbackServer  # noqa: E402


def prompt(i: int) -> str:
    return f"Summarize item {i} in one word."


def make_flow():
    from pocketbatch import AsyncParallelBatchNode, call_llm_async

    class Summaries(AsyncParallelBatchNode):  # the seed's node, on the rows of a Ray batch
        async def prep_async(self, shared):
            return [row["text"] for row in shared["rows"]]

        async def exec_async(self, text):
            return await call_llm_async(text)

        async def exec_fallback_async(self, prep_res, exc):
            return exc

        async def post_async(self, shared, prep_res, exec_res_list):
            shared["results"] = exec_res_list

    return Summaries()


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", directory], stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.01)
    sys.exit("redis-server did not start")


def books(server: LoopbackServer, rate: float) -> dict:
    stats = server.stats()
    times = stats.pop("ok_times")
    span = (max(times) - min(times)) if len(times) > 1 else 0
    # ok_times are the server's monotonic clock; the share counts answered requests over their own span
    return stats | {"share": (len(times) - 1) / span / rate if span else 0.0}


def run_pocketbatch(ds, actors: int, batch_size: int):
    from pocketbatch.ray import map_flow

    rows = map_flow(ds, make_flow, batch_size=batch_size, actors=actors).take_all()
    lost = sum(1 for r in rows if r.get("error") or r.get("text") != f"ok: {r['text_in']}")
    return len(rows), lost


def run_ray_http(ds, server: LoopbackServer, rate: float, actors: int, batch_size: int):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=f"{server.base_url}/chat/completions",
        headers={"Authorization": "Bearer sk-bench"},
        qps=int(rate),
        max_retries=8,
        concurrency=actors,
        batch_size=64,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "payload": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": row["text"]}]}
        },
        postprocess=lambda row: {
            "text_in": row["text_in"],
            "text": row["http_response"]["choices"][0]["message"]["content"],
        },
    )
    rows = processor(ds).take_all()
    lost = sum(1 for r in rows if r.get("text") != f"ok: {r['text_in']}")
    return len(rows), lost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--default-tpm",
        action="store_true",
        help="leave the OpenAI plugin's default TPM in force instead of POCKETBATCH_OPENAI_TPM=0",
    )
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4], help="pocketbatch's runs")
    parser.add_argument("--no-ray-stage", action="store_true", help="leave out Ray's own HTTP stage")
    args = parser.parse_args()
    n, rate = args.rows, args.rate

    redis_proc, redis_url = start_redis(tempfile.mkdtemp())
    results = []
    try:
        with LoopbackServer(rate=rate, echo=True) as server:
            os.environ.update(
                OPENAI_API_KEY="sk-bench",
                OPENAI_BASE_URL=server.base_url,
                POCKETBATCH_REDIS_URL=redis_url,
                POCKETBATCH_OPENAI_RPM=str(int(rate * 60)),
                POCKETBATCH_MODE="concurrent",
                POCKETBATCH_JOURNAL="off",
                RAY_AUTH_MODE="disabled",
            )
            if not args.default_tpm:
                os.environ["POCKETBATCH_OPENAI_TPM"] = "0"  # the server limits requests only
            # Logical CPUs: 4 actors of one CPU each must fit whatever the machine has.
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            items = [{"id": i, "text": prompt(i), "text_in": prompt(i)} for i in range(n)]
            tpm = ", default TPM" if args.default_tpm else ""
            contestants = [(f"pocketbatch map_flow, {a} actor{'s' * (a > 1)}{tpm}", a) for a in args.actors]
            if not args.no_ray_stage:
                contestants.append(("Ray HttpRequestProcessorConfig, 2 actors", 0))
            for name, actors in contestants:
                import redis

                redis.Redis.from_url(redis_url).flushall()
                server.reset()
                ds = ray.data.from_items(items, override_num_blocks=max(1, n // args.batch_size))
                start = time.perf_counter()
                try:
                    if actors:
                        out, lost = run_pocketbatch(ds, actors, args.batch_size)
                    else:
                        out, lost = run_ray_http(ds, server, rate, 2, args.batch_size)
                    failure = None
                except Exception as e:  # a contestant that fails the whole dataset loses every row
                    out, lost, failure = 0, n, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                seconds = time.perf_counter() - start
                b = books(server, rate)
                row = {
                    "contestant": name,
                    "rows": n,
                    "out": out,
                    "lost": lost,
                    "requests": b["requests"],
                    "429s": b["rate_limited"],
                    "seconds": round(seconds, 1),
                    "rows_per_s": round(max(0, out - lost) / seconds, 1),
                    "share_of_limit": round(b["share"], 2),
                    "failure": failure,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        redis_proc.kill()
    print()
    print("| contestant | lost | 429s (% of requests) | rows/s (start-up included) | share of the limit |")
    print("|---|---|---|---|---|")
    for r in results:
        share = f"{100 * r['429s'] / r['requests']:.1f}%" if r["requests"] else "-"
        print(
            f"| {r['contestant']} | {r['lost']}/{r['rows']} | {r['429s']} ({share}) | {r['rows_per_s']} "
            f"| {r['share_of_limit']} |"
        )


if __name__ == "__main__":
    main()
