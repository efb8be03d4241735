"""The one retry layer: what is retried, how many times, how long it waits, and the per-call timeout."""

from __future__ import annotations

import random

import pytest
from tenacity import RetryCallState, RetryError

from pocketbatch.engine import concurrent
from pocketbatch.engine.retry import RetryPolicy, is_retryable, wait_for
from pocketbatch.errors import ConfigError, LLMError, RateLimitError, RequestError, TransientError

from .conftest import FAST, ServerProvider, requests


class Scripted(ServerProvider):
    """Raises the queued errors in turn, then answers."""

    def __init__(self, *errors: BaseException, **kw) -> None:
        super().__init__(**kw)
        self.errors = list(errors)
        self.calls = 0

    async def call_llm_async(self, request):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await super().call_llm_async(request)


@pytest.mark.parametrize(
    "error",
    [
        RequestError("400 bad request", status=400),
        ConfigError("no such model"),
        RateLimitError("insufficient_quota", status=429, retryable=False),
        LLMError("unknown failure"),
        ValueError("a bug in the provider"),
    ],
    ids=lambda e: type(e).__name__ + ("(retryable=False)" if isinstance(e, RateLimitError) else ""),
)
async def test_what_is_not_retryable_gets_exactly_one_attempt(error):
    provider = Scripted(error, error, error, name="once")
    with pytest.raises(type(error)) as raised:
        await concurrent.call(provider, requests(1)[0], policy=FAST)
    assert raised.value is error and provider.calls == 1


async def test_attempts_are_max_retries_and_the_last_error_is_raised_as_itself(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_MAX_RETRIES="3")
    errors = [TransientError(f"503 #{i}", status=503) for i in range(5)]
    provider = Scripted(*errors, name="thrice")
    with pytest.raises(TransientError) as raised:
        await concurrent.call(provider, requests(1)[0], policy=FAST)
    assert provider.calls == 3
    assert raised.value is errors[2] and not isinstance(raised.value, RetryError)


async def test_a_retryable_error_then_success_returns_the_response():
    provider = Scripted(
        TransientError("502", status=502), RateLimitError("429", retry_after=0.001), name="ok"
    )
    response = await concurrent.call(provider, requests(1)[0], policy=FAST)
    assert response == "re: item 0" and provider.calls == 3


async def test_the_retry_layer_is_single_through_the_worker_pool(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_MAX_RETRIES="4")
    failing = {f"item {i}": TransientError("500", status=500) for i in range(10)}
    provider = ServerProvider(name="single", fail=failing)
    results = await concurrent.run_all(provider, requests(10), policy=FAST)
    assert all(isinstance(r, TransientError) for r in results)
    assert [provider.attempts(f"item {i}") for i in range(10)] == [4] * 10


def _state(error: BaseException, attempt: int = 1) -> RetryCallState:
    state = RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_the_wait_is_retry_after_or_backoff_plus_positive_jitter_capped():
    random.seed(7)
    policy = RetryPolicy()
    wait = wait_for(policy)
    waits = [wait(_state(RateLimitError("429", retry_after=2.0))) for _ in range(500)]
    assert min(waits) >= 2.0  # jitter never shortens a Retry-After
    assert max(waits) <= 2.0 * (1 + policy.jitter) + policy.jitter_min
    assert len({round(w, 6) for w in waits}) > 400  # spread out, not lock-step
    backoffs = [wait(_state(TransientError("500"), attempt=3)) for _ in range(500)]
    assert 0 <= min(backoffs) and max(backoffs) <= 2.0 * (1 + policy.jitter) + policy.jitter_min
    assert wait(_state(RateLimitError("429", retry_after=3600.0))) == policy.max_wait


def test_only_retryable_llm_errors_are_retryable():
    assert is_retryable(RateLimitError("429")) and is_retryable(TransientError("503"))
    assert not is_retryable(RateLimitError("quota", retryable=False))
    assert is_retryable(RequestError("400 but x-should-retry: true", retryable=True))
    assert not any(map(is_retryable, [RequestError("400"), ConfigError("key"), ValueError(), LLMError("x")]))


async def test_retry_after_is_honoured_by_the_retry_and_by_everyone_else():
    # burst 1 at 20 requests/s: 8 concurrent callers get 429s with Retry-After up to 0.05 s
    provider = ServerProvider(name="honour", server_rps=20, burst=1)
    results = await concurrent.run_all(provider, requests(8), workers=8, policy=FAST)
    assert all(r.startswith("re: ") for r in results)
    hits = sorted(provider.hits, key=lambda h: h.t)
    for i, hit in enumerate(hits):
        if hit.status == 429:
            # the server said "not before t + Retry-After": neither this caller nor any other came sooner
            later = [h for h in hits[i + 1 :] if h.t < hit.t + hit.retry_after - 1e-3]
            assert later == [], f"requests within the Retry-After of a 429: {later}"
    assert provider.count(429) >= 1  # the case under test did happen


async def test_a_call_that_hangs_times_out_as_a_transient_error(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_TIMEOUT="0.05", POCKETBATCH_MAX_RETRIES="2")
    provider = ServerProvider(name="hang", latency=30)
    with pytest.raises(TransientError, match=r"timed out after 0.05s"):
        await concurrent.call(provider, requests(1)[0], policy=FAST)
    assert len(provider.hits) == 2 and provider.cancelled == 2 and provider.in_flight == 0
