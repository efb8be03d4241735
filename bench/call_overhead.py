"""Per-call overhead of the engine: `concurrent.call` on a zero-latency provider vs awaiting the provider
directly. Prints microseconds per call and the ratio.

    .venv/bin/python bench/call_overhead.py [--calls 20000] [--limited]

--limited configures an RPM and TPM far above what the loop can reach, so both buckets are acquired on
every call (the default has no limits configured and a provider without defaults: no bucket at all).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from pocketbatch import config
from pocketbatch.engine import concurrent
from pocketbatch.providers import LLMRequest, LLMResponse, Provider, Usage


class ZeroLatency(Provider):
    name = "zero"
    default_model = "zero"

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        return LLMResponse("ok", usage=Usage(1, 1), model=request.model, provider=self.name)


async def bare(provider: Provider, request: LLMRequest, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await provider.call_llm_async(request)
    return (time.perf_counter() - start) / n


async def engine(provider: Provider, request: LLMRequest, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await concurrent.call(provider, request)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--limited", action="store_true")
    args = parser.parse_args()
    if args.limited:
        os.environ["POCKETBATCH_ZERO_RPM"] = str(10**12)
        os.environ["POCKETBATCH_ZERO_TPM"] = str(10**15)
    config.reload()
    provider = ZeroLatency()
    request = LLMRequest([{"role": "user", "content": "hello"}], "zero", max_tokens=16)

    async def measure() -> tuple[float, float]:
        await engine(provider, request, 1000)  # warm up: limiter made, caches filled
        return await bare(provider, request, args.calls), await engine(provider, request, args.calls)

    results = [asyncio.run(measure()) for _ in range(args.runs)]
    b = statistics.median(r[0] for r in results)
    e = statistics.median(r[1] for r in results)
    print(f"bare provider call: {b * 1e6:8.2f} µs")
    print(f"concurrent.call   : {e * 1e6:8.2f} µs  ({'RPM+TPM buckets' if args.limited else 'no limits'})")
    print(f"overhead          : {(e - b) * 1e6:8.2f} µs per call, ratio {e / b:.0f}×")
    print(f"share of a 300 ms LLM call: {(e - b) / 0.3:.4%}")


if __name__ == "__main__":
    main()
