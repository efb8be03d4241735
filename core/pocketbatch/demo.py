"""`pocketbatch demo`: PocketFlow's parallel-summaries example on the offline provider, twice: a small
round that goes concurrent and a large one that goes to the (simulated) batch API."""

from __future__ import annotations

import asyncio
import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import config, registry
from .engine import events
from .flow import AsyncFlow, AsyncParallelBatchNode
from .llm import call_llm_async
from .progress import summary_table

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


async def summarize(texts: list[str]) -> tuple[list, events.Summary]:
    shared = {"texts": texts}
    with events.summarize() as summary:
        await AsyncFlow(start=ParallelSummaries()).run_async(shared)
    return shared["responses"], summary


def run() -> None:
    # The demo never spends money, whatever keys or provider the shell has set.
    os.environ["POCKETBATCH_PROVIDER"] = "offline"
    os.environ.pop("POCKETBATCH_MODEL", None)
    config.reload()
    registry.reset()
    console = Console()
    large = [f"Report {i}: {TEXTS[i % len(TEXTS)]}" for i in range(1_000)]
    for title, texts in (("a small round", TEXTS), ("a large round", large)):
        console.rule(f"ParallelSummaries over {len(texts):,} texts: {title}")
        responses, summary = asyncio.run(summarize(texts))
        for decision in summary.decisions:
            console.print(f"[bold]decision:[/bold] {decision.reason}", highlight=False)
        table = Table("#", "summary", "via", "tokens in/out", "cost (USD)")
        for i, r in list(enumerate(responses, 1))[:6]:
            cost = "-" if r.cost_usd is None else f"{r.cost_usd:.6f}"
            tokens = f"{r.usage.input_tokens}/{r.usage.output_tokens}"
            table.add_row(str(i), escape(str(r)), r.via, tokens, cost)
        if len(responses) > 6:
            table.add_row("…", f"{len(responses) - 6:,} more", "", "", "")
        console.print(table)
        console.print(summary_table(summary, title=f"{len(texts):,} texts"))
    console.print(
        "The node's code was the same both times. Try POCKETBATCH_MODE=concurrent or =batch, "
        "or POCKETBATCH_LOG=info, and run `pocketbatch demo` again.",
        highlight=False,
    )
