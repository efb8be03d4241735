"""Events and the Summary built from them: what a progress bar and the CLI's summary read."""

from __future__ import annotations

import asyncio

import pytest

from pocketbatch.engine import concurrent, events
from pocketbatch.errors import RateLimitError, RequestError, TransientError

from .conftest import FAST, ServerProvider, requests


async def test_a_summary_adds_up_a_run(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_MAX_RETRIES="2")
    fail = {"item 1": RequestError("400", status=400), "item 2": TransientError("503", status=503)}
    provider = ServerProvider(
        name="sum", server_rps=200, burst=2, rpm=200 * 60, fail=fail, prices={"m": (1.0, 1.0)}
    )
    seen: list[events.Event] = []
    with events.summarize() as summary, events.listen(seen.append):
        results = await concurrent.run_all(provider, requests(20), policy=FAST)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert (summary.items, summary.ok, summary.failed) == (20, 18, 2)
    assert summary.rate_limited == provider.count(429)
    # every attempt after an item's first was announced by a retried event
    assert summary.retries == sum(provider.attempts(f"item {i}") - 1 for i in range(20)) >= 1
    assert summary.input_tokens == sum(r.usage.input_tokens for r in ok)
    assert summary.output_tokens == sum(r.usage.output_tokens for r in ok) == 18 * 3
    assert summary.cost_usd == pytest.approx(sum(r.cost_usd for r in ok))
    assert summary.via == {"concurrent": 18} and summary.ended_at is not None
    assert {e.item for e in seen if e.kind == events.FAILED} == {1, 2}
    retried = [e for e in seen if e.kind == events.RETRIED]
    assert all(e.wait is not None and e.wait >= 0 and e.error is not None for e in retried)
    assert "20 items: 18 ok, 2 failed" in str(summary)


async def test_listeners_see_only_what_runs_inside_their_block_and_tasks():
    provider = ServerProvider(name="scope")
    inside: list[events.Event] = []
    await concurrent.call(provider, requests(1)[0])
    with events.listen(inside.append):
        await asyncio.ensure_future(concurrent.call(provider, requests(1)[0]))  # a task started inside
    await concurrent.call(provider, requests(1)[0])
    assert [e.kind for e in inside] == [events.STARTED, events.DONE]


async def test_a_listener_that_raises_does_not_fail_the_call(caplog):
    def broken(event):
        raise RuntimeError("progress bar bug")

    with events.listen(broken):
        response = await concurrent.call(ServerProvider(name="broken"), requests(1)[0])
    assert response == "re: item 0"
    assert "listener" in caplog.text


async def test_a_rate_limited_attempt_is_reported_with_its_error():
    provider = ServerProvider(name="rl")
    provider.fail = {"item 0": RateLimitError("429", status=429, retry_after=0.0, retryable=False)}
    seen: list[events.Event] = []
    with events.listen(seen.append), pytest.raises(RateLimitError):
        await concurrent.call(provider, requests(1)[0], policy=FAST)
    assert [e.kind for e in seen] == [events.STARTED, events.RATE_LIMITED, events.FAILED]
    assert seen[1].error is provider.fail["item 0"] and seen[1].attempt == 1
