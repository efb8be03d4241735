"""Rounds: the calls of a parallel node's items go out together, concurrent or as batch jobs."""

import asyncio
import gc
import inspect
import json
import sys
import time

import pytest

from pocketbatch import (
    AsyncFlow,
    AsyncNode,
    AsyncParallelBatchFlow,
    AsyncParallelBatchNode,
    Node,
    call_llm,
    call_llm_async,
)
from pocketbatch.default_plugins.offline import OfflineBatch, OfflineProvider
from pocketbatch.engine.collector import Call
from pocketbatch.testing import FakeBatch, FakeProvider, ask_each


@pytest.fixture(autouse=True)
def quick_batches(pocketbatch_env, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0.05")
    pocketbatch_env(
        POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_BATCH_MIN_ITEMS="10", POCKETBATCH_PROVIDER="offline"
    )


def jobs():
    """Each offline job, with its request lines (kept in the job's .jsonl)."""
    return [
        {**json.loads(p.read_text()), "lines": p.with_suffix(".jsonl").read_text().splitlines()}
        for p in OfflineBatch.folder().glob("*.json")
    ]


class Ask(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["items"]

    async def exec_async(self, item):
        return await call_llm_async(f"say {item}", **shared_options(item))

    async def post_async(self, shared, prep_res, exec_res):
        shared["out"] = exec_res


def shared_options(item):
    return item.get("options", {}) if isinstance(item, dict) else {}


async def run(node, items):
    shared = {"items": items}
    await AsyncFlow(start=node).run_async(shared)
    return shared["out"]


async def test_small_rounds_stay_concurrent():
    out = await run(Ask(), list(range(5)))
    assert [r.via for r in out] == ["concurrent"] * 5
    assert [f"say {i}" in r for i, r in enumerate(out)] == [True] * 5
    assert jobs() == []


async def test_large_rounds_go_to_batch_in_input_order_split_over_the_limits(monkeypatch):
    monkeypatch.setattr(OfflineBatch, "max_requests", 8)
    out = await run(Ask(), list(range(30)))
    assert all(r.via == "batch" for r in out)
    assert [f"say {i} " in r + " " for i, r in enumerate(out)] == [True] * 30
    assert sorted(len(j["lines"]) for j in jobs()) == [6, 8, 8, 8]
    offline = OfflineProvider()
    assert all(r.cost_usd == pytest.approx(offline.cost(r.model, r.usage) * 0.5) for r in out)  # batch price


async def test_the_node_mode_wins_over_the_thresholds():
    out = await run(Ask(mode="batch"), [1, 2])
    assert [r.via for r in out] == ["batch", "batch"]
    out = await run(Ask(mode="concurrent"), list(range(20)))
    assert {r.via for r in out} == {"concurrent"}


async def test_each_step_of_a_parallel_flows_branches_is_one_round():
    class First(AsyncNode):
        async def exec_async(self, _):
            return await call_llm_async(f"first {self.params['n']}")

        async def post_async(self, shared, p, e):
            shared.setdefault("first", {})[self.params["n"]] = e

    class Second(First):
        async def exec_async(self, _):
            await asyncio.sleep(0.001 * (self.params["n"] % 3))  # branches reach the call at different times
            return await call_llm_async(f"second {self.params['n']}")

        async def post_async(self, shared, p, e):
            shared.setdefault("second", {})[self.params["n"]] = e

    class Branches(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"n": n} for n in range(12)]

    first = First()
    first >> Second()
    shared = {}
    await Branches(start=first).run_async(shared)
    assert {r.via for r in shared["first"].values()} == {"batch"}
    assert {r.via for r in shared["second"].values()} == {"batch"}
    assert sorted(len(j["lines"]) for j in jobs()) == [12, 12]


async def test_a_parallel_node_inside_parallel_branches_joins_one_round():
    class Inner(Ask):
        async def prep_async(self, shared):
            return [f"{self.params['b']}.{i}" for i in range(4)]

        async def post_async(self, shared, prep_res, exec_res):
            shared.setdefault("out", {})[self.params["b"]] = exec_res

    class Outer(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"b": b} for b in range(5)]

    shared = {}
    await Outer(start=AsyncFlow(start=Inner())).run_async(shared)
    assert [len(job["lines"]) for job in jobs()] == [20]  # 5 branches × 4 items, one job
    assert "say 3.2" in shared["out"][3][2]


async def test_mixed_providers_and_models_make_one_group_each(register_provider):
    fake = register_provider(FakeProvider("fake", batch=True))

    class Mixed(Ask):
        async def exec_async(self, i):
            model = ["offline/offline-small", "offline/offline-large", "fake/x"][i % 3]
            return await call_llm_async(f"say {i}", model=model)

    out = await run(Mixed(), list(range(45)))
    assert [r.model for r in out[:3]] == ["offline-small", "offline-large", "x"]
    assert {r.via for r in out} == {"batch"}
    assert len(jobs()) == 2 and len(fake.batch.jobs) == 1
    assert len(fake.requests) == 15  # nothing lost, nothing twice


async def test_items_that_do_not_call_or_call_later_do_not_stall_the_round():
    class Sometimes(Ask):
        async def exec_async(self, i):
            if i % 2:
                return "no call"
            await asyncio.sleep(0.001 * i)
            return await call_llm_async(f"say {i}")

    out = await run(Sometimes(), list(range(24)))
    assert out[1] == "no call" and out[2].via == "batch"
    assert [len(j["lines"]) for j in jobs()] == [12]


async def test_failed_lines_retry_concurrently_and_final_errors_reach_the_node():
    class WithFallback(Ask):
        async def exec_fallback_async(self, item, exc):
            return f"fallback: {type(exc).__name__}"

    items = [{"options": {}} for _ in range(12)]
    items[2] = {"options": {"offline_error": "expired"}}
    items[5] = {"options": {"offline_error": "request"}}
    out = await run(WithFallback(max_retries=2), items)
    assert out[0].via == "batch"
    assert out[5] == "fallback: RequestError"  # final: the node's retries and fallback apply
    assert out[2].via == "concurrent"  # expired in the batch job, then answered by a concurrent call


async def test_deadline_cancels_keeps_partial_results_and_finishes_concurrently(pocketbatch_env, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "36000")
    pocketbatch_env(POCKETBATCH_BATCH_DEADLINE="0.05", POCKETBATCH_POLL_INTERVAL="0.01",
                    POCKETBATCH_BATCH_MIN_ITEMS="10", POCKETBATCH_PROVIDER="offline")  # fmt: skip
    out = await run(Ask(), list(range(12)))
    assert len(out) == 12 and all(f"say {i}" in r for i, r in enumerate(out))
    assert {r.via for r in out} == {"concurrent"}  # cancelled early: every line finished concurrently
    assert jobs()[0]["cancelled"] is not None


async def test_cancelling_the_run_cancels_the_job(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "30")
    task = asyncio.ensure_future(run(Ask(), list(range(12))))
    while not jobs():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert jobs()[0]["cancelled"] is not None  # by the time the run's cancellation reaches its caller


async def test_a_cancelled_run_ends_once_its_job_is_cancelled_at_the_provider(register_provider):
    """Cancelling a job is a request to the provider, which takes its time: the run waits for it, so a
    caller that cancels a run and exits has not left a job running (and billing)."""

    class SlowToCancel(FakeBatch):
        async def cancel(self, job_id):
            await asyncio.sleep(0.05)
            await super().cancel(job_id)

    fake = register_provider(FakeProvider("slowcancel", batch=True))
    fake.batch = SlowToCancel(fake, polls=10**6)

    class Held(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return range(3)

        async def exec_async(self, i):
            return await call_llm_async(f"say {i}", model="slowcancel/m")

    task = asyncio.ensure_future(AsyncFlow(start=Held(mode="batch")).run_async({}))
    while not fake.batch.jobs:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [job["cancelled"] for job in fake.batch.jobs.values()] == [True]


async def test_outside_parallel_nodes_calls_go_straight_to_the_concurrent_path():
    class One(AsyncNode):
        async def exec_async(self, _):
            return await call_llm_async("hello")

        async def post_async(self, shared, p, e):
            shared["out"] = e

    shared = {}
    await AsyncFlow(start=One()).run_async(shared)
    assert shared["out"].via == "concurrent"


async def test_a_sync_node_in_a_parallel_flows_branches_calls_outside_the_round():
    """call_llm never joins a round, even from a branch's task (whose round lives in another loop)."""

    class Say(Node):
        def exec(self, _):
            return call_llm(f"say {self.params['n']}")

        def post(self, shared, prep_res, exec_res):
            shared.setdefault("out", {})[self.params["n"]] = exec_res

    class Branches(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"n": n} for n in range(12)]  # enough for a batch round, were they to join one

    shared = {}
    await Branches(start=Say(), mode="batch").run_async(shared)
    assert [f"say {n}" in shared["out"][n] for n in range(12)] == [True] * 12
    assert {reply.via for reply in shared["out"].values()} == {"concurrent"}


async def test_batch_mode_without_a_batch_api_warns_and_runs_concurrently(register_provider, caplog):
    register_provider(FakeProvider("nobatch"))

    class Fake(Ask):
        async def exec_async(self, i):
            return await call_llm_async(f"say {i}", model="nobatch/x")

    with caplog.at_level("INFO", logger="pocketbatch"):
        out = await run(Fake(mode="batch"), [1, 2])
    assert {r.via for r in out} == {"concurrent"}
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "nobatch has no batch API" in warning.getMessage()


async def test_cancelling_a_node_cancels_its_calls_in_flight(register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_SLOW_RPM=0, POCKETBATCH_SLOW_TPM=0)  # unlimited: all five go at once
    started, cancelled = [], []

    class Slow(FakeProvider):
        async def call_llm_async(self, request):
            started.append(request)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(request)
                raise
            return await super().call_llm_async(request)

    register_provider(Slow("slow"))

    class AskSlow(Ask):
        async def exec_async(self, i):
            return await call_llm_async(f"say {i}", model="slow/x")

    task = asyncio.ensure_future(run(AskSlow(), list(range(5))))
    while len(started) < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(cancelled) == 5  # no call left running after its node was cancelled


async def test_calls_of_items_cancelled_before_their_round_was_sent_are_never_sent(
    register_provider, pocketbatch_env
):
    fake = register_provider(FakeProvider("held", batch=True))
    never = asyncio.Event()

    class OneStraggler(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return range(20)

        async def exec_async(self, i):
            if i == 0:
                await never.wait()  # the round waits for this item, which never calls
            return await call_llm_async(f"say {i}", model="held/m")

    node = asyncio.ensure_future(AsyncFlow(start=OneStraggler(mode="batch")).run_async({}))
    await asyncio.sleep(0.05)  # 19 calls held in the round
    node.cancel()
    with pytest.raises(asyncio.CancelledError):
        await node
    await asyncio.sleep(0.05)
    assert (fake.batch.jobs, fake.requests) == ({}, [])


async def test_a_concurrent_round_lets_go_of_each_call_once_answered(register_provider, pocketbatch_env):
    """An answered item's call (and its request) is freed while the rest of its round is still sent."""
    pocketbatch_env(POCKETBATCH_HELD_RPM=0, POCKETBATCH_HELD_TPM=0)
    sent, later = [], asyncio.Event()

    class Held(FakeProvider):
        async def call_llm_async(self, request):
            sent.append(request.messages[0]["content"])
            if len(sent) > 600:
                await later.wait()
            return await super().call_llm_async(request)

    register_provider(Held("held"))
    round_ = asyncio.ensure_future(ask_each([f"say {i}" for i in range(1_000)], model="held/m"))
    while len(sent) <= 600:
        await asyncio.sleep(0.01)
    # The 600 answered items resume and finish: a few turns of the loop, more on a loaded machine.
    give_up = asyncio.get_running_loop().time() + 5
    while True:
        await asyncio.sleep(0.01)
        gc.collect()
        alive = sum(isinstance(o, Call) for o in gc.get_objects())
        if alive <= 400 or asyncio.get_running_loop().time() > give_up:
            break
    later.set()
    assert await round_ == [f"reply to say {i}" for i in range(1_000)]
    assert alive == 400  # the calls of the items still waiting, and no more


async def test_an_items_calls_may_be_made_tasks_gathered_or_waited_for():
    """What call_llm_async returns is awaited, made a task or gathered, as a coroutine would be."""

    class Fanout(Ask):
        async def exec_async(self, i):
            first = asyncio.create_task(call_llm_async(f"say {i}a"))
            second, third = await asyncio.gather(
                call_llm_async(f"say {i}b"), asyncio.wait_for(call_llm_async(f"say {i}c"), 10)
            )
            return [await first, second, third]

    out = await run(Fanout(), list(range(20)))
    assert [[reply.split("say ")[1][:3].strip() for reply in replies] for replies in out] == [
        [f"{i}a", f"{i}b", f"{i}c"] for i in range(20)
    ]


async def test_a_call_cancelled_by_its_item_stops_counting_in_its_round():
    class ChangeOfMind(Ask):
        async def exec_async(self, i):
            doomed = asyncio.create_task(call_llm_async(f"never {i}"))
            await asyncio.sleep(0)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return await call_llm_async(f"say {i}")

    out = await asyncio.wait_for(run(ChangeOfMind(), list(range(20))), 30)
    assert [f"say {i}" in reply for i, reply in enumerate(out)] == [True] * 20


def test_call_llm_async_counts_as_a_coroutine_function():
    """Code that checks before it awaits (asyncio's check; inspect's too on Python 3.12+) awaits it."""
    if sys.version_info < (3, 14):  # asyncio.iscoroutinefunction is deprecated from 3.14
        assert asyncio.iscoroutinefunction(call_llm_async)
    if sys.version_info >= (3, 12):
        assert inspect.iscoroutinefunction(call_llm_async)


class AwaitEachOther(Ask):
    """Item 0 waits for an event that item 1 sets once its own call is answered."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ready = asyncio.Event()

    async def exec_async(self, i):
        if i == 0:
            await self.ready.wait()
            return await call_llm_async("say after")
        reply = await call_llm_async("say first")
        self.ready.set()
        return reply


async def test_items_awaiting_each_other_make_progress_after_the_round_timeout(pocketbatch_env, caplog):
    pocketbatch_env(POCKETBATCH_ROUND_TIMEOUT="0.05", POCKETBATCH_PROVIDER="offline")
    with caplog.at_level("INFO", logger="pocketbatch"):
        out = await asyncio.wait_for(run(AwaitEachOther(), [0, 1]), timeout=60)  # a guard, not a timing
    assert "say after" in out[0] and "say first" in out[1]
    [decision] = [r.getMessage() for r in caplog.records if "POCKETBATCH_ROUND_TIMEOUT" in r.getMessage()]
    assert decision.startswith("1 request to offline/") and "1 of its 2 live items" in decision


async def test_a_round_timeout_of_zero_waits_for_every_item(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_ROUND_TIMEOUT="0", POCKETBATCH_PROVIDER="offline")
    task = asyncio.ensure_future(run(AwaitEachOther(), [0, 1]))
    for _ in range(200):  # many turns of the loop and a little time: the round still holds the call
        await asyncio.sleep(0.001)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_round_that_keeps_making_progress_does_not_time_out(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_ROUND_TIMEOUT="30", POCKETBATCH_BATCH_MIN_ITEMS="10",
                    POCKETBATCH_PROVIDER="offline", POCKETBATCH_POLL_INTERVAL="0.01")  # fmt: skip

    class Staggered(Ask):
        async def exec_async(self, i):
            await asyncio.sleep(0.001 * i)
            return await call_llm_async(f"say {i}")

    out = await run(Staggered(), list(range(12)))
    assert {r.via for r in out} == {"batch"} and [len(j["lines"]) for j in jobs()] == [12]


class Counting(FakeProvider):
    """Counts the calls in flight at once; each waits `latency` seconds (0: answered at the next turn),
    then computes for `cpu` seconds."""

    def __init__(self, name, latency, cpu=0.0):
        super().__init__(name)
        self.wait, self.cpu, self.now, self.most = latency, cpu, 0, 0

    async def call_llm_async(self, request):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.wait)
            end = time.process_time() + self.cpu
            while time.process_time() < end:
                pass
        finally:
            self.now -= 1
        return await super().call_llm_async(request)


@pytest.mark.parametrize(
    ("latency", "cpu", "grows"),
    # Waiting on the "network": more workers. Answered at once, or computing: every call waits longer
    # than GROW_AFTER in the loop's own queue (256 calls ahead of it), and more workers would not help.
    [(0.05, 0, True), (0, 0, False), (0, 0.0005, False)],
    ids=["waiting", "answered-at-once", "computing"],
)
async def test_the_worker_pool_grows_only_while_calls_wait(
    register_provider, pocketbatch_env, monkeypatch, latency, cpu, grows
):
    from pocketbatch.engine import collector

    monkeypatch.setattr(collector, "GROW_AFTER", 0.01)
    pocketbatch_env(POCKETBATCH_COUNT_RPM=0, POCKETBATCH_COUNT_TPM=0, POCKETBATCH_MODE="concurrent")
    provider = register_provider(Counting("count", latency, cpu))

    class AskCounting(Ask):
        async def exec_async(self, i):
            return await call_llm_async(f"say {i}", model="count/x")

    out = await run(AskCounting(), list(range(600)))
    assert out == [f"reply to say {i}" for i in range(600)]
    # By one worker a call that waited: the second 50 ms already has more than 256 calls in flight.
    assert 256 < provider.most <= 600 if grows else provider.most == 256
