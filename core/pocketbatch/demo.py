"""`pocketbatch demo`: PocketFlow's parallel-summaries example, run on the offline provider."""

from __future__ import annotations

import asyncio
import os

from rich.console import Console
from rich.table import Table

from . import config, registry
from .flow import AsyncFlow, AsyncParallelBatchNode
from .llm import call_llm_async

TEXTS = [
    "PocketFlow is a 100-line framework for LLM pipelines built from nodes, flows and a shared store.",
    "Parallel nodes run exec_async for many items at once, which quickly runs into rate limits.",
    "Batch APIs take thousands of requests in one job and charge half the price, at the cost of latency.",
    "Retries must honour Retry-After and add jitter, or every worker wakes up at the same moment.",
    "A journal of batch jobs lets a crashed run re-attach to its job instead of paying twice.",
    "Provider plugins are installed with pip and configured with environment variables.",
]


class ParallelSummaries(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["texts"]

    async def exec_async(self, text):
        prompt = f"Summarize: {text}"
        return await call_llm_async(prompt)

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["summary"] = "\n\n".join(exec_res_list)
        shared["responses"] = exec_res_list
        return "default"


def run() -> None:
    os.environ.setdefault("POCKETBATCH_PROVIDER", "offline")  # the demo never spends money
    config.reload()
    registry.reset()
    shared = {"texts": TEXTS}
    asyncio.run(AsyncFlow(start=ParallelSummaries()).run_async(shared))
    console = Console()
    table = Table("#", "summary", "via", "tokens in/out", "cost (USD)", title="ParallelSummaries, offline")
    for i, r in enumerate(shared["responses"], 1):
        cost = "-" if r.cost_usd is None else f"{r.cost_usd:.6f}"
        tokens = f"{r.usage.input_tokens}/{r.usage.output_tokens}"
        table.add_row(str(i), str(r), f"{r.via} ({r.provider}/{r.model})", tokens, cost)
    console.print(table)
