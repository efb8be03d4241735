"""The limiter's arithmetic (with a controlled clock) and its buckets (on a real event loop)."""

from __future__ import annotations

import asyncio
import math

import pytest

from pocketbatch.config import Limits
from pocketbatch.engine import limits
from pocketbatch.engine.limits import Limiter, LimiterKey, _Bucket, _Rate, key_fingerprint, limiter_for
from pocketbatch.errors import RateLimitError, TransientError
from pocketbatch.providers import LLMRequest, LLMResponse, RateLimits, Usage

from .conftest import ServerProvider


def test_the_key_is_fingerprinted_never_kept():
    assert key_fingerprint(None) == ""
    fp = key_fingerprint("sk-secret-123")
    assert fp and "secret" not in fp and fp == key_fingerprint("sk-secret-123") != key_fingerprint("sk-other")


def test_limiters_are_per_provider_model_and_key(monkeypatch):
    a = ServerProvider(name="a")
    assert limiter_for(a, "m1") is limiter_for(a, "m1")
    assert limiter_for(a, "m1") is not limiter_for(a, "m2")
    assert limiter_for(a, "m1") is not limiter_for(ServerProvider(name="b"), "m1")
    keyed = ServerProvider(name="k")
    keyed.key_env_var = "ENGINE_TEST_KEY"
    monkeypatch.setenv("ENGINE_TEST_KEY", "one")
    first = limiter_for(keyed, "m")
    monkeypatch.setenv("ENGINE_TEST_KEY", "two")
    assert limiter_for(keyed, "m") is not first
    assert "one" not in repr(limits.limiters()) and "two" not in repr(limits.limiters())


def test_limits_come_from_the_env_else_the_provider_defaults(pocketbatch_env):
    provider = ServerProvider(name="dflt", rpm=600, tpm=0, max_concurrency=3)
    limiter = limiter_for(provider, "m")
    assert limiter.rpm == 600 and limiter.tpm == math.inf and limiter.max_concurrency == 3
    assert limiter.learning() == {"rpm": True, "tpm": True}
    pocketbatch_env(POCKETBATCH_DFLT_RPM="1200", POCKETBATCH_TPM="0", POCKETBATCH_MAX_CONCURRENCY="0")
    limiter = limiter_for(provider, "m")  # reconfigured in place by the new settings
    assert limiter.rpm == 1200 and limiter.tpm == math.inf and limiter.max_concurrency == 0
    assert limiter.learning() == {"rpm": False, "tpm": False}


def test_a_user_ceiling_is_never_passed_and_turns_learning_off():
    rate = _Rate(configured=600, default=60, now=0.0)  # 10/s
    assert rate.rate == 10 and not rate.learn
    rate.queued = True
    assert not rate.grow(5.0) and rate.rate == 10
    assert not rate.reported(60_000)  # a higher reported limit is ignored
    assert rate.decrease(now=6.0, sent_at=5.9, observed=10)  # but a 429 still slows it
    assert rate.rate < 10
    for t in range(7, 200):
        rate.queued = True
        rate.grow(float(t))
        assert rate.rate <= 10
    assert rate.rate == pytest.approx(10)


def test_zero_means_unlimited_and_unlearned():
    rate = _Rate(configured=0, default=600, now=0.0)
    assert rate.rate == math.inf and rate.fixed_unlimited
    assert not rate.decrease(now=1.0, sent_at=0.5, observed=100)
    assert not rate.reported(600)
    assert rate.rate == math.inf


def test_slow_start_from_the_default_then_one_decrease_per_episode():
    rate = _Rate(configured=None, default=600, now=0.0)  # starts at 10/s, learning
    assert rate.rate == 10 and rate.slow_start
    rate.queued = True
    one_round = rate.round_seconds()
    assert rate.grow(one_round)  # doubles each round while callers queue
    assert rate.rate == pytest.approx(20)
    assert not rate.grow(one_round * 1.1)  # not a quarter round later yet
    rate.grow(one_round * 3)  # not queued: no growth without demand
    assert rate.rate == pytest.approx(20)
    assert rate.decrease(now=2.0, sent_at=1.9, observed=20)
    assert not rate.slow_start and rate.rate == pytest.approx(20 * limits.DECREASE)
    # 429s for requests sent before that decrease are the same episode
    assert not rate.decrease(now=2.05, sent_at=1.95, observed=20)
    assert rate.rate == pytest.approx(20 * limits.DECREASE)
    # additive: quick back to 95 % of where the 429 came, then a slow probe
    t = 2.0
    while rate.rate < limits.RECOVER_TO * 20 - 1e-9:
        t += rate.round_seconds()
        rate.queued = True
        rate.grow(t)
    assert rate.rate == pytest.approx(limits.RECOVER_TO * 20)
    steps = []
    for _ in range(3 * limits.PROBE_DOUBLING):
        before, t = rate.rate, t + rate.round_seconds()
        rate.queued = True
        rate.grow(t)
        steps.append(rate.rate - before)
    assert steps[0] == pytest.approx(limits.PROBE_STEP * 20 * 2 ** (1 / limits.PROBE_DOUBLING))
    # the probe's step doubles every PROBE_DOUBLING rounds without a 429
    assert steps[-1] == pytest.approx(steps[0] * 2 ** ((len(steps) - 1) / limits.PROBE_DOUBLING))


def test_slow_start_that_overshoots_resumes_just_under_what_the_provider_admitted():
    rate = _Rate(configured=None, default=600, now=0.0)
    t = 0.0
    while rate.rate < 40:  # doubling from 10/s past a limit of 25/s
        t += rate.round_seconds()
        rate.queued = True
        rate.grow(t)
    # one decrease lands under the limit, where DECREASE alone would take several 429s to get there
    assert rate.decrease(now=t, sent_at=t, observed=rate.rate, admitted=25)
    assert not rate.slow_start and rate.anchor == 25 and rate.rate == pytest.approx(limits.RECOVER_TO * 25)


def test_429s_again_near_the_same_rate_make_the_probe_slower():
    def probe_step(rate: _Rate, t: float) -> float:
        while rate.rate < limits.RECOVER_TO * rate.anchor - 1e-9:  # recover first
            t += rate.round_seconds()
            rate.queued = True
            rate.grow(t)
        before = rate.rate
        rate.queued = True
        rate.grow(t + rate.round_seconds())
        return rate.rate - before

    rate = _Rate(configured=None, default=1200, now=0.0)
    rate.slow_start = False
    assert rate.decrease(now=1.0, sent_at=1.0, observed=20)  # the first 429 at 20/s
    first = probe_step(rate, 1.0)
    rate.rate = 20.5  # the probe reached the same limit again
    assert rate.decrease(now=9.0, sent_at=9.0, observed=20)
    assert rate.confirmed == 1
    assert probe_step(rate, 9.0) == pytest.approx(first / 2, rel=0.05)
    rate.rate = 40  # far from it: the limit moved, probe at full speed again
    assert rate.decrease(now=20.0, sent_at=20.0, observed=40)
    assert rate.confirmed == 0


def test_a_reported_limit_is_learned_at_once_with_a_margin():
    rate = _Rate(configured=None, default=600, now=0.0)
    assert rate.reported(3000)
    assert rate.rate == pytest.approx(50 * limits.HEADER_MARGIN)
    rate.queued = True
    rate.grow(10.0)
    assert rate.rate == pytest.approx(50 * limits.HEADER_MARGIN)  # never above what was reported


def test_an_unlimited_default_is_learned_from_the_first_429():
    rate = _Rate(configured=None, default=0, now=0.0)
    assert rate.rate == math.inf
    assert rate.decrease(now=1.0, sent_at=0.9, observed=200)
    assert rate.rate == pytest.approx(100) and rate.slow_start


async def test_the_bucket_rate_changes_under_waiting_tasks():
    bucket = _Bucket(rate=0.01, capacity=1, version=0)  # one request per 100 s
    await bucket.acquire()
    waiter = asyncio.ensure_future(bucket.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    bucket.set_rate(10_000, 1, version=1)  # without a working set_rate the waiter sleeps 100 s
    await asyncio.wait_for(waiter, timeout=5)


def _request(prompt: str = "", max_tokens: int | None = None) -> LLMRequest:
    return LLMRequest([{"role": "user", "content": prompt}], "m", max_tokens=max_tokens)


def test_token_estimates_count_max_tokens_and_learn_from_usage():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(0, 0, 0))
    assert limiter.estimate_tokens(_request("x" * 400, max_tokens=100)) == 200  # 400 chars ≈ 100 tokens
    assert limiter.estimate_tokens(_request("x" * 400)) == 100 + limits.DEFAULT_OUTPUT_TOKENS
    ticket = limits.Ticket(0.0, 0, 400, True, None)
    for _ in range(200):  # the provider's tokenizer says these prompts are twice as long
        limiter.on_response(LLMResponse("ok", usage=Usage(200, 10)), ticket)
    assert limiter.estimate_tokens(_request("x" * 400)) == pytest.approx(200 + 10, abs=2)


async def test_the_recent_sends_are_counted_when_a_rate_may_grow_not_on_every_call(monkeypatch):
    counted = []
    per_second = limits._per_second
    monkeypatch.setattr(limits, "_per_second", lambda *a, **k: counted.append(1) or per_second(*a, **k))
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(0, 0, 0))  # learned, unlimited so far
    ticket = await limiter.acquire(_request())
    limiter.on_response(LLMResponse("ok", usage=Usage(1, 1)), ticket)
    for _ in range(2000):
        limiter.release(await limiter.acquire(_request()))
    assert len(counted) < 100  # a few a round (a round is at least a fraction of a second), not 2,000


async def test_a_429_pauses_everyone_for_its_retry_after():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(0, 0, 0))
    ticket = await limiter.acquire(_request())
    loop = asyncio.get_running_loop()
    limiter.on_error(RateLimitError("429", status=429, retry_after=0.05), ticket)
    paused_at = loop.time()
    waiters = [asyncio.ensure_future(limiter.acquire(_request())) for _ in range(5)]
    tickets = await asyncio.gather(*waiters)
    assert all(t.sent_at >= paused_at + 0.05 - 1e-3 for t in tickets)
    # an error that is not a rate limit does not pause
    limiter.on_error(TransientError("500", status=500), tickets[0])
    assert limiter.paused_until <= loop.time()


def test_exhausted_quota_is_not_a_rate():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(600, 0, 0))
    ticket = limits.Ticket(0.0, 0, 0, True, None)
    limiter.on_error(RateLimitError("insufficient_quota", status=429, retryable=False), ticket)
    assert limiter.rpm == 600 and limiter.paused_until == 0.0


def test_reported_limits_set_both_rates_and_a_token_429_slows_tokens():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(600, 0, 0))
    limiter.on_response(
        LLMResponse("ok", rate_limits=RateLimits(limit_requests=3000, limit_tokens=600_000)),
        limits.Ticket(0.0, 0, 0, True, None),
    )
    assert limiter.rpm == pytest.approx(3000 * limits.HEADER_MARGIN)
    assert limiter.tpm == pytest.approx(600_000 * limits.HEADER_MARGIN)
    err = RateLimitError("tpm", status=429, retry_after=0.0, rate_limits=RateLimits(remaining_tokens=0))
    limiter.on_error(err, limits.Ticket(1e9, 0, 0, True, None))
    assert limiter.tpm < 600_000 * limits.HEADER_MARGIN
    assert limiter.rpm == pytest.approx(3000 * limits.HEADER_MARGIN)


async def test_a_large_token_acquire_is_not_starved_by_small_ones(pocketbatch_env):
    # 1M tokens/s, a 1 s bucket; 10 workers keep asking for 10k-token requests at the full rate. aiolimiter
    # alone serves the smallest acquire first, so a 300k request would wait until the stream stopped.
    pocketbatch_env(POCKETBATCH_STARVE_TPM="60000000", POCKETBATCH_STARVE_RPM="0")
    limiter = limiter_for(ServerProvider(name="starve"), "m")
    order: list[str] = []
    big_done = asyncio.Event()

    async def small() -> None:
        while not big_done.is_set() and len(order) < 400:
            await limiter.acquire(_request(max_tokens=10_000))
            order.append("small")

    async def big() -> None:
        while len(order) < 120:  # let the small stream fill the bucket and queue up first
            await asyncio.sleep(0.001)
        order.append("big asks")
        await limiter.acquire(_request(max_tokens=300_000))
        order.append("big")
        big_done.set()

    await asyncio.gather(big(), *(small() for _ in range(10)))
    overtaken = order.index("big") - order.index("big asks") - 1
    assert overtaken <= 10 + 2  # only the small requests already queued when it asked (FIFO)


async def test_a_429_before_the_first_answer_pauses_but_is_not_taken_for_the_limit():
    # Nothing configured: the provider's default (600 RPM) is only a guess. A 429 for a request sent before
    # anything came back says the window was full (a start-up burst, another client), not what rate fits.
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(600, 0, 0))
    early = await limiter.acquire(_request())
    limiter.on_error(RateLimitError("429", status=429, retry_after=0.01), early)
    assert limiter.rpm == 600 and limiter.paused_until > 0
    limiter.release(early)
    later = await limiter.acquire(_request())  # sent after that first answer: its 429 is about this rate
    sending_at = limiter.rpm
    limiter.on_error(RateLimitError("429", status=429, retry_after=0.0), later)
    assert limiter.rpm == pytest.approx(sending_at * limits.DECREASE)


async def test_a_configured_limit_ignores_a_429_of_its_first_requests_too():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(rpm=3000), Limits(600, 0, 0))
    first = await limiter.acquire(_request())
    limiter.on_error(RateLimitError("429", status=429, retry_after=0.0), first)
    assert limiter.rpm == 3000


async def test_a_learning_limiter_sends_a_small_first_wave_and_the_rest_after_the_first_answer():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(0, 0, 0))  # unlimited by default, learned
    waiting = [asyncio.ensure_future(limiter.acquire(_request())) for _ in range(10)]
    for _ in range(5):
        await asyncio.sleep(0)
    first_wave = [w for w in waiting if w.done()]
    assert len(first_wave) == limits.FIRST_WAVE
    limiter.release(first_wave[0].result())  # a place freed without an answer (a timeout): one more goes
    for _ in range(5):
        await asyncio.sleep(0)
    assert sum(w.done() for w in waiting) == limits.FIRST_WAVE + 1
    limiter.on_response(LLMResponse("ok"), first_wave[1].result())  # the first answer: the wave is over
    tickets = await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)
    assert len(tickets) == 10


async def test_a_configured_limiter_has_no_first_wave():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(rpm=0, tpm=0), Limits(600, 0, 0))
    tickets = await asyncio.wait_for(
        asyncio.gather(*(limiter.acquire(_request()) for _ in range(10))), timeout=5
    )
    assert len(tickets) == 10


async def test_a_request_with_room_is_let_through_without_waiting_and_one_that_would_wait_is_not():
    unlimited = Limiter(LimiterKey("p", "m", ""), Limits(rpm=0, tpm=0), Limits(600, 0, 0))
    assert all(unlimited.admit_now(_request()) for _ in range(100))
    assert not unlimited._sends  # no rate of its can move: it keeps no history of what went out
    unlimited.pause(1.0)
    assert unlimited.admit_now(_request()) is None  # paused: acquire waits it out

    paced = Limiter(LimiterKey("p", "m", ""), Limits(rpm=60, tpm=0), Limits(0, 0, 0))  # one a second
    assert paced.admit_now(_request()) is not None
    assert paced.admit_now(_request()) is None  # the bucket is empty: acquire queues for it

    capped = Limiter(LimiterKey("p", "m", ""), Limits(rpm=0, tpm=0, max_concurrency=1), Limits(0, 0, 0))
    assert capped.admit_now(_request()) is None  # a place under the cap is taken in acquire
    learning = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(600, 0, 0))
    assert learning.admit_now(_request()) is None  # before the first answer: the first wave


async def test_a_bucket_starts_paced_not_with_a_burst():
    limiter = Limiter(LimiterKey("p", "m", ""), Limits(rpm=60), Limits(0, 0, 0))  # one a second
    first = await limiter.acquire(_request())
    second = asyncio.ensure_future(limiter.acquire(_request()))
    await asyncio.sleep(0.05)
    assert first and not second.done()  # a fresh bucket has room for one request, not BURST of them
    second.cancel()


async def test_sync_and_async_calls_at_once_share_one_limit(monkeypatch):
    """The sync call_llm's loop (in its own thread) and a parallel node's loop draw from one limit."""
    from pocketbatch import config
    from pocketbatch.engine import concurrent
    from pocketbatch.engine.limits import _rpm_capacity
    from pocketbatch.llm import _sync_loop

    from .conftest import FAST, ServerProvider, requests

    monkeypatch.setenv("POCKETBATCH_RPM", "600")  # 10 a second
    config.reload()
    provider = ServerProvider()  # keeps the books of both loops' calls
    sync_side = asyncio.run_coroutine_threadsafe(
        concurrent.run_all(provider, requests(25), policy=FAST), _sync_loop()
    )
    results = await concurrent.run_all(provider, requests(25), policy=FAST)
    results += await asyncio.wrap_future(sync_side)
    assert len(results) == 50 and not [r for r in results if isinstance(r, Exception)]
    assert provider.max_in_window(1.0) <= 10 + _rpm_capacity(10)  # each loop alone may send 10 a second


async def test_429s_for_concurrent_requests_teach_a_concurrency_cap(monkeypatch):
    """A provider with no concurrency cap of its own that refuses more than 5 requests at once: the
    limiter learns a cap instead of slowing its rate, and the 429s stop."""
    from pocketbatch.engine import concurrent

    from .conftest import FAST, requests

    provider = ServerProvider(server_concurrency=5, latency=0.02)
    results = await concurrent.run_all(provider, requests(200), policy=FAST)
    assert not [r for r in results if isinstance(r, Exception)]
    limiter = limiter_for(provider, "m")
    assert 1 <= limiter.max_concurrency <= 6 and limiter.rpm == math.inf  # the rate is left alone
    late = [h for h in provider.hits[len(provider.hits) // 2 :] if h.status == 429]
    assert len(late) <= 3  # once learned, the cap holds (it probes one above now and then)


async def test_a_sync_node_and_a_parallel_node_at_once_share_one_limit(monkeypatch, register_provider):
    """A BatchNode calling call_llm (in a thread) while an AsyncParallelBatchNode awaits call_llm_async:
    one server limit, counted by the provider's books."""
    from pocketbatch import AsyncParallelBatchNode, BatchNode, call_llm, call_llm_async, config
    from pocketbatch.engine.limits import _rpm_capacity

    monkeypatch.setenv("POCKETBATCH_RPM", "600")  # 10 a second
    monkeypatch.setenv("POCKETBATCH_MODE", "concurrent")
    config.reload()
    provider = register_provider(ServerProvider())

    class Sync(BatchNode):
        def prep(self, shared):
            return [f"sync {i}" for i in range(20)]

        def exec(self, prompt):
            return call_llm(prompt, model="srv/m")

    class Parallel(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return [f"async {i}" for i in range(20)]

        async def exec_async(self, prompt):
            return await call_llm_async(prompt, model="srv/m")

    await asyncio.gather(asyncio.to_thread(Sync().run, {}), Parallel().run_async({}))
    assert provider.count(200) == 40
    assert {h.item.split()[0] for h in provider.hits} == {"sync", "async"}
    assert provider.max_in_window(1.0) <= 10 + _rpm_capacity(10)  # each side alone may send 10 a second
