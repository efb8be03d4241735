"""The seed example of PocketFlow's "(Advanced) Parallel" page, unchanged but for the import line.

Runs on the offline provider with no key; set OPENAI_API_KEY (or ANTHROPIC_API_KEY) to use a real one.
"""

import asyncio

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, call_llm_async


class ParallelSummaries(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        # e.g., multiple texts
        return shared["texts"]

    async def exec_async(self, text):
        prompt = f"Summarize: {text}"
        return await call_llm_async(prompt)

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["summary"] = "\n\n".join(exec_res_list)
        return "default"


node = ParallelSummaries()
flow = AsyncFlow(start=node)

if __name__ == "__main__":
    shared = {"texts": [f"Text number {i} about pocket-sized batches." for i in range(10)]}
    asyncio.run(flow.run_async(shared))
    print(shared["summary"])
