"""The offline provider behaves like a real server: limits, failures, and a batch API with its habits."""

import asyncio
import json

import pytest

from pocketbatch import BatchError, ConfigError, LLMRequest, RateLimitError, RequestError, TransientError
from pocketbatch.default_plugins.offline import OfflineProvider


def request(text, **options):
    return LLMRequest.from_prompt(text, "offline-small", options=options)


async def test_replies_are_deterministic_and_counted():
    offline = OfflineProvider()
    a = await offline.call_llm_async(request("Summarize: the cat sat on the mat"))
    b = await offline.call_llm_async(request("Summarize: the cat sat on the mat"))
    assert a == b and "the cat sat" in a
    assert a.usage.input_tokens > 0 and a.provider == "offline" and a.via == "concurrent"


async def test_server_limit_answers_429_with_retry_after(pocketbatch_env, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_SERVER_RPM", "60")  # one a second, burst of 5
    offline = OfflineProvider()
    for _ in range(5):
        await offline.call_llm_async(request("x"))
    with pytest.raises(RateLimitError) as err:
        await offline.call_llm_async(request("x"))
    assert err.value.status == 429 and 0 < err.value.retry_after <= 1.0
    assert err.value.rate_limits.limit_requests == 60


async def test_settings_are_read_like_every_pocketbatch_variable(monkeypatch):
    from pocketbatch import config

    offline = OfflineProvider()
    await offline.call_llm_async(request("x"))
    monkeypatch.setenv("POCKETBATCH_OFFLINE_LATENCY", "soon")
    await offline.call_llm_async(request("x"))  # read once, as the other settings are
    config.reload()
    with pytest.raises(ConfigError, match="POCKETBATCH_OFFLINE_LATENCY must be a number"):
        await offline.call_llm_async(request("x"))


async def test_marked_requests_fail_as_asked():
    offline = OfflineProvider()
    with pytest.raises(RequestError):
        await offline.call_llm_async(request("x", offline_error="request"))
    with pytest.raises(TransientError):
        await offline.call_llm_async(request("x", offline_error="transient"))


async def wait_ended(batch, job_id):
    while (status := await batch.status(job_id)).state != "ended":
        await asyncio.sleep(0.01)
    return status


async def test_batch_round_trip_out_of_order_with_failures(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0.05")
    batch = OfflineProvider().batch
    items = [(f"item-{i}", request(f"text {i}")) for i in range(40)]
    items[3] = ("item-3", request("text 3", offline_error="expired"))
    items[4] = ("item-4", request("text 4", offline_error="request"))
    job = await batch.submit(items)
    assert (await batch.status(job)).state == "running"
    status = await wait_ended(batch, job)
    results = [(cid, r) async for cid, r in batch.results(job)]
    assert sorted(cid for cid, _ in results) == sorted(cid for cid, _ in items)
    assert [cid for cid, _ in results] != [cid for cid, _ in items]  # shuffled, as real APIs do
    by_id = dict(results)
    assert isinstance(by_id["item-3"], TransientError) and by_id["item-3"].retryable
    assert isinstance(by_id["item-4"], RequestError) and not by_id["item-4"].retryable
    assert by_id["item-0"].via == "batch" and "text 0" in by_id["item-0"]
    assert status.counts == {"succeeded": 38, "expired": 1, "errored": 1}


async def test_batch_fail_rate_errors_and_expires_some_lines(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0")
    monkeypatch.setenv("POCKETBATCH_OFFLINE_FAIL_RATE", "0.5")
    batch = OfflineProvider().batch
    job = await batch.submit([(f"i{i}", request(str(i))) for i in range(200)])
    counts = (await wait_ended(batch, job)).counts
    assert counts["errored"] > 20 and counts["expired"] > 20 and counts["succeeded"] > 50


async def test_batch_jobs_outlive_the_provider_object(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0")
    job = await OfflineProvider().batch.submit([("a", request("hello"))])
    again = OfflineProvider().batch  # as after a restart
    assert (await again.status(job)).state == "ended"
    assert [cid async for cid, _ in again.results(job)] == ["a"]


async def test_a_job_written_with_its_lines_inside_is_still_read(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0")
    batch = OfflineProvider().batch
    job = await batch.submit([("a", request("hello")), ("b", request("there"))])
    # As an earlier pocketbatch wrote it: one .json, the request lines inside.
    header, lines = batch.folder() / f"{job}.json", batch.folder() / f"{job}.jsonl"
    old = json.loads(header.read_text())
    del old["count"]
    old["lines"] = lines.read_text().splitlines()
    header.write_text(json.dumps(old))
    lines.unlink()
    assert (await batch.status(job)).counts == {"succeeded": 2}
    replies = {cid: str(reply) async for cid, reply in batch.results(job)}
    offline = OfflineProvider()
    assert replies == {
        "a": await offline.call_llm_async(request("hello")),
        "b": await offline.call_llm_async(request("there")),
    }


async def test_cancel_ends_the_job_with_unfinished_lines_cancelled(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "60")
    batch = OfflineProvider().batch
    job = await batch.submit([(f"i{i}", request(str(i))) for i in range(10)])
    await batch.cancel(job)
    assert (await batch.status(job)).counts == {"canceled": 10}
    results = [r async for _, r in batch.results(job)]
    assert all(isinstance(r, TransientError) and "cancelled" in str(r) for r in results)


async def test_submit_refuses_oversized_batches_with_413():
    batch = OfflineProvider().batch
    batch.max_requests = 3
    with pytest.raises(BatchError) as err:
        await batch.submit([(f"i{i}", request("x")) for i in range(4)])
    assert err.value.status == 413


async def test_unknown_job_is_a_request_error():
    with pytest.raises(RequestError, match="no batch job"):
        await OfflineProvider().batch.status("offline-batch-missing")


def test_a_replys_digest_is_of_the_prompts_json():
    from pocketbatch.default_plugins.offline import _reply_key

    parts = [{"type": "text", "text": "a"}]
    for request in (
        LLMRequest.from_prompt('say "hi" ünïcode\n', "offline-small"),
        LLMRequest.from_prompt([{"content": "x", "role": "user"}], "offline-small"),
        LLMRequest.from_prompt("hi", "offline-small", system="be brief"),
        LLMRequest.from_prompt([{"role": "user", "content": parts}], "offline-small"),
    ):
        assert _reply_key(request) == json.dumps([request.system, request.messages])
