"""One limit shared by every process on Redis (POCKETBATCH_REDIS_URL): the admission of requests and
tokens, the pause after a 429, what was learned, and the concurrency cap of one (provider, model, key).

- Admission is one Lua script per acquire: a GCRA in "reserve" mode for requests and for tokens, both
  checked and taken together, that returns how long the caller waits before sending. Time is Redis's
  own (`TIME`), so the clocks of the machines involved do not matter. Keys carry a hash tag `{...}` made
  of a hash of (provider, model, key fingerprint), so one limiter's keys live on one Cluster slot.
- A 429's pause is a time in Redis that every reservation starts after. Rates learned from headers or
  429s and the learned output tokens are stored with a TTL (a stale value expires) and read back by
  every reservation, so every process sends at the rate the last one learned.
- The concurrency cap is a sorted set of leases that expire unless their holder renews them while its
  call runs: a holder that dies frees its place within LEASE_SECONDS.
- Only hashes of keys and numbers are written: never an API key, never a prompt.

When Redis stops answering mid-run, `SharedLimit.lost()` is True: the `Limiter` goes on with its local
buckets at this process's share of the limit (the limit divided by the processes seen in the last
PROCESS_WINDOW seconds), says so once at WARNING, and tries Redis again every RETRY_SECONDS.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

from ..errors import ConfigError
from ..providers import close_with_loop

log = logging.getLogger("pocketbatch")

PROCESS_WINDOW = 10.0  # seconds: a process that reserved within this window counts for the local share
RETRY_SECONDS = 1.0  # while Redis is lost, try it again this often
LEARNED_TTL = 600  # seconds a learned rate or output size lives in Redis without being written again
# A concurrency lease expires this long after it was last renewed; a holder renews it every third of that
# while its call runs, so a process that dies mid-call frees its place within this time, however long the
# call was allowed to take.
LEASE_SECONDS = 10.0
POOL_CONNECTIONS = 32  # Redis connections per process and event loop; more callers wait for one
LEASE_POLL = 0.01  # seconds between tries for a concurrency place when the cap is reached
IDLE_MS = 60_000  # bucket keys outlive their last reservation by this much
OUTPUT_EMA = 0.1  # weight of one answer in the shared running average of the output size (limits._EMA)
ANSWERS_SECONDS = 1.0  # the shared rate of answers counts those of about this many seconds back

# KEYS: requests tat, tokens tat, pause, processes, learned, the request interval the tat was kept at
# ARGV: request interval (µs; 0 = unlimited), request burst span (µs), token interval (µs per token;
#       0 = unlimited), token burst span (µs), tokens, process id, PROCESS_WINDOW (µs), ANSWERS_SECONDS (µs)
# Returns: {wait µs, processes seen recently, learned rpm or "", learned tpm or "", learned output or "",
#          learned epoch or "", what bound the wait: 0 nothing or the pause, 1 requests, 2 tokens,
#          now (µs, Redis's time: when this reservation was made), answers a second lately or ""}
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local send = now
local bound = 0
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > send then send = pause end
redis.call('ZADD', KEYS[4], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[4], 60000)
local procs = redis.call('ZCARD', KEYS[4])
local ri, rb = tonumber(ARGV[1]), tonumber(ARGV[2])
local ti, tb, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rtat, ttat = 0, 0
if ri > 0 then
  -- a fresh bucket starts paced: one request now, then the rate (not a burst at t=0)
  rtat = tonumber(redis.call('GET', KEYS[1]) or tostring(now + rb - ri))
  -- the requests reserved ahead stay as many when the rate moves: a lead kept in time would let the
  -- first requests after a decrease out early, nearly together
  local was = tonumber(redis.call('GET', KEYS[6]) or ARGV[1])
  if rtat > now and was ~= ri then rtat = now + (rtat - now) * ri / was end
  -- a pause ends with one request, then the rate: the server has refilled one request, not a burst
  if pause > 0 then rtat = math.max(rtat, pause + rb - ri) end
  local at = rtat - rb + ri
  if at > send then send = at; bound = 1 end
end
if ti > 0 then
  ttat = tonumber(redis.call('GET', KEYS[2]) or '0')
  local at = ttat - tb + ti * tokens
  if at > send then send = at; bound = 2 end
end
if ri > 0 then
  local tat = math.max(rtat, send) + ri
  local px = math.floor((tat - now) / 1000) + IDLE
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', px)
  redis.call('SET', KEYS[6], ARGV[1], 'PX', px)
end
if ti > 0 then
  local tat = math.max(ttat, send) + ti * tokens
  redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + IDLE)
end
local l = redis.call('HMGET', KEYS[5], 'rpm', 'tpm', 'out', 'epoch', 'answers', 'answers_at')
local answers = ''
if l[5] then
  answers = string.format('%.6f', tonumber(l[5]) * math.exp(-(now - tonumber(l[6])) / tonumber(ARGV[8])))
end
return {string.format('%.0f', send - now), procs, l[1] or '', l[2] or '', l[3] or '', l[4] or '', bound,
        string.format('%.0f', now), answers}
""".replace("IDLE", str(IDLE_MS))

# KEYS: pause. ARGV: seconds (µs). Moves the shared pause to now + seconds unless it already ends later.
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if want > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', want), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
"""

# KEYS: tokens tat, learned. ARGV: µs to add to the tokens tat (negative: the answer used fewer tokens
# than reserved), the output tokens of an answer whose size was guessed ("" for none), EMA weight, TTL,
# ANSWERS_SECONDS (µs).
# Every process's answers feed one running average of the output size, which every reservation reads back,
# and one rate of answers (a count that decays over ANSWERS_SECONDS): what the provider admitted lately, all
# processes together, which is where the rate resumes after slow start overshoots.
ANSWERED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(ARGV[1]) ~= 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tonumber(cur) + tonumber(ARGV[1])), 'KEEPTTL')
end
if ARGV[2] ~= '' then
  local seen = tonumber(ARGV[2])
  local out = tonumber(redis.call('HGET', KEYS[2], 'out') or ARGV[2])
  redis.call('HSET', KEYS[2], 'out', string.format('%.3f', out + tonumber(ARGV[3]) * (seen - out)))
end
local tau = tonumber(ARGV[5])
local a = redis.call('HMGET', KEYS[2], 'answers', 'answers_at')
local rate = tonumber(a[1] or '0') * math.exp(-(now - tonumber(a[2] or now)) / tau) + 1000000 / tau
redis.call('HSET', KEYS[2], 'answers', string.format('%.6f', rate), 'answers_at', string.format('%.0f', now))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""

# KEYS: leases. ARGV: cap, lease id, lease µs. Returns 1 when a place was taken.
SEMAPHORE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[3]) / 1000) + 1000)
return 1
"""

# KEYS: leases. ARGV: lease id, lease µs. Moves a lease still held to expire `lease µs` from now.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) / 1000) + 1000)
end
return 1
"""

# KEYS: learned. ARGV: the epoch the writer knows, "set" or "grow", then for rpm and for tpm: the rate, the
# rate it grew from, the most growth may reach ("" for none); the TTL; for a "set" after a 429, Redis's time
# when the request that drew it was reserved ("" for none), and how long an episode lasts past a "set" (µs).
# "set" (a 429's decrease, a reported limit) overwrites and starts a new epoch, once per episode: a 429 for a
# request reserved before the last "set" took effect was answered by it, whichever process saw it (requests
# reserved before it leave at the old rate after it, and the provider's window is empty for a while).
# "grow" multiplies the stored rate by the writer's growth, within the epoch its writer knows (a process
# growing from an old value never undoes a decrease); processes that grow side by side by their shares
# compound, as one would grow.
LEARN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if ARGV[2] == 'set' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'set_at') or '0')
  if ARGV[10] ~= '' and tonumber(ARGV[10]) < since + tonumber(ARGV[11]) then return epoch end
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'set_at', string.format('%.0f', now))
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'rpm', ARGV[3]) end
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'tpm', ARGV[6]) end
elseif tonumber(ARGV[1]) == epoch then
  for i, name in ipairs({'rpm', 'tpm'}) do
    local new, before, ceiling = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
    if new ~= '' and before ~= '' then
      local old = tonumber(redis.call('HGET', KEYS[1], name) or before)
      local grown = old * tonumber(new) / tonumber(before)
      if ceiling ~= '' then grown = math.min(grown, math.max(old, tonumber(ceiling))) end
      if grown > old then redis.call('HSET', KEYS[1], name, string.format('%.6f', grown)) end
    end
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[9]))
return epoch
"""

_CHECKED: set[str] = set()


def check_reachable(url: str) -> None:
    """A ConfigError naming POCKETBATCH_REDIS_URL when Redis cannot be reached (once per URL)."""
    if url in _CHECKED:
        return
    try:
        import redis
    except ImportError as exc:
        raise ConfigError(
            "POCKETBATCH_REDIS_URL is set but redis-py is not installed: pip install 'pocketbatch[redis]'"
        ) from exc
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise ConfigError(f"POCKETBATCH_REDIS_URL={safe_url(url)}: Redis does not answer ({exc})") from exc
    finally:
        client.close()
    _CHECKED.add(url)


def safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" in url:
        scheme, rest = url.split("://", 1) if "://" in url else ("", url)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@dataclass
class Reservation:
    wait: float  # seconds to wait before sending
    processes: int  # processes that reserved on this limit in the last PROCESS_WINDOW seconds
    rpm: float | None  # learned rates (per second) and output tokens stored by any process, if any
    tpm: float | None
    output_tokens: float | None
    epoch: int  # how many times a process set the learned rates (a decrease): growth stays within one
    bound: str  # what made the caller wait: "" (nothing, or a pause), "rpm" or "tpm"
    reserved_at: int | None = None  # Redis's time (µs) of this reservation (None between loops of a process)
    answers: float | None = None  # answers a second lately, all processes together, if any


@dataclass(frozen=True)
class Learned:
    """A learned rate (per second) to store; after growth, the rate it grew from and the most it may reach."""

    rate: float
    before: float | None = None
    ceiling: float = math.inf


class LoopsShare:
    """The RESERVE script's arithmetic in one process, for a limiter used from several event loops at once
    (the sync `call_llm` runs on its own loop while a program's parallel node runs on another): one GCRA
    for requests and one for tokens, on time.monotonic, behind a thread lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rtat: float | None = None
        self._ttat = 0.0

    async def reserve(self, rpm: float, rpm_burst: float, tpm: float, tpm_burst: float, tokens: int):
        with self._lock:
            now = time.monotonic()
            send, bound = now, ""
            ri = 0.0 if rpm == math.inf else 1 / rpm
            ti = 0.0 if tpm == math.inf else 1 / tpm
            rb, tb = ri * rpm_burst, ti * tpm_burst
            if ri:
                rtat = self._rtat if self._rtat is not None else now + rb - ri  # paced start
                if rtat - rb + ri > send:
                    send, bound = rtat - rb + ri, "rpm"
            if ti and self._ttat - tb + ti * tokens > send:
                send, bound = self._ttat - tb + ti * tokens, "tpm"
            if ri:
                self._rtat = max(rtat, send) + ri
            if ti:
                self._ttat = max(self._ttat, send) + ti * tokens
        return Reservation(send - now, 1, None, None, None, 0, bound)


class SharedLimit:
    """The Redis side of one limiter. Every method returns None (and marks the limit lost) when Redis
    does not answer; the caller then goes on locally."""

    def __init__(
        self, url: str, provider: str, model: str, key: str, lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self._renewals: dict[str, asyncio.Task] = {}  # lease id -> the task that keeps it alive
        tag = hashlib.sha256(f"{provider}\0{model}\0{key}".encode()).hexdigest()[:20]
        self.prefix = f"pocketbatch:{{{tag}}}:"
        self.process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, object] = (
            weakref.WeakKeyDictionary()
        )
        self.lost_at: float | None = None  # time.monotonic() when Redis stopped answering
        self._tried_at = 0.0
        self.processes = 1  # the last count of processes seen sharing this limit
        self._warned = False

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _client(self):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A blocking pool: hundreds of workers reserve at once, and redis-py's default pool raises
            # MaxConnectionsError past 100 connections, which would read as "Redis lost" and drop this
            # process to a local limit at a full share. Waiting for a connection costs ~1 ms an eval.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=POOL_CONNECTIONS,
                timeout=2,
                socket_connect_timeout=1,
                socket_timeout=2,
                # No retries inside redis-py: a lost Redis must fall back at once, not stall every call.
                retry=Retry(NoBackoff(), 0),
            )
            # from_pool: the client owns its pool and disconnects it when closed. Redis(connection_pool=)
            # leaves a pool it was given open on aclose(), and its connections to the garbage collector.
            client = aioredis.Redis.from_pool(pool)
            self._clients[loop] = client
            close_with_loop(client)  # its connections close with the loop, not at garbage collection
        return client

    # -- lost and found -------------------------------------------------------------------------

    def lost(self) -> bool:
        """True while Redis is lost and not yet due for another try."""
        return self.lost_at is not None and time.monotonic() - self._tried_at < RETRY_SECONDS

    def share(self) -> float:
        """This process's share of the limit while Redis is lost."""
        return 1 / max(1, self.processes)

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._tried_at = now
        if self.lost_at is None:
            self.lost_at = now
            if not self._warned:  # one WARNING per process: a flapping Redis does not flood the log
                self._warned = True
                log.warning(
                    "POCKETBATCH_REDIS_URL=%s does not answer (%s): going on with a local limit at this "
                    "process's share (1/%d) until it answers again",
                    safe_url(self.url),
                    type(exc).__name__,
                    self.processes,
                )

    def _answered(self) -> None:
        if self.lost_at is not None:
            log.info("POCKETBATCH_REDIS_URL answers again: the limit is shared again")
            self.lost_at = None

    async def _run(self, script: str, keys: list[str], args: list):
        import redis

        self._tried_at = time.monotonic()
        try:
            result = await self._client().eval(script, len(keys), *keys, *args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._failed(exc)
            return None
        self._answered()
        return result

    # -- admission ------------------------------------------------------------------------------

    async def reserve(self, rpm: float, rpm_burst: float, tpm: float, tpm_burst: float, tokens: int):
        """Reserve one request and `tokens` tokens at these rates (per second; math.inf = unlimited)
        and bursts; a Reservation, or None when Redis is lost."""
        ri = 0 if rpm == math.inf else 1e6 / rpm
        ti = 0 if tpm == math.inf else 1e6 / tpm
        keys = [self._key(k) for k in ("rpm", "tpm", "pause", "procs", "learned", "rpm_interval")]
        args = [f"{ri:.3f}", f"{ri * rpm_burst:.0f}", f"{ti:.6f}", f"{ti * tpm_burst:.0f}", tokens]
        more = [self.process, f"{PROCESS_WINDOW * 1e6:.0f}", f"{ANSWERS_SECONDS * 1e6:.0f}"]
        result = await self._run(RESERVE, keys, [*args, *more])
        if result is None:
            return None
        wait, procs, learned_rpm, learned_tpm, out, epoch, bound, reserved_at, answers = result
        self.processes = int(procs)
        return Reservation(
            max(0.0, float(wait) / 1e6),
            int(procs),
            _num(learned_rpm),
            _num(learned_tpm),
            _num(out),
            int(_num(epoch) or 0),
            ("", "rpm", "tpm")[int(bound)],
            int(reserved_at),
            _num(answers),
        )

    async def pause(self, seconds: float) -> None:
        """Every process's next reservation starts after `seconds` from now (Redis's now)."""
        await self._run(PAUSE, [self._key("pause")], [f"{seconds * 1e6:.0f}"])

    async def answered(self, tokens: int, tpm: float, output_tokens: int | None = None) -> None:
        """The provider answered: count it in the shared rate of answers. It used `tokens` more (or fewer,
        when negative) than reserved: move the token bucket by as much. `output_tokens`: what an answer
        whose output size was guessed used, for the running average every process estimates with."""
        shift = 0 if tpm == math.inf else tokens * 1e6 / tpm
        out = "" if output_tokens is None else str(output_tokens)
        keys = [self._key("tpm"), self._key("learned")]
        args = [f"{shift:.0f}", out, OUTPUT_EMA, LEARNED_TTL, f"{ANSWERS_SECONDS * 1e6:.0f}"]
        await self._run(ANSWERED, keys, args)

    async def learned(
        self,
        epoch: int,
        how: str,
        rpm: Learned | None,
        tpm: Learned | None,
        reserved_at: int | None = None,
        episode: float = 0.0,
    ) -> None:
        """Store the rates this process learned, for every process, for LEARNED_TTL seconds: `how` "set"
        after a decrease (`reserved_at`: Redis's time the request that drew the 429 was reserved; a 429 for
        a request reserved up to `episode` seconds after the last decrease is answered by it) or a
        reported limit, "grow" after growth within `epoch`."""

        def text(value: float | None) -> str:
            return "" if value is None or value == math.inf else repr(value)

        args: list = [epoch, how]
        for rate in (rpm, tpm):
            args += ["", "", ""] if rate is None else [text(rate.rate), text(rate.before), text(rate.ceiling)]
        args += [LEARNED_TTL, "" if reserved_at is None else reserved_at, f"{episode * 1e6:.0f}"]
        await self._run(LEARN, [self._key("learned")], args)

    # -- the concurrency cap --------------------------------------------------------------------

    async def take_place(self, cap: int) -> str | None:
        """Wait for one of `cap` places across processes; the lease id, or None when Redis is lost
        (the caller then relies on its local semaphore alone). The lease is renewed until free_place."""
        lease = uuid.uuid4().hex
        lease_us = f"{self.lease_seconds * 1e6:.0f}"
        while True:
            got = await self._run(SEMAPHORE, [self._key("leases")], [cap, lease, lease_us])
            if got is None:
                return None
            if int(got):
                self._renewals[lease] = asyncio.get_running_loop().create_task(self._renew(lease))
                return lease
            await asyncio.sleep(LEASE_POLL)

    async def _renew(self, lease: str) -> None:
        """Keep `lease` alive while its call runs (a lost Redis skips a turn: the lease may then expire,
        and the place is counted by the local semaphore alone, as when Redis is lost at take_place)."""
        lease_us = f"{self.lease_seconds * 1e6:.0f}"
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await self._run(RENEW, [self._key("leases")], [lease, lease_us])

    async def free_place(self, lease: str) -> None:
        import redis

        renewal = self._renewals.pop(lease, None)
        if renewal is not None:
            renewal.cancel()
        try:
            await self._client().zrem(self._key("leases"), lease)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._failed(exc)  # the lease expires by itself

    async def close(self) -> None:
        """Close this loop's connection (tests, and loops about to end)."""
        try:
            client = self._clients.pop(asyncio.get_running_loop(), None)
        except RuntimeError:
            return
        if client is not None:
            await client.aclose()


def _num(value) -> float | None:
    if value in (None, b"", ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None
