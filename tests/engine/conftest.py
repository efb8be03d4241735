"""A fake provider that enforces a server-side limit and keeps the books the engine tests assert on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from pocketbatch.engine.limits import reset_limiters
from pocketbatch.engine.retry import RetryPolicy
from pocketbatch.errors import LLMError, RateLimitError
from pocketbatch.providers import LLMRequest, LLMResponse, Provider, RateLimits, Usage

# Backoffs of a few milliseconds so retry tests take no time; Retry-After is still honoured in full.
FAST = RetryPolicy(backoff=0.002, backoff_max=0.01, jitter_min=0.001)


@dataclass
class Hit:
    t: float  # time.monotonic() when the request reached the server
    item: str  # the request's text
    status: int  # 200 or the error's status
    retry_after: float | None = None  # what a 429 told the client


@dataclass(eq=False)
class ServerProvider(Provider):
    """A provider whose "server" admits `server_rps` requests a second (token bucket, `burst` deep) and
    answers 429 with the exact Retry-After when empty; optionally reports its limit like x-ratelimit-*.

    `fail` maps an item's text to an error raised on every attempt (after admission); `latency` is the
    time a call takes once admitted.
    """

    name: str = "srv"
    server_rps: float = 0.0  # 0: no server limit
    burst: float = 5.0
    latency: float = 0.0
    report: bool = False
    rpm: float = 0.0  # the provider's default limits (class attributes on real providers)
    tpm: float = 0.0
    max_concurrency: int = 0
    server_concurrency: int = 0  # 0: any number at once; else a 429 "too many concurrent requests"
    prices: dict = field(default_factory=dict)
    fail: dict = field(default_factory=dict)
    default_model: str = "m"
    hits: list[Hit] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0

    def __post_init__(self) -> None:
        self._level, self._stamp = self.burst, time.monotonic()

    def _admit(self, now: float) -> RateLimits | None:
        if not self.server_rps:
            return None
        self._level = min(self.burst, self._level + (now - self._stamp) * self.server_rps)
        self._stamp = now
        limits = None
        if self.report:
            limits = RateLimits(
                limit_requests=round(self.server_rps * 60), remaining_requests=max(0, int(self._level) - 1)
            )
        if self._level < 1:
            raise RateLimitError(
                "429 too many requests",
                status=429,
                retry_after=(1 - self._level) / self.server_rps,
                rate_limits=limits,
            )
        self._level -= 1
        return limits

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        now = time.monotonic()
        text = request.messages[-1]["content"]
        try:
            if self.server_concurrency and self.in_flight >= self.server_concurrency:
                raise RateLimitError("429 too many concurrent requests", status=429, retry_after=0.01)
            limits = self._admit(now)
            error = self.fail.get(text)
            if error is not None:
                raise error
        except LLMError as err:
            self.hits.append(Hit(now, text, err.status or 0, err.retry_after))
            raise
        self.hits.append(Hit(now, text, 200))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        usage = Usage(len(text), 3)
        return LLMResponse(
            f"re: {text}", usage=usage, model=request.model, provider=self.name, rate_limits=limits
        )

    # -- the books --------------------------------------------------------------------------------

    def count(self, status: int) -> int:
        return sum(1 for h in self.hits if h.status == status)

    def attempts(self, item: str) -> int:
        return sum(1 for h in self.hits if h.item == item)

    def max_in_window(self, seconds: float) -> int:
        """The most requests that reached the server within any `seconds` long window."""
        times = sorted(h.t for h in self.hits)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while times[lo] < t - seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def ok_rate(self, since: float = 0.0) -> float:
        """Accepted requests per second over the part of the run from `since` (0..1 of its span)."""
        ok = sorted(h.t for h in self.hits if h.status == 200)
        start = ok[0] + (ok[-1] - ok[0]) * since
        tail = [t for t in ok if t >= start]
        return (len(tail) - 1) / (tail[-1] - tail[0]) if len(tail) > 1 and tail[-1] > tail[0] else 0.0


def requests(n: int, *, model: str = "m", max_tokens: int | None = None) -> list[LLMRequest]:
    return [
        LLMRequest([{"role": "user", "content": f"item {i}"}], model, max_tokens=max_tokens) for i in range(n)
    ]


@pytest.fixture(autouse=True)
def _fresh_limiters():
    """Learned limits live for the process: start and end every test without any (the root conftest
    already isolates the environment)."""
    reset_limiters()
    yield
    reset_limiters()
