"""The optional batch API of docs/plugins.md (step 6), tested through the engine as users will run it."""

import asyncio

import pytest
from reverse_batch import BatchingReverseProvider

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, RequestError, call_llm_async


class ReverseAll(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["prompts"]

    async def exec_async(self, prompt):
        return await call_llm_async(prompt, model="reverse/reverse-words")

    async def exec_fallback_async(self, prompt, exc):
        return exc  # keep a failed item's error as its result, so the others are not cancelled

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["replies"] = exec_res_list


@pytest.fixture
def provider(register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")  # poll the job often: tests need not wait a second
    return register_provider(BatchingReverseProvider(seconds=0.05), aliases=("reverse-words",))


async def run(prompts, mode=None):
    shared = {"prompts": prompts}
    await AsyncFlow(start=ReverseAll(mode=mode)).run_async(shared)
    return shared["replies"]


async def test_batch_mode_sends_the_round_as_one_job(provider):
    replies = await run(["a b", "c d", "e f"], mode="batch")
    assert replies == ["b a", "d c", "f e"]  # in input order, though results() yields them reversed
    assert {r.via for r in replies} == {"batch"}
    assert len(provider.batch.jobs) == 1
    assert replies[0].cost_usd == pytest.approx((2 * 0.10 + 2 * 0.40) / 1e6 * 0.5)  # price_factor


async def test_auto_mode_batches_from_min_items(provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_BATCH_MIN_ITEMS="3")
    assert {r.via for r in await run(["a", "b"])} == {"concurrent"}
    assert {r.via for r in await run(["a", "b", "c"])} == {"batch"}


async def test_a_round_over_max_requests_is_split(provider):
    provider.batch.max_requests = 2
    replies = await run([f"item {i}" for i in range(5)], mode="batch")
    assert replies[4] == "4 item"
    assert len(provider.batch.jobs) == 3


async def test_a_bad_line_fails_alone(provider):
    replies = await run(["a b", " "], mode="batch")
    assert replies[0] == "b a"
    assert isinstance(replies[1], RequestError)


async def test_cancelled_lines_finish_concurrently(provider):
    provider.batch.seconds = 60

    async def cancel_soon():
        while not provider.batch.jobs:
            await asyncio.sleep(0.01)
        await provider.batch.cancel(next(iter(provider.batch.jobs)))

    _, replies = await asyncio.gather(cancel_soon(), run(["a b", "c d"], mode="batch"))
    assert replies == ["b a", "d c"]
    assert {r.via for r in replies} == {"concurrent"}


async def test_the_same_round_again_comes_from_the_journal(provider):
    await run(["a b", "c d"], mode="batch")
    again = await run(["a b", "c d"], mode="batch")
    assert again == ["b a", "d c"]
    assert len(provider.batch.jobs) == 1  # nothing was submitted the second time
