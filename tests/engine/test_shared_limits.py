"""Limits shared through a real redis-server (POCKETBATCH_REDIS_URL): several processes, one limit."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.servers import max_in_window
from pocketbatch import config
from pocketbatch.engine import concurrent
from pocketbatch.engine.limits import _rpm_capacity, limiter_for
from pocketbatch.errors import ConfigError
from pocketbatch.providers import LLMResponse

from .conftest import FAST, ServerProvider, requests

WORKER = Path(__file__).with_name("shared_worker.py")


RPM = 1200  # 20 requests a second between all processes


@pytest.fixture
def redis_url(redis_url, monkeypatch):
    """The emptied session Redis, set as POCKETBATCH_REDIS_URL."""
    monkeypatch.setenv("POCKETBATCH_REDIS_URL", redis_url)
    config.reload()
    return redis_url


def run_workers(tmp_path: Path, url: str, n: int, *extra: list[str], **more: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    env.update(POCKETBATCH_REDIS_URL=url, POCKETBATCH_RPM=str(RPM), POCKETBATCH_JOURNAL="off", **more)
    procs, outs = [], []
    for i, args in enumerate(extra):
        out = tmp_path / f"books{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(n), str(out), *args], env=env))
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    return [json.loads(out.read_text()) for out in outs]


def shared_limiter(url: str, limits, defaults=None):
    """What each process has: its own limiter and connection to Redis, one limit's keys there."""
    from pocketbatch.config import Limits
    from pocketbatch.engine.limits import Limiter, LimiterKey
    from pocketbatch.engine.shared_limits import SharedLimit

    made = Limiter(LimiterKey("p", "m", ""), limits, defaults or Limits())
    made.shared = SharedLimit(url, "p", "m", "")
    return made


def test_two_processes_share_one_limit(tmp_path, redis_url):
    books = run_workers(tmp_path, redis_url, 60, [], [])
    assert [b["ok"] for b in books] == [60, 60]
    hits = [t for b in books for t in b["hits"]]
    # Each process alone would be allowed 20 a second; together they stay within one limit.
    assert max_in_window(hits) <= RPM / 60 + _rpm_capacity(RPM / 60)


def test_a_clock_30_s_ahead_in_one_process_changes_nothing(tmp_path, redis_url):
    books = run_workers(tmp_path, redis_url, 60, [], ["--skew", "30"])
    assert [b["ok"] for b in books] == [60, 60]
    hits = [t for b in books for t in b["hits"]]
    assert max_in_window(hits) <= RPM / 60 + _rpm_capacity(RPM / 60)
    both = [max(b["hits"]) - min(b["hits"]) for b in books]
    assert min(both) > 0  # both processes were sending during the run, interleaved in one limit


async def test_a_429_seen_by_one_process_pauses_the_other(tmp_path, redis_url):
    [books] = run_workers(tmp_path, redis_url, 1, ["--429", "30"], POCKETBATCH_MAX_RETRIES="1")
    assert books["statuses"] == [429]
    limiter = limiter_for(ServerProvider(), "m")  # this process: same provider, model and key
    reservation = await limiter.shared.reserve(20.0, 4.0, float("inf"), 1.0, 1)
    await limiter.shared.close()
    assert reservation.processes == 2  # the other process and this one
    assert 25 < reservation.wait <= 31  # Redis's own clock: the other process's pause holds here


def test_unreachable_redis_at_start_up_is_a_config_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("POCKETBATCH_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    config.reload()
    with pytest.raises(ConfigError, match="POCKETBATCH_REDIS_URL"):
        asyncio.run(concurrent.call(ServerProvider(), requests(1)[0]))


def test_a_url_that_is_not_redis_is_a_config_error(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_REDIS_URL", "http://localhost:6379")
    with pytest.raises(ConfigError, match="POCKETBATCH_REDIS_URL must be a Redis URL"):
        config.reload()


async def test_redis_killed_mid_run_then_restarted_loses_nothing(new_redis_server, monkeypatch, caplog):
    server = new_redis_server()
    monkeypatch.setenv("POCKETBATCH_REDIS_URL", server.url)
    monkeypatch.setenv("POCKETBATCH_RPM", str(RPM))
    config.reload()
    provider = ServerProvider(latency=0.005)
    n = 100

    async def outage() -> None:
        while len(provider.hits) < 20:
            await asyncio.sleep(0.01)
        server.stop()
        while len(provider.hits) < 50:
            await asyncio.sleep(0.01)
        server.start()

    caplog.set_level(logging.WARNING, logger="pocketbatch")
    side = asyncio.ensure_future(outage())
    # Few workers, so reservations are made along the run (a reservation made before the outage
    # holds whatever happens to Redis after it).
    results = await concurrent.run_all(provider, requests(n), policy=FAST, workers=4)
    await side
    limiter = limiter_for(provider, "m")
    assert all(isinstance(r, LLMResponse) for r in results)
    assert provider.count(200) == n
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "POCKETBATCH_REDIS_URL" in warnings[0].getMessage()
    assert limiter.shared.lost_at is None  # back on Redis before the run ended
    await limiter.shared.close()


async def test_the_token_estimate_is_corrected_after_the_answer(redis_url):
    from pocketbatch.engine.shared_limits import SharedLimit

    shared = SharedLimit(redis_url, "p", "m", "tokens")
    inf = float("inf")
    assert (await shared.reserve(inf, 1, 100.0, 100.0, 100)).wait == 0  # a bucket of 100 tokens, full
    second = await shared.reserve(inf, 1, 100.0, 100.0, 100)
    assert 0.9 < second.wait <= 1.0 and second.bound == "tpm"  # a second of tokens to wait for
    await shared.answered(-150, 100.0)  # both answers used 25 tokens, not 100
    assert (await shared.reserve(inf, 1, 100.0, 100.0, 50)).wait < 0.1
    await shared.close()


async def test_a_rate_learned_by_one_process_is_taken_up_by_another(redis_url):
    from pocketbatch.config import Limits
    from pocketbatch.errors import RateLimitError

    a, b = (shared_limiter(redis_url, Limits(), Limits(600, 0, 0)) for _ in range(2))
    [request] = requests(1)
    ticket = await a.acquire(request)
    a.on_response(LLMResponse("ok"), ticket)
    a.release(ticket)
    ticket = await a.acquire(request)
    a.on_error(RateLimitError("429", status=429, retry_after=0.0), ticket)
    a.release(ticket)
    await asyncio.gather(*a._tasks)
    assert a.rpm < 600  # a 429 after the first answer: a learned decrease, stored in Redis
    ticket = await b.acquire(request)
    b.release(ticket)
    assert b.rpm == pytest.approx(a.rpm)
    await a.shared.close()
    await b.shared.close()


async def test_hundreds_of_callers_reserving_at_once_do_not_read_as_redis_lost(redis_url):
    from pocketbatch.engine.shared_limits import SharedLimit

    # A pool of 500 workers (3,000 RPM) reserves at once; redis-py's default pool refuses the 101st
    # connection, which used to drop the process to a local limit at a full share.
    limit = SharedLimit(redis_url, "p", "m", "k")
    reservations = await asyncio.gather(
        *(limit.reserve(1000.0, 5.0, float("inf"), 1.0, 1) for _ in range(300))
    )
    await limit.close()
    assert all(r is not None for r in reservations)
    assert limit.lost_at is None


async def test_a_token_limit_far_above_the_calls_use_holds_no_process_back(redis_url):
    from pocketbatch.config import Limits
    from pocketbatch.engine.limits import Limiter
    from pocketbatch.providers import Usage

    # Two processes, 20 requests a second and 1,000 tokens a second between them; a call uses 5 tokens
    # (100 a second at the full request rate), but before any answer its output is guessed at 256.
    bounds: list[str] = []

    def limiter():
        made = shared_limiter(redis_url, Limits(rpm=1200, tpm=60_000))
        reserve = made.shared.reserve

        async def spied(*args):
            reservation = await reserve(*args)
            bounds.append(reservation.bound)
            return reservation

        made.shared.reserve = spied
        return made

    async def call(made: Limiter, request) -> None:
        ticket = await made.acquire(request)
        await asyncio.sleep(0.3)  # the call's latency: its tokens are corrected only after it
        made.on_response(LLMResponse("ok", usage=Usage(2, 3)), ticket)
        made.release(ticket)

    a, b = limiter(), limiter()
    await asyncio.gather(*(call(made, r) for made in (a, b) for r in requests(25)))
    await asyncio.gather(*a._tasks, *b._tasks)
    await a.shared.close()
    await b.shared.close()
    # Every caller queued at once; once the first answers taught the output size, the requests a
    # second bound every admission, never the tokens that queued callers guessed when they came in.
    assert len(bounds) == 50
    assert bounds[10:].count("tpm") == 0


async def test_processes_growing_side_by_side_grow_the_shared_rate_as_one_would(redis_url):
    from pocketbatch.engine.shared_limits import Learned, SharedLimit

    a, b = (SharedLimit(redis_url, "p", "m", "grow") for _ in range(2))
    inf = float("inf")
    await a.learned(0, "grow", Learned(10.0), None)  # nothing stored yet: a growth from 10 starts it
    # Both saw 10 a second and grew it by their half of one round's doubling, from the same value: one
    # after the other in Redis, the rate doubles, as one process alone would have grown it.
    for limit in (a, b):
        await limit.learned(0, "grow", Learned(10.0 * 2**0.5, before=10.0), None)
    reservation = await a.reserve(inf, 1, inf, 1, 1)
    assert reservation.rpm == pytest.approx(20.0)
    # ... up to the ceiling the grower knew (the rate it recovers to after a 429)
    await b.learned(0, "grow", Learned(40.0, before=20.0, ceiling=25.0), None)
    assert (await a.reserve(inf, 1, inf, 1, 1)).rpm == pytest.approx(25.0)
    await a.close()
    await b.close()


async def test_one_429_episode_decreases_the_shared_rate_once(redis_url):
    from pocketbatch.engine.shared_limits import Learned, SharedLimit

    a, b = (SharedLimit(redis_url, "p", "m", "episode") for _ in range(2))
    inf = float("inf")
    sent = (await a.reserve(inf, 1, inf, 1, 1)).reserved_at  # a request both processes' next ones follow
    await a.learned(0, "set", Learned(8.0), None, reserved_at=sent)  # its 429: the rate goes down
    # Another process's 429 for a request sent before that decrease is the same episode: already answered.
    await b.learned(0, "set", Learned(6.8), None, reserved_at=sent)
    after = await b.reserve(inf, 1, inf, 1, 1)
    assert (after.rpm, after.epoch) == (pytest.approx(8.0), 1)
    # A 429 for a request sent after it is a new one.
    await b.learned(1, "set", Learned(6.8), None, reserved_at=after.reserved_at)
    assert (await a.reserve(inf, 1, inf, 1, 1)).rpm == pytest.approx(6.8)
    await a.close()
    await b.close()


def test_a_run_on_redis_leaves_no_connection_open(tmp_path, redis_url):
    # The shared limiter's Redis clients close with their event loop: with ResourceWarning an error, a
    # connection left to the garbage collector prints "Exception ignored ... ResourceWarning" at exit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    env.update(POCKETBATCH_REDIS_URL=redis_url, POCKETBATCH_RPM=str(RPM), POCKETBATCH_JOURNAL="off")
    env.update(POCKETBATCH_MAX_CONCURRENCY="4", PYTHONWARNINGS="error::ResourceWarning")
    out = tmp_path / "books.json"
    run = subprocess.run(
        [sys.executable, str(WORKER), "20", str(out)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["ok"] == 20
    assert "ResourceWarning" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr


async def test_two_limiters_sharing_a_concurrency_cap_never_have_more_in_flight(redis_url):
    from pocketbatch.config import Limits
    from pocketbatch.engine.limits import Limiter

    cap, in_flight, most = 3, 0, 0

    async def call(made: Limiter, request) -> None:
        nonlocal in_flight, most
        ticket = await made.acquire(request)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        made.on_response(LLMResponse("ok"), ticket)
        made.release(ticket)

    # Each alone would let 3 through: only the cap in Redis holds the two to 3 together.
    a, b = (shared_limiter(redis_url, Limits(rpm=0, tpm=0, max_concurrency=cap)) for _ in range(2))
    await asyncio.gather(*(call(made, r) for made in (a, b) for r in requests(20)))
    await asyncio.gather(*a._tasks, *b._tasks)
    await a.shared.close()
    await b.shared.close()
    assert most == cap


HOLDER = """
import asyncio, sys
from pocketbatch.engine.shared_limits import SharedLimit

async def main():
    limit = SharedLimit(sys.argv[1], "p", "m", "dead", lease_seconds=float(sys.argv[2]))
    assert await limit.take_place(1)
    print("held", flush=True)
    await asyncio.sleep(60)  # killed before it frees its place

asyncio.run(main())
"""


def test_a_holder_that_dies_frees_its_place_when_its_lease_expires(redis_url):
    import time

    from pocketbatch.engine.shared_limits import SEMAPHORE, SharedLimit

    lease = 0.3
    limit = SharedLimit(redis_url, "p", "m", "dead", lease_seconds=lease)

    async def held() -> bool:  # one try at the one place, without waiting for it
        args = [1, "probe", f"{lease * 1e6:.0f}"]
        return await limit._run(SEMAPHORE, [limit._key("leases")], args) == 0

    async def take_and_free() -> None:
        place = await asyncio.wait_for(limit.take_place(1), timeout=30)
        assert place is not None
        await limit.free_place(place)

    command = [sys.executable, "-c", HOLDER, redis_url, str(lease)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            time.sleep(4 * lease)  # past its first lease: the living holder renewed it
            assert asyncio.run(held())
        finally:
            holder.kill()
    asyncio.run(take_and_free())  # free once the dead holder's lease expired


async def test_every_process_answers_count_in_one_shared_rate_of_answers(redis_url):
    from pocketbatch.engine.shared_limits import ANSWERS_SECONDS, SharedLimit

    a, b = (SharedLimit(redis_url, "p", "m", "answers") for _ in range(2))
    inf = float("inf")
    assert (await a.reserve(inf, 1, inf, 1, 1)).answers is None  # nothing answered yet
    for limit in (a, b) * 5:
        await limit.answered(0, inf)
    # Ten answers just now, from two processes: what slow start resumes under when it overshoots.
    answers = (await b.reserve(inf, 1, inf, 1, 1)).answers
    assert answers == pytest.approx(10 / ANSWERS_SECONDS, rel=0.05)
    await a.close()
    await b.close()


async def test_a_shared_pause_ends_with_one_request_then_the_rate(redis_url):
    from pocketbatch.engine.shared_limits import SharedLimit

    shared = SharedLimit(redis_url, "p", "m", "hold")
    inf, rate = float("inf"), 50.0
    await shared.pause(0.05)
    sends = []
    for _ in range(4):
        reservation = await shared.reserve(rate, _rpm_capacity(rate), inf, 1, 1)
        sends.append(reservation.reserved_at + reservation.wait * 1e6)
    await shared.close()
    # The provider's Retry-After is when it has room for one request: not the bucket's burst of four.
    assert all(b - a >= 0.99e6 / rate for a, b in itertools.pairwise(sends))


async def test_a_decrease_keeps_the_requests_reserved_ahead_as_many(redis_url):
    from pocketbatch.engine.shared_limits import SharedLimit

    shared = SharedLimit(redis_url, "p", "m", "lead")
    inf, fast, slow = float("inf"), 100.0, 50.0

    async def send_at(rate: float) -> float:
        reservation = await shared.reserve(rate, _rpm_capacity(rate), inf, 1, 1)
        return reservation.reserved_at + reservation.wait * 1e6  # Redis's time of the send, µs

    sends = [await send_at(fast) for _ in range(5)]  # callers queue: the bucket runs ahead of them
    after = await send_at(slow)  # a 429 halved the rate
    await shared.close()
    # The lead was four requests and a burst at the old rate; kept in time, the first request at the
    # new rate would go before the last one reserved at the old rate, into a provider that is full.
    assert after - sends[-1] >= 1e6 / fast


def test_a_process_taking_back_its_own_decrease_from_redis_keeps_its_anchor():
    import time

    from pocketbatch.config import Limits
    from pocketbatch.engine.limits import DECREASE, Limiter, LimiterKey

    limiter = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(3000, 0, 0))  # learns from 50/s
    rate = limiter._rpm
    rate.decreased(time.monotonic(), 52.0)  # a 429 at 50/s, and another near it: the limit is there
    rate.rate = 52.0
    rate.decreased(time.monotonic(), 52.0 * DECREASE)
    anchor, confirmed = rate.anchor, rate.confirmed
    assert (anchor, confirmed) == (52.0, 1)
    rate.rate *= 1.01  # it grew a little before its next reservation brought its own decrease back
    limiter._adopt(52.0 * DECREASE, None, None, decreased=True)
    assert rate.rate == pytest.approx(52.0 * DECREASE)
    assert (rate.anchor, rate.confirmed) == (anchor, confirmed)  # not a second 429 at 44/s


def test_shared_slow_start_that_overshot_resumes_under_the_limit():
    from pocketbatch.config import Limits
    from pocketbatch.engine.limits import Limiter, LimiterKey, _Rate

    # Four processes grew the shared rate to 2.4 times a limit of 50/s by the first 429; the shared rate
    # of answers lags (27/s), so the rate a round earlier, 60/s, is the best guess of the limit.
    rate = _Rate(configured=None, default=600, now=0.0)
    rate.rate = 120.0
    assert rate.decrease(1.0, sent_at=1.0, observed=100.0, admitted=27.0, shared=True)
    assert rate.anchor == 60.0
    assert rate.rate < 50.0  # every 429 of the next round is answered by this decrease: resume under
    # Another process in slow start takes the decrease up from Redis and recovers toward the same rate.
    other = Limiter(LimiterKey("p", "m", ""), Limits(), Limits(600, 0, 0))
    other._rpm.rate = 110.0
    other._adopt(rate.rate, None, None, decreased=True)
    assert other._rpm.anchor == pytest.approx(rate.anchor)


async def test_slow_start_that_overshot_pauses_for_what_every_process_reserved(redis_url):
    import time

    from pocketbatch.config import Limits
    from pocketbatch.errors import RateLimitError

    limiter = shared_limiter(redis_url, Limits(), Limits(600, 0, 0))
    [request] = requests(1)
    ticket = await limiter.acquire(request)
    limiter.on_response(LLMResponse("ok"), ticket)
    limiter.release(ticket)
    ticket = await limiter.acquire(request)
    limiter.shared.processes = 4
    limiter._rpm.rate = 120.0  # slow start, shared by four processes, far past the limit
    before = time.monotonic()
    limiter.on_error(RateLimitError("429", status=429, retry_after=0.01), ticket)
    limiter.release(ticket)
    await asyncio.gather(*limiter._tasks)
    await limiter.shared.close()
    assert not limiter._rpm.slow_start
    # The three other processes send the request each reserved at 120/s: the pause leaves room for them
    # and one more at the new rate, not only for the one request a Retry-After counts.
    assert limiter.paused_until >= before + 5 / limiter._rpm.rate
