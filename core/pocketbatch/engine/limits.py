"""Rate limits per (provider, model, key): RPM and TPM buckets, a concurrency cap, a shared pause after
a 429, and limits that learn themselves where the user configured none.

A `Limiter` lives for the process in a registry (`limiter_for`), so every round of calls shares what was
learned. Its buckets and semaphore are asyncio objects bound to one event loop, so each loop gets its own;
the learned rates and the pause are plain numbers shared by all, and once a limiter is used from the sync
`call_llm`'s loop (llm.py) or from a second loop, admission goes through one thread-safe GCRA for all of
them (`LoopsShare`), so sync and async calls made at once draw from one limit.

How a limit moves (one `_Rate` per dimension, in units per second):
- configured by the user (env): a ceiling; the rate starts there and never passes it; headers are not
  used to change it. `0` means unlimited and is never touched.
- not configured: the rate starts at the provider's default (unlimited when that is 0) and is learned:
  from the limit the provider reports (`RateLimits`), else from 429s: slow start (doubling each round
  while callers queue on the bucket), then on a 429 a multiplicative decrease, and additive increase:
  quick back to just under the rate where the 429 came, then a slow probe past it.
- a 429 decreases the rate in every case but "unlimited", so the engine slows below any ceiling too.

How a limiter starts, so that its first requests tell it something before many are sent:
- its bucket starts paced: one request at once, then the rate (a burst at t=0 adds to whatever the
  start-up of the first calls delays, and the server sees them arrive together);
- while a limit is being learned, at most FIRST_WAVE requests are in flight until the first answer comes
  back, with the provider's rate-limit headers if it sends them;
- a 429 for a request sent before the first answer arrived pauses, but says nothing about the rate the
  limiter will send at, so it is not taken for the limit.

With POCKETBATCH_REDIS_URL set, admission, pauses, learned rates and the concurrency cap are shared by
every process through Redis (shared_limits.py); the local buckets then serve only while Redis is lost,
at this process's share of the limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from aiolimiter import AsyncLimiter

from ..config import Limits, settings
from ..errors import LLMError, RateLimitError
from ..providers import LLMRequest, LLMResponse, Provider, RateLimits
from .shared_limits import Learned, LoopsShare, SharedLimit, check_reachable

INF = math.inf

# Requests a bucket lets out at once. A whole minute's quota at t=0 is a 429 storm; a burst of 1 loses
# ~4 % to timer lateness. k=4 at 90 % of a loopback server's rate gave 0 × 429 (notes §5).
BURST = 4
# At high rates a burst of 4 is under a millisecond and timer lateness would cap throughput: allow at
# least this many seconds' worth.
BURST_SECONDS = 0.01
# The token bucket holds this many seconds of tokens; a larger request pays in several acquires.
TPM_BURST_SECONDS = 1.0

# Learning. A "round" is the time of ROUND_REQUESTS at the current rate, kept within ROUND_SECONDS, so
# slow and fast limits converge in a similar number of requests and in bounded time.
ROUND_REQUESTS = 32
ROUND_SECONDS = (0.05, 0.35)
DECREASE = 0.85  # multiplicative decrease on a 429
RECOVER_TO = 0.95  # quick additive recovery up to this fraction of the rate that drew the 429 ...
RECOVER_STEP = 0.05  # ... at this fraction of that rate per round,
# Out of slow start, processes sharing a rate resume lower than one process: their growth compounds
# faster than their sends follow, so the rate a round before the 429 may already have been past the
# limit, and every 429 of the round after it is answered by the one decrease.
SHARED_RESUME = RECOVER_TO * DECREASE
PROBE_STEP = 0.005  # then a slow probe beyond it, per round, ...
PROBE_DOUBLING = 8  # ... whose step doubles every this many rounds without a 429 (the limit may have
#                     moved, or the first guess was far too low: growth turns exponential again) ...
CONFIRM_BAND = 0.1  # ... and halves each time a 429 comes within this fraction of the last one's rate:
MAX_CONFIRMED = 3  #  the limit is where it was, so each probe past it costs a 429 and buys nothing
HEADER_MARGIN = 0.98  # a reported limit is used at this fraction: clock skew, requests of other processes
FIRST_WAVE = BURST  # requests in flight before a learning limiter's first answer
DEFAULT_PAUSE = 0.5  # pause after a 429 that gave no Retry-After (the SDKs' first backoff)
# A Retry-After is the earliest moment the server has room for one request: resume a little after it,
# or timer and clock rounding make the first request back another 429.
PAUSE_MARGIN = (0.02, 0.002)  # (fraction, seconds) added to every pause
CONCURRENCY_GROWTH = 4 * ROUND_REQUESTS  # answers, callers queueing, before a learned cap grows by 1
MAX_PAUSE = 120.0  # the longest shared pause (the OpenAI SDK also refuses Retry-After above 120 s)

# Token estimates: ~4 characters a token, and when max_tokens is unset an output guess that is then
# learned from usage (OpenAI counts max_tokens against TPM up front, so when it is set it is the count).
CHARS_PER_TOKEN = 4
DEFAULT_OUTPUT_TOKENS = 256
_EMA = 0.1


@dataclass(frozen=True)
class LimiterKey:
    provider: str
    model: str
    key: str  # a fingerprint of the API key, never the key itself ("" for keyless providers)


@lru_cache(maxsize=64)
def key_fingerprint(api_key: str | None) -> str:
    """A short hash telling keys apart without keeping them."""
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__
class Ticket:
    """What one acquire took, handed back with the outcome so the limiter can learn from it."""

    sent_at: float  # time.monotonic() when the request was let through
    tokens: int  # the token estimate (taken from the TPM bucket when there is one)
    chars: int  # characters of the prompt, to reconcile the estimate with reported usage
    output_guess: bool  # the estimate guessed the output (max_tokens was unset)
    semaphore: _Cap | None
    first_wave: _LoopState | None = None  # where it took a place in a learning limiter's first wave
    lease: str | None = None  # its place under the concurrency cap shared through Redis
    shared_reserved: int | None = None  # Redis's time (µs) when it was reserved there


class _Rate:
    """One limit (requests or tokens per second) and how it moves; pure arithmetic, no asyncio."""

    __slots__ = (
        "anchor",
        "cap",
        "confirmed",
        "decreased_at",
        "grown_at",
        "learn",
        "probing",
        "queued",
        "rate",
        "slow_start",
    )

    def __init__(self, configured: float | None, default: float, now: float) -> None:
        self.learn = configured is None
        if configured is not None:
            self.cap = configured / 60 if configured > 0 else INF
            self.rate = self.cap
            self.slow_start = False
        else:
            self.cap = INF
            self.rate = default / 60 if default > 0 else INF
            self.slow_start = True
        self.anchor = INF  # the rate that drew the last 429
        self.decreased_at = -INF
        self.grown_at = now
        self.queued = False  # a caller waited on this bucket since the last growth step
        self.probing = 0.0  # rounds spent probing past the anchor since the last decrease
        self.confirmed = 0  # 429s in a row near the same anchor: the limit is where it was, probe slower

    @property
    def fixed_unlimited(self) -> bool:
        return not self.learn and self.cap == INF

    def round_seconds(self) -> float:
        lo, hi = ROUND_SECONDS
        return min(hi, max(lo, ROUND_REQUESTS / self.rate)) if self.rate < INF else lo

    def due(self, now: float) -> bool:
        """Whether `grow` would look at the evidence now (a quarter of a round since it last did); never
        for an unlimited rate, which has nothing to grow to."""
        return self.rate < INF and now - self.grown_at >= self.round_seconds() / 4

    def grow(self, now: float, share: float = 1.0, sent: float = INF) -> bool:
        """Raise the rate when callers have been queueing on it; True when it changed. `share`: this
        process's part of the evidence when several processes grow one shared rate (1/processes): Redis
        applies each one's growth to the stored rate in turn, so together they grow it as one would.
        `sent`: the rate requests (or tokens) actually went out at lately, which slow start may not pass
        by more than twice (a rate nothing is sent at says nothing of the limit)."""
        if not self.due(now):
            return False
        dt = now - self.grown_at
        rnd = self.round_seconds()
        queued, self.queued, self.grown_at = self.queued, False, now
        if not queued or self.rate >= self.cap:
            return False
        elapsed = min(dt, 4 * rnd) / rnd  # rounds of demand (idle stretches do not count as evidence)
        rounds = elapsed * share
        anchor = min(self.anchor, self.rate) if self.anchor == INF else self.anchor
        if self.slow_start:
            rate = min(self.rate * 2**rounds, self.ceiling(sent))
        elif self.rate < RECOVER_TO * anchor:
            rate = min(RECOVER_TO * anchor, self.rate + RECOVER_STEP * anchor * rounds)
        else:
            self.probing += elapsed  # time probing, which every process spends at once: not a share
            step = PROBE_STEP / 2 ** min(self.confirmed, MAX_CONFIRMED)
            rate = self.rate + step * anchor * rounds * 2 ** (self.probing / PROBE_DOUBLING)
        self.rate = min(rate, self.cap)
        return True

    def ceiling(self, sent: float = INF) -> float:
        """The most that growth from here may reach: in slow start, twice the rate `sent` at; while
        recovering after a 429, the rate it recovers to; else the cap. (Redis applies the growth of other
        processes to the shared rate up to it.)"""
        if self.slow_start:
            return min(self.cap, max(self.rate, 2 * sent))
        if self.anchor < INF and self.rate <= RECOVER_TO * self.anchor * 1.000001:
            return min(self.cap, RECOVER_TO * self.anchor)
        return self.cap

    def decrease(
        self, now: float, sent_at: float, observed: float, admitted: float | None = None, shared: bool = False
    ) -> bool:
        """React to a 429 once per congestion episode; `observed` is the recent send rate, used when
        the rate was unlimited; `admitted` the rate of answers the provider gave over the last round, the
        best estimate of the limit that slow start has just overshot. `shared`: the rate is shared by
        processes through Redis, where an episode lasts a round past the decrease (the other processes
        take the new rate up at their next reservation). True when the rate changed."""
        if self.fixed_unlimited or sent_at < self.decreased_at + (self.round_seconds() if shared else 0.0):
            return False  # sent before the last decrease took effect: that episode is already answered
        if self.rate == INF:
            # Nothing to scale down from: start below what was actually sent, and slow-start from there.
            self.rate = max(observed / 2, 1 / 60)
        elif self.slow_start and admitted:
            # Doubling overshot: the previous round's rate was fine and the provider admitted about its
            # limit this round. Resume just under that (lower when shared: SHARED_RESUME) instead of
            # shrinking by DECREASE several times.
            self.anchor = min(self.rate, max(admitted, self.rate / 2))
            self.rate = max((SHARED_RESUME if shared else RECOVER_TO) * self.anchor, 1 / 60)
            self.slow_start = False
        else:
            self.decreased(now, max(self.rate * DECREASE, 1 / 60))
            return True
        self.probing = 0.0
        self.decreased_at = now
        return True

    def decreased(self, now: float, rate: float, anchor: float | None = None) -> None:
        """A 429 at the current rate: go down to `rate` (this process's decrease, or another's taken up
        from Redis), recover toward `anchor` (the rate that drew the 429: the current one unless given),
        and probe past it more slowly if the 429 came where the last one did."""
        near = self.anchor < INF and abs(self.rate - self.anchor) <= CONFIRM_BAND * self.anchor
        self.confirmed = self.confirmed + 1 if near else 0
        self.anchor = self.rate if anchor is None else anchor
        self.rate = rate
        self.slow_start = False
        self.probing = 0.0
        self.decreased_at = now

    def reported(self, limit_per_minute: int) -> bool:
        """The provider said what the limit is; True when the rate changed."""
        if not self.learn or limit_per_minute <= 0:
            return False
        cap = limit_per_minute / 60 * HEADER_MARGIN
        if cap == self.cap:
            return False
        self.cap = cap
        if self.slow_start:
            self.rate = cap  # no 429 yet: trust the report at once
        else:
            self.anchor = cap  # after a 429, recover toward it as usual
            self.rate = min(self.rate, cap)
        return True


class _Bucket(AsyncLimiter):
    """An aiolimiter bucket whose rate can change while tasks wait on it.

    aiolimiter has no public setter; its leak arithmetic reads `max_rate`, `time_period` and
    `_rate_per_sec` (aiolimiter 1.2-1.3), so those are updated together after draining at the old rate,
    and the sleeping waiter's timer is rescheduled. tests/engine/test_limits.py checks this still works.
    """

    __slots__ = ("version",)

    def __init__(self, rate: float, capacity: float, version: int, *, paced: bool = False) -> None:
        super().__init__(capacity, capacity / rate)
        if paced:
            # One request now, not a burst of `capacity` (made inside acquire, so a loop runs; aiolimiter's
            # own start time is 0, which would drain this level at the first check).
            self._level, self._last_check = capacity - 1, asyncio.get_running_loop().time()
        self.version = version

    def set_rate(self, rate: float, capacity: float, version: int) -> None:
        self._leak()
        self.max_rate, self.time_period, self._rate_per_sec = capacity, capacity / rate, rate
        self.version = version
        self._wake_next()

    def take_now(self) -> bool:
        """Take one unit if there is room, as aiolimiter's acquire does when it need not wait."""
        if not self.has_capacity(1):
            return False
        self._level += 1
        self._wake_next()
        return True

    def hold(self, seconds: float) -> None:
        """Let nothing through for `seconds`, then one request, then the rate again: a pause that ends
        without the burst an idle bucket would allow (the server has refilled one request, not four)."""
        self._leak()
        self._level = max(self._level, self.max_rate - 1 + self._rate_per_sec * seconds)
        self._wake_next()


class _Cap:
    """A semaphore whose number of places can change while it is held (a learned concurrency cap moves):
    holders always release to the same object, so what is in flight is counted across the change."""

    __slots__ = ("held", "limit", "queued", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.queued = False  # a caller waited for a place since the cap last grew
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        while self.held >= self.limit:
            self.queued = True
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken and cancelled at once: pass the turn on
                raise
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.held
        while free > 0 and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class _LoopState:
    """The asyncio objects of one limiter in one event loop."""

    __slots__ = (
        "concurrency",
        "loop",
        "rpm",
        "semaphore",
        "shared_lock",
        "tpm",
        "tpm_lock",
        "wave",
        "wave_waiters",
    )

    def __init__(self, concurrency: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rpm: _Bucket | None = None
        self.tpm: _Bucket | None = None
        self.tpm_lock = asyncio.Lock()  # FIFO: aiolimiter serves small acquires first (notes §5)
        # One reservation on Redis at a time per loop: slots are not taken far ahead (a process that
        # reserved a thousand slots at once would send them late, together, whatever happened since).
        self.shared_lock = asyncio.Lock()
        self.concurrency = concurrency
        self.semaphore = _Cap(concurrency) if concurrency > 0 else None
        self.wave = 0  # requests of the first wave in flight
        self.wave_waiters: deque[asyncio.Future] = deque()  # callers waiting for a place in it

    def wake(self, everyone: bool) -> None:
        """Let the next caller waiting for the first wave try again (all of them once it is over)."""
        while self.wave_waiters:
            waiter = self.wave_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return


def _rpm_capacity(rate: float) -> float:
    return max(1.0, min(float(BURST), rate), rate * BURST_SECONDS)


def _tpm_capacity(rate: float) -> float:
    return max(1.0, rate * TPM_BURST_SECONDS)


class Limiter:
    """The limits of one (provider, model, key): acquire before each attempt, report its outcome after."""

    def __init__(self, key: LimiterKey, limits: Limits, defaults: Limits) -> None:
        self.key = key
        self._last_state: _LoopState | None = None  # of the loop that called last
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self.paused_until = 0.0
        self.answered_at: float | None = None  # time.monotonic() of the first answer from the provider
        self._sends: deque[float] = deque(maxlen=4096)  # recent send times, for the observed rate
        self._oks: deque[float] = deque(maxlen=4096)  # recent answer times, for the admitted rate
        self._input_factor = 1.0  # reported input tokens / (chars / 4), a running average
        self._output_tokens = float(DEFAULT_OUTPUT_TOKENS)
        self._avg_tokens = float(DEFAULT_OUTPUT_TOKENS)  # a typical request's estimate, a running average
        self.shared: SharedLimit | None = None  # set by limiter_for when POCKETBATCH_REDIS_URL is
        self._epoch = 0  # the epoch of the learned rates in Redis this limiter last saw
        self._shared_answers: float | None = None  # answers a second, all processes, at the last reservation
        self._share = 1.0  # the fraction of the rates the local buckets use (below 1 while Redis is lost)
        self._tasks: set[asyncio.Task] = set()  # writes to Redis under way
        # Admission shared by the event loops of this process, once more than one uses this limiter
        # (buckets are asyncio objects of one loop; the sync call_llm's loop and the program's must
        # draw from one limit).
        self._loops_share: LoopsShare | None = None
        self.configure(limits, defaults)

    def configure(self, limits: Limits, defaults: Limits) -> None:
        """Apply the user's limits (None: learn, starting from the provider's defaults)."""
        now = time.monotonic()
        self.config = (limits, defaults)
        self._rpm = _Rate(limits.rpm, defaults.rpm or 0, now)
        self._tpm = _Rate(limits.tpm, defaults.tpm or 0, now)
        conc = limits.max_concurrency if limits.max_concurrency is not None else defaults.max_concurrency
        self.max_concurrency = int(conc or 0)
        # A cap learned from 429s for concurrent requests, where the user set none (0: none learned).
        self._learn_concurrency = limits.max_concurrency is None
        self._in_flight = 0  # tickets out: requests let through and not yet released
        # Both rates configured unlimited: no rate can move, so nobody reads when requests went out.
        self._tracks_rates = not (self._rpm.fixed_unlimited and self._tpm.fixed_unlimited)
        self._since_cap = 0  # answers since the learned cap last moved
        self._version = getattr(self, "_version", 0) + 1

    # -- what the rest of the engine reads ---------------------------------------------------------

    @property
    def rpm(self) -> float:
        """Requests per minute the engine sends now (math.inf: unlimited)."""
        return self._rpm.rate * 60

    @property
    def tpm(self) -> float:
        """Tokens per minute the engine sends now (math.inf: unlimited)."""
        return self._tpm.rate * 60

    def learning(self) -> dict[str, bool]:
        return {"rpm": self._rpm.learn, "tpm": self._tpm.learn}

    def seconds_for(self, n_requests: int, tokens: int = 0) -> float:
        """Estimated seconds to send n_requests using `tokens` in all, at the current rates (latency of
        the calls themselves not included)."""
        seconds = 0.0
        if self._rpm.rate < INF:
            seconds = max(seconds, max(0, n_requests - BURST) / self._rpm.rate)
        if self._tpm.rate < INF:
            seconds = max(seconds, tokens / self._tpm.rate)
        return seconds + max(0.0, self.paused_until - time.monotonic())

    @property
    def typical_output_tokens(self) -> float:
        """What a reply to this model has used so far (TYPICAL before the first one)."""
        return self._output_tokens

    def estimate_tokens(self, request: LLMRequest) -> int:
        """Tokens this request will count against TPM: the prompt at ~4 chars a token (corrected by
        what usage reported so far) plus max_tokens, or the typical output when it is unset."""
        return self._estimate(_chars(request), request.max_tokens)

    def tokens_for(self, input_tokens: int, output_tokens: int) -> int:
        """Tokens requests estimated at ~4 characters a token (strategy.group_tokens) will count against
        TPM, with the input corrected by what usage reported so far."""
        return math.ceil(input_tokens * self._input_factor) + output_tokens

    def _estimate(self, chars: int, max_tokens: int | None) -> int:
        prompt = chars / CHARS_PER_TOKEN * self._input_factor
        output = max_tokens if max_tokens is not None else self._output_tokens
        return max(1, math.ceil(prompt + output))

    # -- acquire and release -----------------------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._last_state  # a WeakKeyDictionary lookup costs more than the rest of an acquire
        if state is None or state.loop is not loop:
            state = self._loops.get(loop)
        if state is not None and state.concurrency != self.max_concurrency:
            # The cap moved (learned, or configured again): a new semaphore, the buckets kept. Tickets
            # release the semaphore they took.
            state.concurrency = self.max_concurrency
            if state.concurrency <= 0:
                state.semaphore = None
            elif state.semaphore is None:
                state.semaphore = _Cap(state.concurrency)
            else:
                state.semaphore.set_limit(state.concurrency)
        if state is None:
            state = self._loops[loop] = _LoopState(self.max_concurrency, loop)
            # The sync call_llm's loop (llm.py) runs beside the program's: share from its first call, so
            # no caller is already queued on a bucket of its own when the other loop starts.
            sync_loop = threading.current_thread().name == "pocketbatch-sync"
            live = sum(1 for other in self._loops if not other.is_closed())
            if self._loops_share is None and (sync_loop or live > 1):
                self._loops_share = LoopsShare()
        self._last_state = state
        return state

    def _bucket(self, state: _LoopState, which: str) -> _Bucket | None:
        """This loop's bucket for rpm or tpm, brought in line with the shared rate."""
        rate = (self._rpm if which == "rpm" else self._tpm).rate * self._share
        bucket: _Bucket | None = getattr(state, which)
        if rate == INF:
            if bucket is not None:
                setattr(state, which, None)
                bucket.set_rate(1e12, bucket.max_rate, self._version)  # release anyone still waiting
            return None
        capacity = _rpm_capacity(rate) if which == "rpm" else _tpm_capacity(rate)
        if bucket is None:
            bucket = _Bucket(rate, capacity, self._version, paced=which == "rpm")
            setattr(state, which, bucket)
        elif bucket.version != self._version:
            bucket.set_rate(rate, capacity, self._version)
        return bucket

    def _changed(
        self,
        publish: str | None = "set",
        before: tuple[float, float] | None = None,
        sent: tuple[float, float] = (INF, INF),
        reserved_at: int | None = None,
    ) -> None:
        """The rates changed: buckets catch up; with Redis, other processes learn it ("set": a
        decrease or a reported limit; "grow": growth from the rates `before`, while they were `sent` at
        (per second, all processes); None: nothing to tell,
        e.g. taken from Redis). `reserved_at`: Redis's time when the request whose 429 made this
        decrease was reserved, so that one episode decreases the shared rate once, whichever processes
        saw it."""
        self._version += 1
        if publish and self.shared is not None and not self.shared.lost():
            rates = [
                Learned(rate.rate, old, rate.ceiling(now_sent)) if rate.learn else None
                for rate, old, now_sent in zip(
                    (self._rpm, self._tpm), before or (None, None), sent, strict=True
                )
            ]
            self._background(
                self.shared.learned(self._epoch, publish, *rates, reserved_at, self._rpm.round_seconds())
            )
        try:
            state = self._loops.get(asyncio.get_running_loop())
        except RuntimeError:  # told outside a loop: every loop catches up on its next acquire
            return
        if state is not None:  # wake this loop's waiters at the new rate now; other loops on next use
            self._bucket(state, "rpm")
            self._bucket(state, "tpm")

    async def _wait_pause(self) -> None:
        while (delay := self.paused_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    def admit_now(self, request: LLMRequest) -> Ticket | None:
        """acquire's ticket without waiting, when nothing could make this request wait: no concurrency cap,
        no first wave to join, no pause, no limit shared with other loops or processes, no token bucket, and
        room in the request bucket. None otherwise: then `await acquire(request)`. (Most calls of a limiter
        with room need none of acquire's coroutines.)"""
        state = self._state()
        if (
            state.semaphore is not None
            or (self.answered_at is None and (self._rpm.learn or self._tpm.learn))
            or self.shared is not None
            or self._loops_share is not None
            or self.paused_until > time.monotonic()
            or self._bucket(state, "tpm") is not None
        ):
            return None
        rpm = self._bucket(state, "rpm")
        if rpm is not None and not rpm.take_now():
            return None
        chars = _chars(request)
        return self._let_through(request, chars, self._estimate(chars, request.max_tokens))

    async def acquire(self, request: LLMRequest) -> Ticket:
        """Wait for a concurrency slot, the first wave's answer, the end of any pause, a request and the
        request's tokens."""
        state = self._state()
        semaphore = state.semaphore
        if semaphore is not None:
            await semaphore.acquire()
        first_wave, lease = None, None
        try:
            if self.shared is not None and self.max_concurrency > 0 and not self.shared.lost():
                lease = await self.shared.take_place(self.max_concurrency)
            if self.answered_at is None and (self._rpm.learn or self._tpm.learn):
                first_wave = await self._join_first_wave(state)
            chars, shared_reserved = _chars(request), None
            while True:
                await self._wait_pause()
                if (reserved := await self._reserve_shared(state, chars, request.max_tokens)) is not None:
                    tokens, shared_reserved = reserved
                    if self.paused_until <= time.monotonic():
                        break
                    continue
                # Tokens first, the request slot last: the RPM bucket is what spaces requests on the wire,
                # and requests it let out while they then waited for tokens would leave together.
                if self._bucket(state, "tpm") is None:  # no coroutine to await for nothing, on every call
                    tokens = self._estimate(chars, request.max_tokens)
                else:
                    tokens = await self._acquire_tokens(state, chars, request.max_tokens)
                rpm = self._bucket(state, "rpm")
                if rpm is not None and not rpm.has_capacity(1):
                    await rpm.acquire(1)
                    # Set after the wait, not before: a pool whose workers all wait already has no new
                    # arrivals, and each caller the bucket lets out is the evidence of demand.
                    self._rpm.queued = True
                elif rpm is not None:
                    await rpm.acquire(1)
                if self._loops_share is not None and self.shared is None:
                    continue  # another loop started while this caller waited here: go through the share
                if self.paused_until <= time.monotonic():
                    break
                # A 429 paused the limiter while this caller waited in a bucket: going now would add to
                # the burst at the end of the pause, so wait it out and queue again.
            if semaphore is None and (late := self._state().semaphore) is not None:
                # A cap was learned while this caller waited (it came in when there was none): take a
                # place now, or callers already queued would all go past the new cap.
                await late.acquire()
                semaphore = late
        except BaseException:
            if semaphore is not None:
                semaphore.release()
            if first_wave is not None:
                self._leave_first_wave(first_wave)
            if lease is not None and self.shared is not None:
                self._background(self.shared.free_place(lease))
            raise
        return self._let_through(request, chars, tokens, semaphore, first_wave, lease, shared_reserved)

    def _let_through(
        self,
        request: LLMRequest,
        chars: int,
        tokens: int,
        semaphore: _Cap | None = None,
        first_wave: _LoopState | None = None,
        lease: str | None = None,
        shared_reserved: int | None = None,
    ) -> Ticket:
        """Count a request that goes now, grow the rates when due, and give its ticket."""
        now = time.monotonic()
        self._in_flight += 1
        if self._tracks_rates:
            self._count_send(now, tokens)
        output_guess = request.max_tokens is None
        return Ticket(now, tokens, chars, output_guess, semaphore, first_wave, lease, shared_reserved)

    def _count_send(self, now: float, tokens: int) -> None:
        """What went out, for the observed rate; and the rates grown when due."""
        self._sends.append(now)
        self._avg_tokens += _EMA * (tokens - self._avg_tokens)
        share = 1 / self.shared.processes if self.shared is not None and not self.shared.lost() else 1.0
        # Not before the first answer: nothing is known of the rate yet. And only when a rate is due to
        # grow: counting what went out reads the recent sends, which on every call cost more than the call.
        if self.answered_at is not None and (self._rpm.due(now) or self._tpm.due(now)):
            before = (self._rpm.rate, self._tpm.rate)
            # What went out over the last round, all processes (a second's average lags a doubling rate).
            sent_now = _per_second(self._sends, now, self._rpm.round_seconds()) / share
            sent = (sent_now, sent_now * self._avg_tokens)
            if self._rpm.grow(now, share, sent[0]) | self._tpm.grow(now, share, sent[1]):
                self._changed("grow", before, sent)

    async def _reserve_shared(
        self, state: _LoopState, chars: int, max_tokens: int | None
    ) -> tuple[int, int | None] | None:
        """Admission through Redis: the tokens reserved and Redis's time of the send (None between the
        loops of one process); None when it is not configured or lost (then the local buckets admit, at
        this process's share of the limit)."""
        shared = self.shared
        if shared is None:
            if self._loops_share is None:
                return None
        elif shared.lost():
            return None
        async with state.shared_lock:
            await self._wait_pause()
            rpm, tpm = self._rpm.rate, self._tpm.rate
            # Estimated at its turn, not when the caller queued: callers that queued before the first
            # answers taught the output size would each reserve the first guess (256 tokens), and the
            # estimates of the calls in flight, corrected only when they answer, then hold a token limit
            # far above what the calls use (a 200,000 TPM default gave ~14 requests a second).
            tokens = self._estimate(chars, max_tokens)
            if shared is None:
                reservation = await self._loops_share.reserve(
                    rpm, _rpm_capacity(rpm), tpm, _tpm_capacity(tpm), tokens
                )
                if reservation.bound:
                    (self._rpm if reservation.bound == "rpm" else self._tpm).queued = True
                if reservation.wait > 0:
                    await asyncio.sleep(reservation.wait)
                return tokens, None
            reservation = await shared.reserve(rpm, _rpm_capacity(rpm), tpm, _tpm_capacity(tpm), tokens)
            if reservation is None:
                if self._share == 1.0:
                    self._share = shared.share()
                    self._changed(None)
                return None
            if self._share != 1.0:
                self._share = 1.0
                self._changed(None)
            decreased, self._epoch = reservation.epoch > self._epoch, reservation.epoch
            self._shared_answers = reservation.answers
            self._adopt(reservation.rpm, reservation.tpm, reservation.output_tokens, decreased)
            if reservation.bound:  # demand: callers wait on this shared limit
                (self._rpm if reservation.bound == "rpm" else self._tpm).queued = True
            if reservation.wait > 0:
                await asyncio.sleep(reservation.wait)
        return tokens, reservation.reserved_at

    def _adopt(
        self, rpm: float | None, tpm: float | None, output_tokens: float | None, decreased: bool
    ) -> None:
        """Take on what another process learned and stored in Redis. `decreased`: a process set the rates
        since this one last read them (a new epoch: a 429's decrease or a reported limit)."""
        now, changed = time.monotonic(), False
        for rate, value in ((self._rpm, rpm), (self._tpm, tpm)):
            if value is None or not rate.learn or math.isclose(value, rate.rate, rel_tol=1e-6):
                continue
            if not decreased and value < rate.rate:
                # Growth within the epoch: a lower value is an older one (this process's own growth is
                # still on its way to Redis), not a decrease; taking it for one ended slow start early.
                continue
            if decreased and value < rate.rate and now - rate.decreased_at < rate.round_seconds():
                # This episode is answered here already: most often this process's own decrease, back
                # from Redis after it grew a little since. Taken for another 429 it would move the anchor
                # down to the decreased rate and forget that the limit was confirmed.
                rate.rate = min(value, rate.cap)
            elif decreased and value < rate.rate:
                # Another process slowed down after a 429: this episode is answered for us too. It went
                # down from the anchor as this process would have (out of slow start to SHARED_RESUME of
                # what was admitted, else by DECREASE): recover toward that, not this process's own rate.
                anchor = value / (SHARED_RESUME if rate.slow_start else DECREASE)
                rate.decreased(now, min(value, rate.cap), min(rate.rate, anchor))
            else:
                rate.rate = min(value, rate.cap)
            changed = True
        if output_tokens is not None:
            self._output_tokens = output_tokens
        if changed:
            self._changed(None)

    def _apply_cap(self) -> None:
        """Move this loop's concurrency cap to max_concurrency now (other loops on their next acquire)."""
        try:
            self._state()
        except RuntimeError:  # told outside a loop
            pass

    def _background(self, coro) -> None:
        """Run a write to Redis without making the caller wait for it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join_first_wave(self, state: _LoopState) -> _LoopState | None:
        """A place among the first FIRST_WAVE requests, or None once the first answer is in: until then a
        limiter that learns knows nothing of the rate, and the answers (their headers, or a 429) will."""
        while self.answered_at is None:
            if state.wave < FIRST_WAVE:
                state.wave += 1
                return state
            waiter = state.loop.create_future()
            state.wave_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    state.wake(everyone=False)  # woken and cancelled at once: pass the turn on
                raise
        return None

    @staticmethod
    def _leave_first_wave(state: _LoopState) -> None:
        state.wave -= 1
        state.wake(everyone=False)

    async def _acquire_tokens(self, state: _LoopState, chars: int, max_tokens: int | None) -> int:
        """Take this request's tokens from the local bucket (acquire calls it only when there is one); the
        estimate taken."""
        # One caller at a time, in arrival order, so a large request is not overtaken forever by small
        # ones; a request larger than the bucket pays in bucket-sized parts. Estimated at its turn, as
        # through Redis (_reserve_shared), with what the answers so far taught.
        async with state.tpm_lock:
            tokens = self._estimate(chars, max_tokens)
            left = float(tokens)
            while left > 0:
                bucket = self._bucket(state, "tpm")
                if bucket is None:
                    return tokens
                part = min(left, bucket.max_rate)
                waited = not bucket.has_capacity(part)
                await bucket.acquire(part)
                if waited:
                    self._tpm.queued = True
                left -= part
        return tokens

    def release(self, ticket: Ticket) -> None:
        self._in_flight -= 1
        if ticket.semaphore is not None:
            ticket.semaphore.release()
        if ticket.first_wave is not None:
            self._leave_first_wave(ticket.first_wave)
        if ticket.lease is not None and self.shared is not None:
            self._background(self.shared.free_place(ticket.lease))

    def _answered(self) -> None:
        """The provider answered (a reply or an HTTP error): the first wave is over in every loop."""
        if self.answered_at is not None:
            return
        self.answered_at = now = time.monotonic()
        # Growth counts demand from here: the first wave's wait for this answer is not evidence of a rate.
        self._rpm.grown_at = self._tpm.grown_at = now
        self._rpm.queued = self._tpm.queued = False
        for state in list(self._loops.values()):
            if not state.loop.is_closed():
                state.loop.call_soon_threadsafe(state.wake, True)

    # -- learning from outcomes --------------------------------------------------------------------

    def on_response(self, response: LLMResponse, ticket: Ticket) -> None:
        self._answered()
        if self._tracks_rates:
            self._oks.append(time.monotonic())
        usage = response.usage
        if usage.input_tokens and ticket.chars:
            ratio = usage.input_tokens / (ticket.chars / CHARS_PER_TOKEN)
            self._input_factor += _EMA * (min(4.0, max(0.25, ratio)) - self._input_factor)
        if self._learn_concurrency and self.max_concurrency > 0:
            self._since_cap += 1
            if self._since_cap >= CONCURRENCY_GROWTH:  # additive increase of a learned cap ...
                self._since_cap = 0
                caps = [st.semaphore for st in self._loops.values() if st.semaphore is not None]
                if any(cap.queued for cap in caps):  # ... when callers have been waiting for a place
                    self.max_concurrency += 1
                    for cap in caps:
                        cap.queued = False
                    self._apply_cap()
        if ticket.output_guess and usage.output_tokens:
            self._output_tokens += _EMA * (usage.output_tokens - self._output_tokens)
        if response.rate_limits is not None:
            self._reported(response.rate_limits)
        if self.shared is not None and not self.shared.lost():
            # Count the answer for every process; the token bucket took the estimate: move it by what the
            # answer really used, and feed the output size every process estimates with.
            used = usage.input_tokens + usage.output_tokens
            guessed = usage.output_tokens if ticket.output_guess and usage.output_tokens else None
            error = used - ticket.tokens if used else 0
            self._background(self.shared.answered(error, self._tpm.rate, guessed))

    def on_error(self, error: LLMError, ticket: Ticket) -> None:
        known = self.answered_at is not None and ticket.sent_at >= self.answered_at
        if error.status is not None:
            self._answered()
        if error.rate_limits is not None:
            self._reported(error.rate_limits)
        if not (isinstance(error, RateLimitError) or error.status == 429) or not error.retryable:
            return  # exhausted quota (retryable False) is not a rate: slowing down would not help
        pause = error.retry_after if error.retry_after is not None else DEFAULT_PAUSE
        if _for_concurrency(error):
            # Too many requests at once, not too many a minute: cap what is in flight, leave the rate.
            if self._learn_concurrency:
                in_flight = self._in_flight  # this one included: released after on_error
                cap = self.max_concurrency or in_flight
                self.max_concurrency = max(1, min(cap, math.floor(in_flight * DECREASE)))
                self._since_cap = 0
                self._apply_cap()
            self.pause(pause)
            return
        if not known:
            # Sent before anything came back: a start-up burst, or a window another client emptied.
            # Wait as told, but the rate this limiter sends at has not been tried yet.
            self.pause(pause)
            return
        now = time.monotonic()
        rl = error.rate_limits
        tokens_exhausted = rl is not None and rl.remaining_tokens == 0 and rl.remaining_requests != 0
        # Shared through Redis, this process saw its part of what all of them sent and were admitted.
        scale = self.shared.processes if self.shared is not None and not self.shared.lost() else 1
        changed = False
        shared = scale > 1
        if tokens_exhausted or (self._rpm.fixed_unlimited and not self._tpm.fixed_unlimited):
            observed = scale * self._observed_tokens(now)
            changed = self._tpm.decrease(now, ticket.sent_at, observed, shared=shared)
        else:
            admitted = (
                self._shared_answers  # every process's answers, counted in Redis
                if shared and self._shared_answers
                else scale * _per_second(self._oks, now, self._rpm.round_seconds())
            )
            observed = scale * self._observed_requests(now)
            overshot = self._rpm.slow_start
            changed = self._rpm.decrease(now, ticket.sent_at, observed, admitted, shared)
            if shared and overshot and not self._rpm.slow_start:
                # The overshoot emptied the provider's window, and each process still sends the request
                # it reserved at the old rate: wait until the window has room for those and one more.
                pause = max(pause, (scale + 1) / self._rpm.rate)
        if changed:
            self._changed(reserved_at=ticket.shared_reserved)
        # after the rate change, so the pause holds the bucket at its new rate
        self.pause(pause)

    def pause(self, seconds: float) -> None:
        """Hold every caller of this limiter for `seconds` (capped) from now: one shared wake-up time
        instead of each worker sleeping the same Retry-After and waking together."""
        seconds = min(max(seconds, 0.0) * (1 + PAUSE_MARGIN[0]) + PAUSE_MARGIN[1], MAX_PAUSE)
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)
        if self.shared is not None and not self.shared.lost():
            self._background(self.shared.pause(seconds))  # every process waits it out
        try:
            state = self._loops.get(asyncio.get_running_loop())
        except RuntimeError:
            return
        if state is not None and (bucket := self._bucket(state, "rpm")) is not None:
            bucket.hold(self.paused_until - time.monotonic())

    def _reported(self, rl: RateLimits) -> None:
        # An empty window ("remaining 0") matters only while this limiter sends faster than the reported
        # limit (before the report was learned, or under a user ceiling set too high). When it already
        # paces at the limit, the report is stale by the call's latency and pausing on it would stall a
        # limiter that is exactly on target.
        changed, pause = False, 0.0
        if rl.limit_requests:
            limit = rl.limit_requests / 60
            overshooting = self._rpm.rate > limit
            changed |= self._rpm.reported(rl.limit_requests)
            if overshooting and rl.remaining_requests == 0:
                pause = min(1 / limit, rl.reset_requests or INF)  # until one request has refilled
        if rl.limit_tokens:
            limit = rl.limit_tokens / 60
            overshooting = self._tpm.rate > limit
            changed |= self._tpm.reported(rl.limit_tokens)
            if overshooting and rl.remaining_tokens is not None and rl.remaining_tokens < self._avg_tokens:
                wait = min((self._avg_tokens - rl.remaining_tokens) / limit, rl.reset_tokens or INF)
                pause = max(pause, wait)
        if changed:
            self._changed()
        if pause:
            self.pause(pause)

    def _observed_requests(self, now: float) -> float:
        return _per_second(self._sends, now)

    def _observed_tokens(self, now: float) -> float:
        return _per_second(self._sends, now) * self._avg_tokens

    def __repr__(self) -> str:
        return f"<Limiter {self.key.provider}/{self.key.model} rpm={self.rpm:g} tpm={self.tpm:g}>"


def _for_concurrency(error: LLMError) -> bool:
    """A 429 for concurrent requests (Anthropic's and others' concurrency limits): it says so, or the
    limits it reports still have room for requests and tokens."""
    if "concurren" in str(error).lower():
        return True
    rl = error.rate_limits
    return (
        rl is not None
        and rl.remaining_requests is not None
        and rl.remaining_requests > 0
        and (rl.remaining_tokens is None or rl.remaining_tokens > 0)
    )


def _per_second(times: deque[float], now: float, window: float = 1.0) -> float:
    """Events per second over the last `window` seconds (or since the first event, if sooner)."""
    if not times:
        return 0.0
    cutoff, recent = now - window, 0
    for t in reversed(times):  # newest first; times are appended in order
        if t < cutoff:
            break
        recent += 1
    span = min(window, max(now - times[0], 0.1))
    return recent / span


def _chars(request: LLMRequest) -> int:
    n = len(request.system or "")
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):  # content parts: count the text ones
            n += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return n


# -- the registry: one Limiter per (provider, model, key) for the life of the process -------------------

_registry: dict[LimiterKey, Limiter] = {}
_registry_lock = threading.Lock()


def limiter_for(provider: Provider, model: str) -> Limiter:
    """The process-wide limiter for this provider, model and key (a ConfigError if the key is unset)."""
    key = LimiterKey(provider.name, model, key_fingerprint(provider.api_key()))
    limits = settings().limits_for(provider.name)
    defaults = Limits(provider.rpm, provider.tpm, provider.max_concurrency)
    limiter = _registry.get(key)
    if limiter is None:
        with _registry_lock:
            limiter = _registry.get(key)
            if limiter is None:
                limiter = _registry[key] = Limiter(key, limits, defaults)
    elif limiter.config != (limits, defaults):
        limiter.configure(limits, defaults)  # the environment changed (config.reload())
    url = settings().redis_url
    if url is None:
        limiter.shared = None
    elif limiter.shared is None or limiter.shared.url != url:
        check_reachable(url)  # a ConfigError naming POCKETBATCH_REDIS_URL, before any call
        limiter.shared = SharedLimit(url, key.provider, key.model, key.key)
    return limiter


def limiters() -> dict[LimiterKey, Limiter]:
    """Every limiter made so far (a copy), e.g. to show what was learned."""
    return dict(_registry)


def reset_limiters() -> None:
    """Forget every limiter and what it learned (for tests, or after the account's limits changed)."""
    with _registry_lock:
        _registry.clear()
