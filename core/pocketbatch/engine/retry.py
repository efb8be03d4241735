"""The engine's one retry layer (providers build SDK clients with max_retries=0): tenacity, retrying only
retryable LLMErrors, waiting max(Retry-After, full-jitter backoff) plus a small positive jitter."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from ..config import settings
from ..errors import LLMError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How one call is retried. The defaults suit real APIs; tests pass shorter backoffs."""

    attempts: int | None = None  # total attempts; None: settings().max_retries (POCKETBATCH_MAX_RETRIES)
    backoff: float = 0.5  # full-jitter exponential backoff: uniform(0, backoff * 2**n), the SDKs' start
    backoff_max: float = 30.0
    jitter: float = 0.1  # positive jitter on top: up to this fraction of the wait ...
    jitter_min: float = 0.02  # ... plus up to this many seconds, so equal Retry-Afters spread out
    max_wait: float = 120.0  # no single wait is longer (the OpenAI SDK's own Retry-After cap)


DEFAULT_POLICY = RetryPolicy()


def is_retryable(exc: BaseException) -> bool:
    """Only the provider's verdict counts: never ConfigError, RequestError or an unexpected exception."""
    return isinstance(exc, LLMError) and exc.retryable


def wait_for(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    """tenacity wait: max(Retry-After, backoff) + positive jitter, capped at policy.max_wait."""
    backoff = wait_random_exponential(multiplier=policy.backoff, max=policy.backoff_max)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None) or 0.0
        base = max(retry_after, backoff(state))
        # Jitter only ever adds: a wait shorter than Retry-After is a guaranteed 429.
        return min(policy.max_wait, base + random.uniform(0, policy.jitter * base + policy.jitter_min))

    return wait


def retrying(
    policy: RetryPolicy | None = None,
    *,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """A fresh AsyncRetrying (its state is per object, so one per call) with all four unsafe defaults
    replaced: stop, wait, retry and reraise (the final error is the LLMError itself, not RetryError)."""
    policy = policy or DEFAULT_POLICY
    attempts = policy.attempts if policy.attempts is not None else settings().max_retries
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_for(policy),
        retry=retry_if_exception(is_retryable),
        reraise=True,
        before_sleep=before_sleep,
    )


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy | None = None,
    *,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    first_failure: LLMError | None = None,
) -> T:
    """Run `attempt()` until it returns, fails with a non-retryable error, or attempts run out.

    The first attempt runs bare: most calls succeed at once, and setting up tenacity costs more than the
    rest of a call's bookkeeping together. Only a retryable failure brings it in, handed that failure as
    its own first attempt, so waits, events and the count of attempts are what they would have been.
    A caller that made the first attempt itself passes its retryable failure as `first_failure`.
    """
    if first_failure is None:
        try:
            return await attempt()
        except LLMError as err:
            if not err.retryable:
                raise
            first_failure = err
    first: list[BaseException] = [first_failure]

    async def replay_then_attempt() -> T:
        if first:
            raise first.pop()
        return await attempt()

    return await retrying(policy, before_sleep=before_sleep)(replay_then_attempt)
