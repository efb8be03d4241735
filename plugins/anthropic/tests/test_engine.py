"""Through pocketbatch itself: call_llm_async and a parallel node, with the plugin registered in the core."""

import pytest

from pocketbatch import (
    AsyncFlow,
    AsyncParallelBatchNode,
    RequestError,
    call_llm,
    call_llm_async,
    get_provider,
)

MODEL = "anthropic/claude-haiku-4-5"


@pytest.fixture(autouse=True)
def engine(registry, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_JOURNAL="off", POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_MAX_RETRIES="3")


async def test_the_engine_retries_an_overload(anthropic_emulator):
    anthropic_emulator.fail_next(1, status=529)
    reply = await call_llm_async("Summarise: the cat sat", model=MODEL)
    assert reply == "reply to: Summarise: the cat sat"
    assert (reply.provider, reply.via, reply.model) == ("anthropic", "concurrent", "claude-haiku-4-5")
    assert reply.cost_usd == pytest.approx((4 * 1.0 + 6 * 5.0) / 1_000_000)
    assert anthropic_emulator.calls["messages"] == 2


async def test_the_engine_does_not_retry_a_bad_request(anthropic_emulator):
    anthropic_emulator.fail_next(1, status=400, message="prompt is too long")
    with pytest.raises(RequestError, match="prompt is too long"):
        await call_llm_async("hi", model=MODEL)
    assert anthropic_emulator.calls["messages"] == 1


def test_sync_call_llm_gets_a_client_of_its_own_loop(anthropic_emulator):
    assert call_llm("hello", model=MODEL, max_tokens=20) == "reply to: hello"
    assert anthropic_emulator.bodies("messages")[0]["max_tokens"] == 20
    loops = list(get_provider("anthropic")._clients)
    assert len(loops) == 1 and loops[0].is_running(), "the client lives on call_llm's own running loop"


class Summarise(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["texts"]

    async def exec_async(self, text):
        return await call_llm_async(f"Summarise: {text}", model=MODEL)

    async def post_async(self, shared, prep_res, exec_res):
        shared["summaries"] = exec_res


async def test_a_batch_round_maps_lines_back_and_retries_the_expired_one(anthropic_emulator):
    shared = {"texts": [f"text {i}" for i in range(6)]}
    original_end = anthropic_emulator._end

    # The engine picks the custom_ids, so the third request's is only known once the batch exists.
    def end_with_one_expired(batch, *, cancelled):
        anthropic_emulator.results_for = {batch.requests[2]["custom_id"]: "expired"}
        original_end(batch, cancelled=cancelled)

    anthropic_emulator._end = end_with_one_expired
    await AsyncFlow(start=Summarise(mode="batch")).run_async(shared)
    assert shared["summaries"] == [f"reply to: Summarise: text {i}" for i in range(6)]
    assert [s.via for s in shared["summaries"]] == ["batch", "batch", "concurrent", "batch", "batch", "batch"]
    assert anthropic_emulator.batches_created == 1
    assert anthropic_emulator.calls["messages"] == 1
