"""The batch path: AnthropicBatch (provider.batch) against the emulator, with the real SDK."""

import json
import math

import anthropic
import pytest

from pocketbatch import (
    BatchError,
    BatchStatus,
    ConfigError,
    LLMRequest,
    LLMResponse,
    RateLimitError,
    RequestError,
    TransientError,
    Usage,
)
from pocketbatch_anthropic import AnthropicBatch, AnthropicProvider

MODEL = "claude-haiku-4-5"


def items(n, prefix="item"):
    return [(f"{prefix}-{i}", LLMRequest.from_prompt(f"question {i}", MODEL)) for i in range(n)]


async def run_to_end(batch, job_id):
    states = []
    while True:
        status = await batch.status(job_id)
        states.append(status.state)
        if status.state == "ended":
            return states, status


async def collect(batch, job_id):
    return [pair async for pair in batch.results(job_id)]


def test_limits_and_price_factor(provider):
    assert isinstance(provider.batch, AnthropicBatch)
    assert (provider.batch.max_requests, provider.batch.max_bytes, provider.batch.price_factor) == (
        100_000,
        256_000_000,
        0.5,
    )


async def test_round_trip_with_every_result_type(provider, anthropic_emulator):
    anthropic_emulator.results_for = {
        "item-1": "expired",
        "item-2": "canceled",
        "item-3": "invalid_request_error",
        "item-4": "overloaded_error",
        "item-5": "api_error",
        "item-6": "rate_limit_error",
    }
    batch = provider.batch
    job_id = await batch.submit(items(9))
    assert job_id.startswith("msgbatch_")

    states, status = await run_to_end(batch, job_id)
    assert states == ["running", "running", "ended"]
    assert isinstance(status, BatchStatus)
    assert status.counts == {"processing": 0, "succeeded": 3, "errored": 4, "canceled": 1, "expired": 1}
    assert isinstance(status.raw, anthropic.types.messages.MessageBatch)

    pairs = await collect(batch, job_id)
    order = [custom_id for custom_id, _ in pairs]
    assert sorted(order) == [f"item-{i}" for i in range(9)]
    assert order != sorted(order), "the emulator hands lines out of input order"
    results = dict(pairs)

    for i in (0, 7, 8):
        reply = results[f"item-{i}"]
        assert isinstance(reply, LLMResponse)
        assert reply == f"reply to: question {i}"
        assert (reply.via, reply.provider, reply.model, reply.cost_usd) == ("batch", "anthropic", MODEL, None)
        assert reply.usage == Usage(input_tokens=2, output_tokens=4)
        assert reply.raw.id.startswith("msg_emu_")

    expired, cancelled = results["item-1"], results["item-2"]
    assert type(expired) is TransientError and expired.retryable and "expired" in str(expired)
    assert type(cancelled) is TransientError and cancelled.retryable and "cancelled" in str(cancelled)

    invalid = results["item-3"]
    assert type(invalid) is RequestError and not invalid.retryable and invalid.status == 400
    assert "invalid_request_error" in str(invalid)
    overloaded, api_error = results["item-4"], results["item-5"]
    assert type(overloaded) is TransientError and overloaded.retryable and overloaded.status == 529
    assert type(api_error) is TransientError and api_error.retryable and api_error.status == 500
    limited = results["item-6"]
    assert type(limited) is RateLimitError and limited.retryable and limited.status == 429


async def test_submitted_params_are_the_concurrent_params(provider, anthropic_emulator, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_ANTHROPIC_MAX_TOKENS", "200")
    request = LLMRequest.from_prompt("hello", MODEL, system="sys", temperature=0.5, options={"top_k": 3})
    await provider.call_llm_async(request)
    await provider.batch.submit([("only-one", request)])
    (sent,) = anthropic_emulator.bodies("batches.create")
    assert sent == {
        "requests": [{"custom_id": "only-one", "params": anthropic_emulator.bodies("messages")[0]}]
    }
    assert sent["requests"][0]["params"]["max_tokens"] == 200


async def test_custom_id_at_the_limits_is_accepted(provider, anthropic_emulator):
    ids = ["a", "Z" * 64, "under_score-and-dash-09"]
    await provider.batch.submit([(i, LLMRequest.from_prompt("x", MODEL)) for i in ids])
    assert [r["custom_id"] for r in anthropic_emulator.bodies("batches.create")[0]["requests"]] == ids


@pytest.mark.parametrize(
    ("bad_items", "names", "problem"),
    [
        ([("has space", LLMRequest.from_prompt("x", MODEL))], "'has space'", "must match"),
        ([("x" * 65, LLMRequest.from_prompt("x", MODEL))], "'xxxx", "must match"),
        ([("", LLMRequest.from_prompt("x", MODEL))], "''", "must match"),
        ([("dots.not.allowed", LLMRequest.from_prompt("x", MODEL))], "dots.not.allowed", "must match"),
        ([*items(2), ("item-1", LLMRequest.from_prompt("x", MODEL))], "'item-1'", "used twice"),
        ([("empty", LLMRequest(messages=[], model=MODEL))], "'empty'", "messages is empty"),
        ([("zero", LLMRequest.from_prompt("x", MODEL, max_tokens=0))], "'zero'", "max_tokens"),
        ([("negative", LLMRequest.from_prompt("x", MODEL, max_tokens=-1))], "'negative'", "max_tokens"),
        ([("obj", LLMRequest.from_prompt("x", MODEL, options={"metadata": object()}))], "'obj'", "JSON"),
        ([("nan", LLMRequest.from_prompt("x", MODEL, temperature=math.nan))], "'nan'", "JSON"),
        ([("stream", LLMRequest.from_prompt("x", MODEL, options={"stream": True}))], "'stream'", "stream"),
        ([], None, "at least one"),
    ],
)
async def test_invalid_requests_are_refused_before_sending(
    provider, anthropic_emulator, bad_items, names, problem
):
    with pytest.raises(BatchError, match=problem) as info:
        await provider.batch.submit(bad_items)
    assert info.value.status == 400
    assert info.value.retryable is False
    if names:
        assert names in str(info.value)
    assert anthropic_emulator.calls["batches.create"] == 0
    assert anthropic_emulator.batches_created == 0


async def test_a_bad_max_tokens_variable_is_a_config_error(provider, anthropic_emulator, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_ANTHROPIC_MAX_TOKENS", "lots")
    with pytest.raises(ConfigError, match="POCKETBATCH_ANTHROPIC_MAX_TOKENS"):
        await provider.batch.submit(items(1))
    assert anthropic_emulator.calls["batches.create"] == 0


async def test_too_many_requests_is_413(provider, anthropic_emulator):
    provider.batch.max_requests = 3
    with pytest.raises(BatchError, match="over the Message Batches limit of 3") as info:
        await provider.batch.submit(items(4))
    assert info.value.status == 413
    assert anthropic_emulator.calls["batches.create"] == 0
    await provider.batch.submit(items(3))
    assert anthropic_emulator.batches_created == 1


async def test_max_bytes_is_the_exact_body_size(provider, anthropic_emulator):
    batch_items = [*items(3), ("unicode", LLMRequest.from_prompt("héllo ✓ 日本", MODEL, system="ß"))]
    await provider.batch.submit(batch_items)
    (sent,) = anthropic_emulator.requests
    exact = sent.size
    assert exact == len(json.dumps(sent.body, ensure_ascii=False, separators=(",", ":")).encode())

    provider.batch.max_bytes = exact - 1
    with pytest.raises(BatchError) as info:
        await provider.batch.submit(batch_items)
    assert info.value.status == 413
    assert f"{exact:,} bytes" in str(info.value)
    assert anthropic_emulator.calls["batches.create"] == 1

    provider.batch.max_bytes = exact
    await provider.batch.submit(batch_items)
    assert anthropic_emulator.batches_created == 2


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(413, False), (400, False), (429, True), (500, True), (529, True)],
)
async def test_api_refusals_of_create_are_batch_errors(provider, anthropic_emulator, status, retryable):
    anthropic_emulator.fail_next(
        1, status=status, route="batches.create", retry_after=4 if status == 429 else None
    )
    with pytest.raises(BatchError) as info:
        await provider.batch.submit(items(2))
    assert (info.value.status, info.value.retryable) == (status, retryable)
    assert info.value.rate_limits is not None
    if status == 429:
        assert info.value.retry_after == 4.0
    assert anthropic_emulator.batches_created == 0


async def test_create_timeout_is_a_retryable_batch_error(provider, anthropic_emulator):
    anthropic_emulator.fail_next(1, status="timeout", route="batches.create")
    with pytest.raises(BatchError) as info:
        await provider.batch.submit(items(1))
    assert info.value.retryable is True and info.value.status is None


async def test_cancel(provider, anthropic_emulator):
    anthropic_emulator.done_before_cancel = 1
    anthropic_emulator.results_for = {"item-3": "invalid_request_error"}
    batch = provider.batch
    job_id = await batch.submit(items(4))
    assert (await batch.status(job_id)).state == "running"

    assert await batch.cancel(job_id) is None
    assert anthropic_emulator.calls["batches.cancel"] == 1
    states, status = await run_to_end(batch, job_id)
    assert states == ["cancelling", "ended"]
    assert status.counts == {"processing": 0, "succeeded": 1, "errored": 1, "canceled": 2, "expired": 0}
    assert status.raw.cancel_initiated_at is not None

    results = dict(await collect(batch, job_id))
    assert results["item-0"] == "reply to: question 0"
    for custom_id in ("item-1", "item-2"):
        assert type(results[custom_id]) is TransientError and results[custom_id].retryable
        assert "cancelled" in str(results[custom_id])
    assert type(results["item-3"]) is RequestError


async def test_cancelling_twice_or_after_the_end_changes_nothing(provider, anthropic_emulator):
    anthropic_emulator.polls_until_ended = 0
    job_id = await provider.batch.submit(items(2))
    assert (await provider.batch.status(job_id)).state == "ended"
    await provider.batch.cancel(job_id)
    await provider.batch.cancel(job_id)
    assert (await provider.batch.status(job_id)).counts["succeeded"] == 2


async def test_results_before_the_end_are_a_retryable_error(provider, anthropic_emulator):
    anthropic_emulator.polls_until_ended = 5
    job_id = await provider.batch.submit(items(2))
    with pytest.raises(TransientError, match="no results yet") as info:
        await collect(provider.batch, job_id)
    assert info.value.retryable is True
    assert anthropic_emulator.calls["batches.results"] == 0


@pytest.mark.parametrize(
    ("route", "status", "cls"),
    [
        ("batches.retrieve", 500, TransientError),
        ("batches.retrieve", 529, TransientError),
        ("batches.retrieve", 429, RateLimitError),
        ("batches.retrieve", 404, RequestError),
        ("batches.retrieve", "connection", TransientError),
        ("batches.results", 503, TransientError),
        ("batches.results", "timeout", TransientError),
        ("batches.cancel", 500, TransientError),
    ],
)
async def test_poll_errors_translate_as_on_the_concurrent_path(
    provider, anthropic_emulator, route, status, cls
):
    anthropic_emulator.polls_until_ended = 0
    job_id = await provider.batch.submit(items(2))
    anthropic_emulator.fail_next(1, status=status, route=route)
    with pytest.raises(cls) as info:
        if route == "batches.retrieve":
            await provider.batch.status(job_id)
        elif route == "batches.results":
            await collect(provider.batch, job_id)
        else:
            await provider.batch.cancel(job_id)
    if isinstance(status, int):
        assert info.value.status == status
    # The failure is one poll's: the next one works.
    assert (await provider.batch.status(job_id)).state == "ended"
    assert len(await collect(provider.batch, job_id)) == 2


async def test_unknown_job_is_a_request_error(provider, anthropic_emulator):
    with pytest.raises(RequestError) as info:
        await provider.batch.status("msgbatch_nope")
    assert info.value.status == 404


async def test_missing_key_is_a_config_error_before_any_call(provider, anthropic_emulator, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        await provider.batch.submit(items(1))
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        await provider.batch.status("msgbatch_1")
    assert anthropic_emulator.requests == []


async def test_unknown_processing_status_keeps_polling(anthropic_emulator, monkeypatch, caplog):
    # Production clients validate leniently, so a state newer than the SDK arrives as a plain str.
    provider = AnthropicProvider()
    job_id = await provider.batch.submit(items(1))
    original = anthropic_emulator._batch_body
    monkeypatch.setattr(
        anthropic_emulator, "_batch_body", lambda b: {**original(b), "processing_status": "paused"}
    )
    status = await provider.batch.status(job_id)
    assert status.state == "running"
    assert "paused" in caplog.text
