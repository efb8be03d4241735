"""One contestant of bench/ratelimit.py, run as a user runs it: a fresh interpreter, the imports a script
has, then the clock from the moment the flow (or the peer's batch call) starts to its end.

    python bench/user_flow.py CONTESTANT --calls N --rate R [--flavor openai|anthropic]

The provider's SDK variables (OPENAI_BASE_URL, ANTHROPIC_BASE_URL, keys) and POCKETBATCH_* come from the
environment, as they would for a user. Prints one JSON line: {"lost", "seconds", "started_at",
"learned_rpm"}; `started_at` is time.time() at the flow's start, for the first-request delay.

Contestants:
- node: the seed's AsyncParallelBatchNode whose exec_async awaits call_llm_async(prompt);
- two-flows: two such flows, half the prompts each, run at once in one event loop;
- batch-flow: an AsyncParallelBatchFlow of one-node child flows, one call each;
- pocketflow: pocketflow 0.0.3's AsyncParallelBatchNode awaiting the SDK (its default 2 retries);
- langchain: ChatOpenAI / ChatAnthropic `.abatch` with `InMemoryRateLimiter` at 0.95 of the limit;
- litellm: LiteLLM's Router, `rpm` at 0.95 of the limit, 3 retries, usage-based routing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def prompts(n: int) -> list[str]:
    return [f"Summarize item {i} in one word." for i in range(n)]


def pocketbatch_flows(contestant: str, texts: list[str]):
    """The flows a user writes, and a function that collects their results."""
    from pocketbatch import (
        AsyncFlow,
        AsyncNode,
        AsyncParallelBatchFlow,
        AsyncParallelBatchNode,
        call_llm_async,
    )

    class Summaries(AsyncParallelBatchNode):  # the seed's node
        async def prep_async(self, shared):
            return shared["texts"]

        async def exec_async(self, text):
            return await call_llm_async(text)

        async def exec_fallback_async(self, prep_res, exc):
            return exc  # counted as lost instead of failing the node (which would lose every item)

        async def post_async(self, shared, prep_res, exec_res_list):
            shared["results"] = exec_res_list

    if contestant == "batch-flow":

        class Ask(AsyncNode):
            async def exec_async(self, _):
                return await call_llm_async(self.params["text"])

            async def exec_fallback_async(self, prep_res, exc):
                return exc

            async def post_async(self, shared, prep_res, exec_res):
                shared["results"][self.params["i"]] = exec_res

        class Each(AsyncParallelBatchFlow):
            async def prep_async(self, shared):
                shared["results"] = [None] * len(shared["texts"])
                return [{"i": i, "text": t} for i, t in enumerate(shared["texts"])]

        shareds = [{"texts": texts}]
        return [(Each(start=Ask()), shareds[0])]
    if contestant == "two-flows":
        half = len(texts) // 2
        return [(AsyncFlow(start=Summaries()), {"texts": part}) for part in (texts[:half], texts[half:])]
    return [(AsyncFlow(start=Summaries()), {"texts": texts})]


def langchain_chat(flavor: str, rate: float):
    from langchain_core.rate_limiters import InMemoryRateLimiter

    # Checked every millisecond: at the default 100 ms a bucket of one request caps the rate at 10/s, and
    # at 10 ms the wait rounds up to the next check (0.84 of the limit); this is its best setting here.
    limiter = InMemoryRateLimiter(requests_per_second=0.95 * rate, check_every_n_seconds=0.001)
    if flavor == "anthropic":
        from langchain_anthropic import ChatAnthropic

        return ChatAnthropic(model=MODELS[flavor], rate_limiter=limiter, max_tokens=1024)
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODELS[flavor], rate_limiter=limiter)


def litellm_router(flavor: str, rate: float):
    from litellm import Router

    params = {"model": f"{flavor}/{MODELS[flavor]}", "rpm": int(0.95 * rate * 60)}
    if flavor == "anthropic":
        params |= {"api_base": os.environ["ANTHROPIC_BASE_URL"], "api_key": os.environ["ANTHROPIC_API_KEY"]}
    else:
        params |= {"api_base": os.environ["OPENAI_BASE_URL"], "api_key": os.environ["OPENAI_API_KEY"]}
    shared = {}
    if os.environ.get("BENCH_REDIS_URL"):  # bench/shared_limit.py: the rpm shared through Redis
        from urllib.parse import urlparse

        url = urlparse(os.environ["BENCH_REDIS_URL"])
        shared = {"redis_host": url.hostname, "redis_port": url.port}
    return Router(
        model_list=[{"model_name": "m", "litellm_params": params}],
        routing_strategy="usage-based-routing-v2",
        num_retries=3,
        **shared,
    )


async def run_litellm(router, texts: list[str]) -> list:
    async def one(text: str):
        return await router.acompletion(model="m", messages=[{"role": "user", "content": text}])

    return await asyncio.gather(*(one(t) for t in texts), return_exceptions=True)


def pocketflow_flow(texts: list[str]):
    import openai
    import pocketflow

    client = openai.AsyncOpenAI()  # the SDK's default retries (2)

    class Summaries(pocketflow.AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return shared["texts"]

        async def exec_async(self, text):
            r = await client.chat.completions.create(
                model=MODELS["openai"], messages=[{"role": "user", "content": text}]
            )
            return r.choices[0].message.content

        async def exec_fallback_async(self, prep_res, exc):
            return exc

        async def post_async(self, shared, prep_res, exec_res_list):
            shared["results"] = exec_res_list

    return pocketflow.AsyncFlow(start=Summaries()), {"texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("contestant")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--flavor", choices=tuple(MODELS), default="openai")
    args = parser.parse_args()
    texts = prompts(args.calls)
    learned = None

    if args.contestant in ("node", "two-flows", "batch-flow"):
        flows = pocketbatch_flows(args.contestant, texts)

        async def run() -> list:
            await asyncio.gather(*(flow.run_async(shared) for flow, shared in flows))
            return [r for _, shared in flows for r in shared["results"]]

    elif args.contestant == "pocketflow":
        flow, shared = pocketflow_flow(texts)

        async def run() -> list:
            await flow.run_async(shared)
            return shared["results"]

    elif args.contestant == "langchain":
        chat = langchain_chat(args.flavor, args.rate)

        async def run() -> list:
            return await chat.abatch(texts, return_exceptions=True)

    elif args.contestant == "litellm":
        router = litellm_router(args.flavor, args.rate)

        async def run() -> list:
            return await run_litellm(router, texts)

    else:
        parser.error(f"unknown contestant {args.contestant!r}")

    started_at = time.time()
    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    if args.contestant in ("node", "two-flows", "batch-flow"):
        from pocketbatch.engine.limits import limiters

        learned = max((lim.rpm for lim in limiters().values()), default=None)
    lost = sum(1 for r in results if r is None or isinstance(r, BaseException))
    print(json.dumps({"lost": lost, "seconds": seconds, "started_at": started_at, "learned_rpm": learned}))


if __name__ == "__main__":
    main()
