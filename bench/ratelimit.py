"""Calls against a server-side rate limit: how many items each way loses, how many 429s it draws, and what
share of the limit it achieves.

    .venv/bin/python bench/ratelimit.py                   # 500 calls, 50 req/s, every case and contestant
    .venv/bin/python bench/ratelimit.py --calls 1000 --rate 100 --only pocketbatch

Servers: an in-process fake provider (only the engine is measured) and a loopback HTTP server on
127.0.0.1 speaking the OpenAI chat completions API (token bucket of `--rate` a second, burst 5, 50 ms
latency, 429 with `retry-after-ms`; with `x-ratelimit-*` headers in the "headers" case).

Cases: the limit configured (POCKETBATCH_<PROVIDER>_RPM = the server's limit); nothing configured and the
server reporting its limit in headers; nothing configured and no headers (learning from 429s alone).
Without configuration pocketbatch starts from the provider's default (500 RPM, OpenAI's tier 1).

Contestants on the loopback server (each with a fresh SDK client):
- pocketbatch: `engine.concurrent.run_all` through the pocketbatch-openai plugin's OpenAIProvider (its
  SDK client has max_retries=0: the engine is the only retry layer);
- pocketflow: pocketflow 0.0.3's AsyncParallelBatchNode (plain gather) calling `AsyncOpenAI` with the SDK's
  default retries (2); `exec_fallback_async` returns the error, so a failed item is counted as lost
  instead of failing the node (which would lose all of them);
- semaphore: the LangChain-style `asyncio.Semaphore(16)` + gather, `AsyncOpenAI` with default retries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the SDK's httpx honours proxy variables
sys.path.insert(0, str(Path(__file__).parent))

import openai
import pocketflow
from servers import FakeServerProvider, LoopbackOpenAI

from pocketbatch import config
from pocketbatch.engine import concurrent, events
from pocketbatch.engine.limits import limiter_for, reset_limiters
from pocketbatch.providers import LLMRequest

CASES = ("configured", "headers", "429s")
MODEL = "gpt-4o-mini"


@dataclass
class Row:
    server: str
    case: str
    contestant: str
    calls: int
    lost: int
    requests: int
    rate_limited: int
    seconds: float
    ok_per_second: float
    limit: float
    learned_rpm: float | None = None

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def of_limit(self) -> float:
        return self.ok_per_second / self.limit


def prompts(n: int) -> list[str]:
    return [f"Summarize item {i} in one word." for i in range(n)]


def set_case(case: str, provider_name: str, rate: float) -> None:
    for name in [n for n in os.environ if n.startswith("POCKETBATCH_")]:
        del os.environ[name]
    if case == "configured":
        os.environ[f"POCKETBATCH_{provider_name.upper()}_RPM"] = str(round(rate * 60))
    config.reload()
    reset_limiters()  # every case learns from the provider's default, as a fresh process would


async def run_pocketbatch(provider, n: int, model: str) -> tuple[int, float, float]:
    requests = [LLMRequest([{"role": "user", "content": p}], model, max_tokens=16) for p in prompts(n)]
    start = time.perf_counter()
    with events.summarize() as summary:
        results = await concurrent.run_all(provider, requests)
    seconds = time.perf_counter() - start
    lost = sum(1 for r in results if isinstance(r, Exception))
    assert summary.ok == n - lost
    if hasattr(provider, "client"):  # the plugin's SDK client for this loop: close it before the loop ends
        await provider.client().close()
    return lost, seconds, limiter_for(provider, model).rpm


async def run_pocketflow(base_url: str, n: int) -> tuple[int, float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")  # SDK default: 2 retries

    class Ask(pocketflow.AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return shared["prompts"]

        async def exec_async(self, prompt):
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16
            )
            return r.choices[0].message.content

        async def exec_fallback_async(self, prep_res, exc):
            return exc

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    shared = {"prompts": prompts(n)}
    start = time.perf_counter()
    await pocketflow.AsyncFlow(start=Ask()).run_async(shared)
    seconds = time.perf_counter() - start
    await client.close()
    return sum(1 for r in shared["out"] if isinstance(r, Exception)), seconds


async def run_semaphore(base_url: str, n: int, limit: int = 16) -> tuple[int, float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")
    semaphore = asyncio.Semaphore(limit)

    async def one(prompt: str):
        async with semaphore:
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16
            )
            return r.choices[0].message.content

    start = time.perf_counter()
    out = await asyncio.gather(*(one(p) for p in prompts(n)), return_exceptions=True)
    seconds = time.perf_counter() - start
    await client.close()
    return sum(1 for r in out if isinstance(r, BaseException)), seconds


def fake_rows(args) -> list[Row]:
    rows = []
    for case in CASES:
        set_case(case, FakeServerProvider.name, args.rate)
        provider = FakeServerProvider(args.rate, latency=args.latency, headers=case != "429s")
        lost, seconds, learned = asyncio.run(run_pocketbatch(provider, args.calls, "fake"))
        b = provider.books
        rows.append(
            Row(
                "in-process",
                case,
                "pocketbatch",
                args.calls,
                lost,
                b.requests,
                b.rate_limited,
                seconds,
                b.ok / seconds,
                args.rate,
                learned,
            )
        )
        print(_line(rows[-1]), flush=True)
    return rows


def loopback_rows(args) -> list[Row]:
    from pocketbatch_openai import OpenAIProvider

    rows = []
    os.environ["OPENAI_API_KEY"] = "sk-bench"
    for case in CASES:
        with LoopbackOpenAI(args.rate, latency=args.latency, headers=case == "headers") as server:
            os.environ["OPENAI_BASE_URL"] = server.base_url
            for contestant in args.only or ("pocketbatch", "pocketflow", "semaphore"):
                server.reset()
                time.sleep(0.5)  # the server's bucket is full again, as after a quiet period
                learned = None
                if contestant == "pocketbatch":
                    set_case(case, OpenAIProvider.name, args.rate)
                    lost, seconds, learned = asyncio.run(run_pocketbatch(OpenAIProvider(), args.calls, MODEL))
                elif contestant == "pocketflow":
                    lost, seconds = asyncio.run(run_pocketflow(server.base_url, args.calls))
                else:
                    lost, seconds = asyncio.run(run_semaphore(server.base_url, args.calls))
                s = server.stats()
                rows.append(
                    Row(
                        "loopback HTTP",
                        case,
                        contestant,
                        args.calls,
                        lost,
                        s["requests"],
                        s["rate_limited"],
                        seconds,
                        s["ok"] / seconds,
                        args.rate,
                        learned,
                    )
                )
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: Row) -> str:
    learned = f"{r.learned_rpm:,.0f}" if r.learned_rpm is not None else "-"
    return (
        f"| {r.server} | {r.case} | {r.contestant} | {r.lost}/{r.calls} | {r.rate_limited} "
        f"({r.share_429:.1%}) | {r.of_limit:.2f} | {r.seconds:.1f} s | {learned} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="the server's limit, requests a second")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds a call takes once admitted")
    parser.add_argument("--only", nargs="*", choices=("pocketbatch", "pocketflow", "semaphore"))
    parser.add_argument("--server", choices=("both", "fake", "loopback"), default="both")
    args = parser.parse_args()
    print(
        f"{args.calls} calls against a limit of {args.rate:g} req/s ({args.rate * 60:,.0f} RPM), burst 5, "
        f"{args.latency * 1000:.0f} ms latency; Python {sys.version.split()[0]}, openai {openai.__version__}"
    )
    print(
        "| server | case | contestant | lost | 429s (% of requests) | ok rate / limit | time | learned RPM |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    if args.server in ("both", "fake"):
        fake_rows(args)
    if args.server in ("both", "loopback"):
        loopback_rows(args)


if __name__ == "__main__":
    main()
