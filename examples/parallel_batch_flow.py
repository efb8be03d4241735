"""A port of PocketFlow's cookbook `pocketflow-parallel-batch-flow`, with text instead of images.

The cookbook runs LoadImage >> ApplyFilter >> SaveImage for every (image, filter) pair, first with an
AsyncBatchFlow (one pair after another), then with an AsyncParallelBatchFlow (all pairs at once), and
compares the times. Here each (text, style) pair runs LoadText >> RewriteText >> ReviewRewrite >>
SaveText; the two middle nodes call the LLM. In the parallel flow, each step's calls from all the
branches form one round.

The branches share one `shared` dict, and an LLM call is an `await` between one node's write and the
next node's read, so every node reads and writes under its own (text, style) key: a single
`shared["text"]` would be overwritten by the other branches (the cookbook's `shared["image"]` is only
safe because its nodes never await between writing and reading it).

Runs on the offline provider with no key; set OPENAI_API_KEY (or ANTHROPIC_API_KEY) to use a real one.
"""

import asyncio
import tempfile
import time
from pathlib import Path

from pocketbatch import AsyncBatchFlow, AsyncFlow, AsyncNode, AsyncParallelBatchFlow, call_llm_async

TEXTS = {
    "release.txt": "Version 0.1 adds batch jobs that resume after a crash without paying twice.",
    "outage.txt": "The service was slow for ten minutes because a provider answered 429 to most calls.",
    "welcome.txt": "Welcome to the team. Your first task is to run the demo and read the docs.",
}
STYLES = {
    "formal": "Rewrite this in a formal register",
    "plain": "Rewrite this in plain words a twelve-year-old understands",
    "headline": "Rewrite this as a newspaper headline",
}


def key(params):
    return (params["text"], params["style"])


class LoadText(AsyncNode):
    async def prep_async(self, shared):
        return Path(shared["input_dir"]) / self.params["text"]

    async def exec_async(self, path):
        return await asyncio.to_thread(path.read_text)

    async def post_async(self, shared, prep_res, text):
        shared["loaded"][key(self.params)] = text
        return "rewrite"


class RewriteText(AsyncNode):
    async def prep_async(self, shared):
        return shared["loaded"][key(self.params)]

    async def exec_async(self, text):
        return await call_llm_async(f"{STYLES[self.params['style']]}:\n\n{text}")

    async def post_async(self, shared, prep_res, rewritten):
        shared["rewritten"][key(self.params)] = rewritten
        return "review"


class ReviewRewrite(AsyncNode):
    async def prep_async(self, shared):
        original = shared["loaded"][key(self.params)]
        return original, shared["rewritten"][key(self.params)]

    async def exec_async(self, pair):
        original, rewritten = pair
        prompt = f"In one line: does the rewrite keep every fact?\nOriginal: {original}\nRewrite: {rewritten}"
        return await call_llm_async(prompt)

    async def post_async(self, shared, prep_res, review):
        shared["reviews"][key(self.params)] = review
        return "save"


class SaveText(AsyncNode):
    async def prep_async(self, shared):
        k = key(self.params)
        return shared["rewritten"][k], shared["reviews"][k]

    async def exec_async(self, data):
        rewritten, review = data
        stem = Path(self.params["text"]).stem
        path = Path(self.params["output_dir"]) / f"{stem}_{self.params['style']}.txt"
        await asyncio.to_thread(path.write_text, f"{rewritten}\n\nReview: {review}\n")
        return path

    async def post_async(self, shared, prep_res, path):
        shared["saved"].append(path.name)


def create_base_flow() -> AsyncFlow:
    load, rewrite, review, save = LoadText(), RewriteText(), ReviewRewrite(), SaveText()
    load - "rewrite" >> rewrite
    rewrite - "review" >> review
    review - "save" >> save
    return AsyncFlow(start=load)


class TextBatchFlow(AsyncBatchFlow):
    async def prep_async(self, shared):
        return [{"text": t, "style": s} for t in shared["texts"] for s in STYLES]


class TextParallelBatchFlow(AsyncParallelBatchFlow):
    async def prep_async(self, shared):
        return [{"text": t, "style": s} for t in shared["texts"] for s in STYLES]


async def run(flow_class, input_dir: str, output_dir: str) -> float:
    shared = {"input_dir": input_dir, "texts": list(TEXTS), "loaded": {}, "rewritten": {}, "reviews": {}}
    shared["saved"] = []
    flow = flow_class(start=create_base_flow())
    flow.set_params({"output_dir": output_dir})  # flow params reach every node of every branch
    start = time.perf_counter()
    await flow.run_async(shared)
    elapsed = time.perf_counter() - start
    print(f"{flow_class.__name__}: {len(shared['saved'])} files in {elapsed:.2f} s")
    return elapsed


async def main() -> None:
    with tempfile.TemporaryDirectory() as input_dir, tempfile.TemporaryDirectory() as output_dir:
        for name, text in TEXTS.items():
            (Path(input_dir) / name).write_text(text)
        sequential = await run(TextBatchFlow, input_dir, output_dir)
        parallel = await run(TextParallelBatchFlow, input_dir, output_dir)
        print(f"Speedup: {sequential / parallel:.1f}x")
        sample = Path(output_dir) / "outage_headline.txt"
        print(f"\n{sample.name}:\n{sample.read_text()}")


if __name__ == "__main__":
    asyncio.run(main())
