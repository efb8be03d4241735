"""The concurrent path: `call` sends one request under the limiter, retries and a timeout; `run_all`
sends many through a bounded worker pool and returns each item's response or its own error, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

from tenacity import RetryCallState

from ..config import settings
from ..errors import ConfigError, LLMError, RateLimitError
from ..providers import LLMRequest, LLMResponse, Provider
from . import events
from .limits import limiter_for
from .retry import RetryPolicy, with_retries
from .timeouts import within

T = TypeVar("T")

# Workers of run_all when the caller gives no number. The limiter's concurrency cap and rate buckets
# decide how many calls are in flight; workers only bound the tasks and memory (a 100-worker pool is
# ~4× faster and ~20× smaller than one task per item for 100,000 items). 256 covers a few thousand RPM
# at a few seconds of latency per call (Little's law: in flight = rate × latency).
DEFAULT_WORKERS = 256


class Sender:
    """Sends requests of one provider and model: the limiter, timeout and names every call of a round's
    group shares are looked up once, not per call (at 100,000 calls, the lookup alone was 3 µs a call)."""

    __slots__ = ("limiter", "policy", "provider", "timeout")

    def __init__(self, provider: Provider, model: str, policy: RetryPolicy | None = None) -> None:
        self.provider, self.policy = provider, policy
        self.limiter = limiter_for(provider, model)  # a missing key is a ConfigError here, before any call
        self.timeout = settings().timeout

    async def send(self, request: LLMRequest, item: int | None = None) -> LLMResponse:
        """Send one request: limiter acquired inside each attempt, retryable errors retried, each attempt
        bounded by POCKETBATCH_TIMEOUT; cost_usd filled from the provider's prices when it left it None.

        Raises the final LLMError (never tenacity's RetryError), or ConfigError before any call.
        """
        name, model = self.provider.name, request.model
        attempts = [1]
        told = events.listening()
        if told:
            events.emit(events.STARTED, name, model, item=item)
        try:
            try:
                response = await self._attempt(request, item, 1)
            except LLMError as err:
                if not err.retryable:
                    raise
                response = await self._retried(request, item, err, attempts)
        except Exception as err:
            events.emit(events.FAILED, name, model, item=item, attempt=attempts[0], error=err)
            raise
        if response.cost_usd is None:
            cost = self.provider.cost(response.model or model, response.usage)
            if cost is not None:
                response = response.replace(cost_usd=cost)
        if told:
            events.emit(
                events.DONE,
                name,
                model,
                item=item,
                attempt=attempts[0],
                usage=response.usage,
                cost_usd=response.cost_usd,
                via=response.via,
            )
        return response

    async def _retried(
        self, request: LLMRequest, item: int | None, first: LLMError, attempts: list[int]
    ) -> LLMResponse:
        """The attempts after a retryable first failure, under tenacity (only now set up: most calls
        never need it), counted in `attempts`."""
        name, model = self.provider.name, request.model

        def attempt() -> Awaitable[LLMResponse]:
            attempts[0] += 1
            return self._attempt(request, item, attempts[0])

        def before_sleep(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            wait = state.upcoming_sleep
            events.emit(events.RETRIED, name, model, item=item, attempt=attempts[0], error=err, wait=wait)

        return await with_retries(attempt, self.policy, before_sleep=before_sleep, first_failure=first)

    async def _attempt(self, request: LLMRequest, item: int | None, attempt: int) -> LLMResponse:
        limiter = self.limiter
        ticket = limiter.admit_now(request) or await limiter.acquire(request)
        try:
            response = await within(self.provider.call_llm_async(request), self.timeout)
        except LLMError as err:
            limiter.on_error(err, ticket)
            if isinstance(err, RateLimitError) or err.status == 429:
                events.emit(
                    events.RATE_LIMITED,
                    self.provider.name,
                    request.model,
                    item=item,
                    attempt=attempt,
                    error=err,
                )
            raise
        finally:
            limiter.release(ticket)
        limiter.on_response(response, ticket)
        return response


async def call(
    provider: Provider,
    request: LLMRequest,
    *,
    item: int | None = None,
    policy: RetryPolicy | None = None,
) -> LLMResponse:
    """Send one request (Sender.send); a round's group makes one Sender for all its calls."""
    return await Sender(provider, request.model, policy).send(request, item)


def _as_llm_error(exc: Exception) -> LLMError:
    """An unexpected exception from a provider, kept as this item's error so the others go on."""
    err = LLMError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


async def run_all(
    provider: Provider,
    requests: Iterable[LLMRequest],
    *,
    workers: int | None = None,
    policy: RetryPolicy | None = None,
) -> list[LLMResponse | LLMError]:
    """Send every request through a pool of `workers` tasks; results in input order, each a response or
    that item's own LLMError. A ConfigError (no key, unknown model) stops the run and is raised;
    cancelling the caller cancels the calls in flight."""
    items: Sequence[LLMRequest] = requests if isinstance(requests, Sequence) else list(requests)
    if not items:
        return []
    # One Sender a model: a ConfigError now, before any call is paid for.
    senders = {model: Sender(provider, model, policy) for model in {r.model for r in items}}
    results: list[LLMResponse | LLMError | None] = [None] * len(items)
    todo = iter(enumerate(items))  # shared by the workers: each takes the next item when free

    async def worker() -> None:
        for i, request in todo:
            try:
                results[i] = await senders[request.model].send(request, i)
            except LLMError as err:
                results[i] = err
            except ConfigError:
                raise
            except Exception as exc:
                results[i] = _as_llm_error(exc)

    n = max(1, min(len(items), workers or DEFAULT_WORKERS))
    tasks = [asyncio.ensure_future(worker()) for _ in range(n)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # The caller was cancelled or a ConfigError ended the run: stop the rest and wait for them, so
        # no call is left running (and billing) after run_all has returned.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results  # type: ignore[return-value]  # every slot was filled by a worker
