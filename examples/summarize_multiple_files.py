"""The second example of PocketFlow's "(Advanced) Parallel" page: SummarizeMultipleFiles, an
AsyncParallelBatchFlow that runs one sub-flow per file, all at once.

It writes a few small text files to a temporary folder first. Every branch's LLM call joins one round,
which pocketbatch sends concurrently or to the batch API as a whole. Runs on the offline provider with
no key; set OPENAI_API_KEY (or ANTHROPIC_API_KEY) to use a real one.
"""

import asyncio
import tempfile
from pathlib import Path

from pocketbatch import AsyncFlow, AsyncNode, AsyncParallelBatchFlow, call_llm_async


class LoadAndSummarizeFile(AsyncNode):
    async def prep_async(self, shared):
        return await asyncio.to_thread(Path(self.params["filename"]).read_text)

    async def exec_async(self, text):
        return await call_llm_async(f"Summarize in one sentence: {text}")

    async def post_async(self, shared, prep_res, summary):
        # Every branch shares one `shared` dict: each writes under its own key.
        shared["summaries"][self.params["filename"]] = summary


class SummarizeMultipleFiles(AsyncParallelBatchFlow):
    async def prep_async(self, shared):
        return [{"filename": f} for f in shared["files"]]


sub_flow = AsyncFlow(start=LoadAndSummarizeFile())
parallel_flow = SummarizeMultipleFiles(start=sub_flow)

NOTES = {
    "nodes.txt": "A node has three steps: prep reads the shared store, exec does the work, post writes back.",
    "flows.txt": "A flow follows the action each node's post returns to pick the next node to run.",
    "batch.txt": "A batch API takes many requests in one job and answers within a day at half the price.",
    "limits.txt": "Providers limit requests and tokens per minute and answer 429 when a client goes faster.",
}


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for name, text in NOTES.items():
            path = Path(folder) / name
            path.write_text(text)
            files.append(str(path))
        shared = {"files": files, "summaries": {}}
        await parallel_flow.run_async(shared)
        for filename, summary in shared["summaries"].items():
            print(f"{Path(filename).name}: {summary}")


if __name__ == "__main__":
    asyncio.run(main())
