"""The worker pool against a fake server with a limit: nothing lost, few 429s, limits that learn."""

from __future__ import annotations

import asyncio

import pytest

from pocketbatch.engine import concurrent
from pocketbatch.engine.limits import BURST, HEADER_MARGIN, limiter_for
from pocketbatch.errors import ConfigError, LLMError, RequestError
from pocketbatch.providers import LLMResponse, Usage

from .conftest import FAST, ServerProvider, requests


async def test_every_item_returns_in_order_with_few_429s_when_the_limit_is_configured(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_CONF_RPM=str(500 * 60))
    provider = ServerProvider(name="conf", server_rps=500, latency=0.002)
    results = await concurrent.run_all(provider, requests(400), policy=FAST)
    assert [str(r) for r in results] == [f"re: item {i}" for i in range(400)]
    assert provider.count(429) <= 400 * 0.02


async def test_one_items_failure_stays_with_that_item():
    fail = {"item 3": RequestError("400 bad", status=400), "item 7": ValueError("provider bug")}
    provider = ServerProvider(name="mixed", fail=fail)
    results = await concurrent.run_all(provider, requests(10), policy=FAST)
    assert results[3] is fail["item 3"]
    assert isinstance(results[7], LLMError) and "ValueError: provider bug" in str(results[7])
    assert results[7].__cause__ is fail["item 7"]
    assert [str(r) for i, r in enumerate(results) if i not in (3, 7)] == [
        f"re: item {i}" for i in range(10) if i not in (3, 7)
    ]


async def test_a_missing_key_is_a_config_error_before_any_call(monkeypatch):
    monkeypatch.delenv("ENGINE_TEST_MISSING_KEY", raising=False)
    provider = ServerProvider(name="keyed")
    provider.key_env_var = "ENGINE_TEST_MISSING_KEY"
    with pytest.raises(ConfigError, match="ENGINE_TEST_MISSING_KEY"):
        await concurrent.run_all(provider, requests(5))
    with pytest.raises(ConfigError, match="ENGINE_TEST_MISSING_KEY"):
        await concurrent.call(provider, requests(1)[0])
    assert provider.hits == []


async def test_cost_is_filled_from_prices_when_the_provider_left_it_none():
    provider = ServerProvider(name="priced", prices={"m": (1.0, 2.0)})
    response = await concurrent.call(provider, requests(1)[0])
    assert response.usage == Usage(6, 3)
    assert response.cost_usd == pytest.approx((6 * 1.0 + 3 * 2.0) / 1e6)

    class Own(ServerProvider):
        async def call_llm_async(self, request):
            return LLMResponse("x", usage=Usage(1, 1), cost_usd=0.5)

    assert (await concurrent.call(Own(name="own", prices={"m": (1.0, 2.0)}), requests(1)[0])).cost_usd == 0.5


async def test_the_concurrency_cap_bounds_calls_in_flight(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_CAP_MAX_CONCURRENCY="3")
    provider = ServerProvider(name="cap", latency=0.005)
    await concurrent.run_all(provider, requests(30), workers=20)
    assert provider.max_in_flight == 3


async def test_the_pool_does_not_start_a_task_per_item():
    provider = ServerProvider(name="pool")
    tasks_before = len(asyncio.all_tasks())
    seen: list[int] = []

    async def watch():
        while len(provider.hits) < 1000:
            seen.append(len(asyncio.all_tasks()) - tasks_before)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    results = await concurrent.run_all(provider, requests(1000), workers=10)
    watcher.cancel()
    assert len(results) == 1000 and max(seen) <= 10 + 1  # the workers and the watcher itself


async def until(condition) -> None:
    """Wait for the event loop to make condition() true (failing, not hanging, if it never does)."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout=30)


async def test_cancelling_the_caller_cancels_the_calls_in_flight(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_CANCEL_RPM=0, POCKETBATCH_CANCEL_TPM=0)  # unlimited: eight go at once
    provider = ServerProvider(name="cancel", latency=60)
    run = asyncio.ensure_future(concurrent.run_all(provider, requests(100), workers=8))
    await until(lambda: provider.in_flight == 8)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert provider.in_flight == 0 and provider.cancelled == 8
    assert len(provider.hits) == 8  # no item started after the cancel

    single = asyncio.ensure_future(concurrent.call(provider, requests(1)[0]))
    await until(lambda: provider.in_flight == 1)
    single.cancel()
    with pytest.raises(asyncio.CancelledError):
        await single
    assert provider.in_flight == 0 and provider.cancelled == 9


async def test_a_user_ceiling_is_never_exceeded_even_when_the_server_reports_more(pocketbatch_env):
    pocketbatch_env(
        POCKETBATCH_CEIL_RPM=str(200 * 60)
    )  # 200/s, under a server that allows and reports 1000/s
    provider = ServerProvider(name="ceil", server_rps=1000, report=True)
    limiter = limiter_for(provider, "m")
    rates: list[float] = []

    async def sample():
        while True:
            rates.append(limiter.rpm)
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    await concurrent.run_all(provider, requests(200))
    sampler.cancel()
    assert max(rates) <= 200 * 60
    # the server's own clock: never more than a burst plus the ceiling's share of any window
    for window in (0.02, 0.1, 0.5):
        assert provider.max_in_window(window) <= BURST + 200 * window + 1


async def test_learning_from_reported_limits_converges_to_the_reported_limit():
    # nothing configured; the provider's default (100/s) is only where learning starts
    provider = ServerProvider(name="hdr", server_rps=500, report=True, rpm=100 * 60, latency=0.001)
    results = await concurrent.run_all(provider, requests(400), policy=FAST)
    assert all(isinstance(r, LLMResponse) for r in results)
    assert limiter_for(provider, "m").rpm == pytest.approx(500 * 60 * HEADER_MARGIN)
    assert provider.count(429) <= 400 * 0.02


@pytest.mark.parametrize("default_rps", [100, 0], ids=["from-default", "from-unlimited"])
async def test_learning_from_429s_alone_converges_near_the_servers_limit(default_rps):
    provider = ServerProvider(name=f"aimd{default_rps}", server_rps=500, rpm=default_rps * 60, latency=0.001)
    results = await concurrent.run_all(provider, requests(600), policy=FAST)
    assert all(isinstance(r, LLMResponse) for r in results)
    learned = limiter_for(provider, "m").rpm / 60
    assert 0.6 * 500 <= learned <= 1.3 * 500
    # measured by the server: the second half of the run went at most of its limit, with few 429s
    assert provider.ok_rate(since=0.5) >= 0.7 * 500
    assert provider.count(429) <= 600 * 0.05
