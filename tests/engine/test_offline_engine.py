"""The engine against the built-in offline provider's simulated server (429 + Retry-After, limit reported)."""

from __future__ import annotations

import pytest

from pocketbatch.default_plugins.offline import OfflineProvider
from pocketbatch.engine import concurrent, events
from pocketbatch.engine.limits import HEADER_MARGIN, limiter_for
from pocketbatch.providers import LLMResponse

from .conftest import FAST, requests

SERVER_RPM = 500 * 60


@pytest.fixture
def offline(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_OFFLINE_SERVER_RPM=str(SERVER_RPM), POCKETBATCH_OFFLINE_LATENCY="0.002")
    return OfflineProvider()


async def test_configured_limit_loses_nothing_and_draws_almost_no_429s(offline, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_OFFLINE_RPM=str(SERVER_RPM))
    with events.summarize() as summary:
        results = await concurrent.run_all(offline, requests(400, model="offline-small"), policy=FAST)
    assert all(isinstance(r, LLMResponse) and "item" in r for r in results)
    assert [r.split("] ")[1] for r in results] == [f"item {i}" for i in range(400)]
    assert summary.ok == 400 and summary.rate_limited <= 400 * 0.02
    assert summary.cost_usd is not None and summary.cost_usd > 0  # priced by the engine


async def test_unconfigured_limit_is_learned_from_what_the_server_reports(offline):
    with events.summarize() as summary:
        results = await concurrent.run_all(offline, requests(400, model="offline-small"), policy=FAST)
    assert all(isinstance(r, LLMResponse) for r in results)
    # the provider's default (6000 RPM) was only the start
    assert limiter_for(offline, "offline-small").rpm == pytest.approx(SERVER_RPM * HEADER_MARGIN)
    assert summary.rate_limited <= 400 * 0.02
