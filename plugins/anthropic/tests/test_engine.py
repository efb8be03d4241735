"""Through pocketbatch itself: call_llm_async and parallel nodes, with the provider registered in the core
(strict SDK clients) and the emulator on the other side of the HTTP calls."""

import logging
import time

import pytest

from pocketbatch import (
    AsyncFlow,
    AsyncParallelBatchNode,
    RequestError,
    Usage,
    call_llm,
    call_llm_async,
    get_provider,
)
from pocketbatch.engine.limits import reset_limiters
from pocketbatch.providers import LLMRequest
from pocketbatch.testing import ask_each
from pocketbatch_anthropic import AnthropicProvider

MODEL = "anthropic/claude-haiku-4-5"
PRICE = (1.0, 5.0)  # claude-haiku-4-5, USD per million (input, output) tokens


@pytest.fixture(autouse=True)
def engine(register_provider, pocketbatch_env, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-engine")
    # The emulator reports tier-1 limits (50 RPM, a call every 1.2 s; and the default max_tokens of 4096
    # counts against its token limits): these tests are about how a round runs, not its pace
    # (test_rate_limits.py is), so both are unlimited, and each test starts with nothing learned.
    pocketbatch_env(
        POCKETBATCH_JOURNAL="off",
        POCKETBATCH_POLL_INTERVAL="0.01",
        POCKETBATCH_MAX_RETRIES="3",
        POCKETBATCH_ANTHROPIC_RPM="0",
        POCKETBATCH_ANTHROPIC_TPM="0",
    )
    reset_limiters()
    yield register_provider(AnthropicProvider(client_options={"_strict_response_validation": True}))
    reset_limiters()


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


async def ask(prompts, **node_options):
    return await ask_each(prompts, model=MODEL, **node_options)


def cost(input_tokens, output_tokens, factor=1.0):
    return (input_tokens * PRICE[0] + output_tokens * PRICE[1]) * factor / 1_000_000


def lines_end(emulator, provider, by_prompt):
    """Set how each prompt's batch line ends (emulator.results_for) as the batch is submitted: the
    engine picks the custom_ids, so they are only known then."""
    submit = provider.batch.submit

    async def submit_and_set(items):
        prompts = {cid: request.messages[-1]["content"] for cid, request in items}
        chosen = {cid: by_prompt[p] for cid, p in prompts.items() if p in by_prompt}
        emulator.results_for = {**emulator.results_for, **chosen}
        return await submit(items)

    provider.batch.submit = submit_and_set


async def test_a_small_round_goes_concurrent_through_messages(anthropic_emulator, caplog):
    prompts = ["Summarise: the cat sat", "Summarise: the dog ran", "Summarise: the owl flew"]
    with caplog.at_level(logging.INFO, logger="pocketbatch"):
        replies = await ask(prompts)

    assert replies == [f"reply to: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 3
    assert [r.usage for r in replies] == [Usage(4, 6)] * 3
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(4, 6))] * 3
    assert anthropic_emulator.calls["messages"] == 3 and anthropic_emulator.batches_created == 0
    assert "3 requests to anthropic/claude-haiku-4-5" in caplog.text and "running concurrently" in caplog.text


async def test_a_batch_round_settles_final_errors_and_reruns_retryable_lines(engine, anthropic_emulator):
    prompts = [f"Summarise: text {i}" for i in range(7)]
    lines_end(
        anthropic_emulator,
        engine,
        {
            prompts[1]: "invalid_request_error",  # final: the item's own error
            prompts[2]: "api_error",  # 500: run again concurrently
            prompts[4]: "overloaded_error",  # 529: run again concurrently
            prompts[5]: "expired",  # run again concurrently
        },
    )

    replies = await ask(prompts, mode="batch")

    assert isinstance(replies[1], RequestError) and replies[1].status == 400
    assert "invalid_request_error" in replies[1].message
    answered = [r for i, r in enumerate(replies) if i != 1]
    assert answered == [f"reply to: {p}" for i, p in enumerate(prompts) if i != 1]
    assert [r.via for r in answered] == ["batch", "concurrent", "batch", "concurrent", "concurrent", "batch"]
    assert all(r.usage == Usage(3, 5) for r in answered)
    # The batch API's lines at half the price, the lines run again at the full one.
    half, full = pytest.approx(cost(3, 5, 0.5)), pytest.approx(cost(3, 5))
    assert [r.cost_usd for r in answered] == [half, full, half, full, full, half]
    assert anthropic_emulator.batches_created == 1
    rerun = sorted(body["messages"][-1]["content"] for body in anthropic_emulator.bodies("messages"))
    assert rerun == [prompts[2], prompts[4], prompts[5]]


async def test_a_rejected_batch_runs_every_item_concurrently(anthropic_emulator, caplog):
    anthropic_emulator.fail_next(1, status=400, route="batches.create", message="requests: too many tokens")
    prompts = [f"Summarise: text {i}" for i in range(4)]

    replies = await ask(prompts, mode="batch")

    assert replies == [f"reply to: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 4
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(3, 5))] * 4
    assert anthropic_emulator.batches_created == 0 and anthropic_emulator.calls["messages"] == 4
    assert "requests: too many tokens" in caplog.text and "running them concurrently" in caplog.text


async def test_a_batch_the_api_finds_too_large_is_halved_until_it_fits(engine, anthropic_emulator):
    # The engine's estimate of a request's size is above the exact size of its Message Batches entry,
    # so a chunk the engine accepts never fails the plugin's own size check (and it splits over
    # max_requests itself): the 413 that halves a chunk comes from an API whose limit is lower.
    anthropic_emulator.max_batch_requests = 2
    prompts = [f"Summarise: text {i}" for i in range(8)]

    replies = await ask(prompts, mode="batch")

    assert replies == [f"reply to: {p}" for p in prompts]
    assert [r.via for r in replies] == ["batch"] * 8
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(3, 5, 0.5))] * 8
    assert anthropic_emulator.calls["batches.create"] == 1 + 2 + 4  # 8 refused, 4 and 4 refused, 4 x 2
    assert [len(b.requests) for b in anthropic_emulator.batches.values()] == [2, 2, 2, 2]
    assert anthropic_emulator.calls["messages"] == 0


async def test_a_lost_answer_to_the_create_call_is_found_by_time_and_count_one_job_in_all(anthropic_emulator):
    anthropic_emulator.fail_next(route="batches.create", status="lost")
    prompts = [f"Summarise: text {i}" for i in range(3)]
    replies = await ask_each(prompts, model=MODEL, mode="batch")
    assert replies == [f"reply to: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert anthropic_emulator.batches_created == 1 and anthropic_emulator.calls["batches.create"] == 1
    assert anthropic_emulator.calls["batches.list"] == 1


async def test_find_tells_an_ended_batch_by_the_custom_ids_of_its_results(anthropic_emulator):
    provider = get_provider("anthropic")
    since = time.time()
    items = [(f"id-{i}", LLMRequest.from_prompt(f"p {i}", "claude-haiku-4-5")) for i in range(2)]
    other = [(f"other-{i}", request) for i, (_, request) in enumerate(items)]
    wanted = await provider.batch.submit(items)
    await provider.batch.submit(other)  # the same size, newer: not these requests
    for job in (wanted, *anthropic_emulator.batches):
        while (await provider.batch.status(job)).state != "ended":
            pass
    assert await provider.batch.find("tag", items, since) == wanted
    assert await provider.batch.find("tag", items[:1], since) is None  # no batch of one request
    assert await provider.batch.find("tag", items, since + 3600) is None  # all created before `since`


async def test_cache_reads_and_writes_are_priced_at_their_own_rates(anthropic_emulator):
    anthropic_emulator.usage_extra = {"cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000}
    reply = await call_llm_async("Summarise: the cat sat", model=MODEL)
    assert reply.usage == Usage(1104, 6, cache_read_tokens=1000, cache_write_tokens=100)
    # 4 uncached input tokens at $1, 1,000 cache reads at $0.10, 100 cache writes at $1.25, 6 output at $5
    expected = (4 * 1.0 + 1000 * 0.10 + 100 * 1.25 + 6 * 5.0) / 1_000_000
    assert reply.cost_usd == pytest.approx(expected)
    [batched] = await ask_each(["Summarise: the cat sat"], model=MODEL, mode="batch")
    assert batched.via == "batch" and batched.cost_usd == pytest.approx(expected * 0.5)  # the discounts stack


async def test_one_hour_cache_writes_are_priced_at_twice_the_input_price(anthropic_emulator):
    # 100 writes, 40 of them to the 1-hour cache, as the API splits them in usage.cache_creation.
    anthropic_emulator.usage_extra = {
        "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40},
        "cache_read_input_tokens": 1000,
    }
    usage = Usage(1104, 6, cache_read_tokens=1000, cache_write_tokens=100, cache_write_1h_tokens=40)
    # 4 uncached input tokens at $1, 1,000 reads at $0.10, 60 5-minute writes at $1.25, 40 1-hour
    # writes at $2, 6 output tokens at $5 (claude-haiku-4-5)
    expected = (4 * 1.0 + 1000 * 0.10 + 60 * 1.25 + 40 * 2.0 + 6 * 5.0) / 1_000_000
    reply = await call_llm_async("Summarise: the cat sat", model=MODEL)
    assert reply.usage == usage and reply.cost_usd == pytest.approx(expected)
    [batched] = await ask_each(["Summarise: the cat sat"], model=MODEL, mode="batch")
    assert batched.via == "batch" and batched.usage == usage
    assert batched.cost_usd == pytest.approx(expected * 0.5)
    [again] = await ask_each(["Summarise: the cat sat"], model=MODEL, mode="batch")  # from the journal
    assert again.usage == usage and again.cost_usd == pytest.approx(expected * 0.5)
