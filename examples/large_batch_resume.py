"""A large batch job, then the same round again: 2,000 prompts with mode="batch", and a second run that
takes its results from the journal instead of paying for them twice.

This script runs on the offline provider even when an API key is set, because a real batch job can take
up to 24 hours: set POCKETBATCH_PROVIDER (e.g. to openai) yourself to run it on a real batch API. The
journal (POCKETBATCH_JOURNAL) and the offline provider's jobs (POCKETBATCH_OFFLINE_DIR) go to a
temporary folder, so every run of the script starts fresh; the simulated job takes 1 second
(POCKETBATCH_OFFLINE_BATCH_SECONDS). POCKETBATCH_LOG=info prints the decision lines.
"""

import asyncio
import os
import tempfile
import time
from pathlib import Path

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, call_llm_async

REVIEWS = [
    "arrived broken and support never answered",
    "does exactly what the box says",
    "the battery lasts two days, better than my last one",
    "too loud for an office",
    "I bought a second one for my parents",
]


class ClassifyReviews(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["reviews"]

    async def exec_async(self, review):
        return await call_llm_async(f"Answer positive, negative or mixed. Review: {review}")

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["labels"] = exec_res_list


async def classify(reviews: list[str]) -> None:
    shared = {"reviews": reviews}
    start = time.perf_counter()
    await AsyncFlow(start=ClassifyReviews(mode="batch")).run_async(shared)
    labels = shared["labels"]
    via = {v: sum(1 for r in labels if r.via == v) for v in sorted({r.via for r in labels})}
    costs = [r.cost_usd for r in labels if r.cost_usd is not None]
    cost = f"${sum(costs):.4f}" if costs else "unknown"
    print(f"{len(labels):,} labels in {time.perf_counter() - start:.1f} s, via {via}, cost {cost}")
    print(f"first: {labels[0]}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pocketbatch-", ignore_cleanup_errors=True) as folder:
        os.environ.setdefault("POCKETBATCH_PROVIDER", "offline")
        os.environ["POCKETBATCH_JOURNAL"] = str(Path(folder) / "journal.sqlite3")
        os.environ["POCKETBATCH_OFFLINE_DIR"] = str(Path(folder) / "offline-batches")
        os.environ.setdefault("POCKETBATCH_OFFLINE_BATCH_SECONDS", "1")
        os.environ.setdefault("POCKETBATCH_POLL_INTERVAL", "0.25")
        os.environ.setdefault("POCKETBATCH_LOG", "info")
        reviews = [f"Review {i}: {REVIEWS[i % len(REVIEWS)]}" for i in range(2_000)]
        print("First run: submits one batch job and waits for it")
        asyncio.run(classify(reviews))
        print("Second run of the same round: nothing is submitted")
        asyncio.run(classify(reviews))


if __name__ == "__main__":
    main()
