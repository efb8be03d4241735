"""The seed example of PocketFlow's "(Advanced) Parallel" page, run by pocketbatch.

Until the provider layer lands, `call_llm_async` here is a local stand-in that sleeps like an API call.
"""

import asyncio

from pocketbatch import AsyncFlow, AsyncParallelBatchNode


async def call_llm_async(prompt: str) -> str:
    await asyncio.sleep(0.05)
    return f"summary of {prompt.removeprefix('Summarize: ')[:30]!r}"


class ParallelSummaries(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["texts"]

    async def exec_async(self, text):
        prompt = f"Summarize: {text}"
        return await call_llm_async(prompt)

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["summary"] = "\n\n".join(exec_res_list)
        return "default"


async def main() -> None:
    shared = {"texts": [f"Text number {i} about pocket-sized batches." for i in range(10)]}
    await AsyncFlow(start=ParallelSummaries()).run_async(shared)
    print(shared["summary"])


if __name__ == "__main__":
    asyncio.run(main())
