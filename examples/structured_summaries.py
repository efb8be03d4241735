"""Typed results from a parallel node: each summary comes back as a validated pydantic object, whether
the round went concurrent or to the batch API.

Runs on the offline provider with no key (it answers with a deterministic instance of the schema, and
here a quarter of its first answers are made invalid, so you see re-asks at work); set OPENAI_API_KEY or
ANTHROPIC_API_KEY to use a real model.
"""

import asyncio
import os

from pydantic import BaseModel

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, SchemaError, call_llm_async
from pocketbatch.engine.events import summarize


class Author(BaseModel):
    name: str
    role: str | None


class Summary(BaseModel):
    title: str
    bullets: list[str]
    authors: list[Author]


class SummarizeAll(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["texts"]

    async def exec_async(self, text):
        response = await call_llm_async(f"Summarize, naming the authors: {text}", schema=Summary)
        return response.parsed  # a Summary; the response itself is still the JSON text, usage, cost, via

    async def exec_fallback_async(self, text, exc):
        if isinstance(exc, SchemaError):  # still invalid after POCKETBATCH_SCHEMA_RETRIES re-asks
            return None
        raise exc

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["summaries"] = exec_res_list


async def main() -> None:
    os.environ.setdefault(
        "POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE", "0.25"
    )  # only the offline provider reads it
    shared = {"texts": [f"Report {i} on pocket-sized batches, by the batch team." for i in range(8)]}
    with summarize() as summary:
        await AsyncFlow(start=SummarizeAll()).run_async(shared)
    for s in shared["summaries"]:
        print(
            "gave up on this one"
            if s is None
            else f"{s.title}: {len(s.bullets)} bullets, {len(s.authors)} authors"
        )
    print(summary)
    assert all(s is None or isinstance(s, Summary) for s in shared["summaries"])


if __name__ == "__main__":
    asyncio.run(main())
