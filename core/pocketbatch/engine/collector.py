"""Rounds of LLM calls inside parallel nodes and flows.

Each item of a parallel node runs inside a Round. Its calls wait in the round until every live item is
waiting on an answer or finished (the DataLoader rule); then the round's calls go out together, so that the
strategy can see the whole round and send it to the batch API when that pays. A round nested in another
(a parallel node inside a branch of a parallel flow) hands its calls up to the enclosing round as the calls
of the item it runs in, so one round spans every branch.

Items that wait on each other (item 0 awaits an event that item 1 sets after its own call) would make a
round wait forever; a round that holds calls and has seen no progress (no call taken, no item finished,
no answer) for POCKETBATCH_ROUND_TIMEOUT seconds flushes what it holds, and the decision line says so.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from ..config import settings
from ..providers import LLMRequest, LLMResponse, Provider
from .gcpause import cyclic_gc_paused, frozen_until_settled
from .limits import limiter_for

log = logging.getLogger("pocketbatch")

# Calls in flight at once when no limit bounds them (more than a connection pool takes).
MAX_WORKERS = 4096
# A call that took this long waited (on the network or the limiter): the pool grows by one worker,
# unless the process was computing most of that time (then the wait was its own event loop's queue).
GROW_AFTER = 0.02
BUSY = 0.5  # of the time since the pool last looked, spent on the CPU: the loop is the bottleneck

# The round of the item the running task belongs to (None outside parallel nodes), and the item's key:
# two variables, as a (round, key) tuple in one was 58 bytes more for each waiting item.
_round: ContextVar[Round | None] = ContextVar("pocketbatch_round", default=None)
_item: ContextVar[int] = ContextVar("pocketbatch_item", default=0)


class Call(asyncio.Future):
    """One request of a round, and its answer: the call is the future its item awaits (call_llm_async
    returns it), so a waiting item holds no coroutine of pocketbatch's, only this. It also keeps the
    rounds (with their item) that count it as outstanding.

    Cancelling it (the task of the item awaiting it cancels what it awaits) stops it counting. It answers
    the coroutine protocol too, so `asyncio.create_task(call_llm_async(...))` works as with a coroutine.
    """

    __slots__ = ("key", "mode", "note", "outer", "provider", "request", "round", "work")
    key: int
    mode: str | None
    note: str | None
    outer: list[tuple[Round, int]] | None
    provider: Provider
    request: LLMRequest
    round: Round | None
    work: _Work | None

    def __init__(
        self,
        provider: Provider,
        request: LLMRequest,
        mode: str | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(loop=loop or asyncio.get_running_loop())
        self.provider, self.request, self.mode = provider, request, mode
        # The round that counts it as outstanding, with its item's key, in fields rather than a list of
        # pairs (at 100,000 waiting calls, the list and its tuple were an eighth of a KiB each); `outer`
        # holds the enclosing rounds a nested round handed it up to. `note`: why it left its round early
        # (it timed out), for the decision line; `work`: the task sending it, once its round was sent.
        self.round = self.outer = self.note = self.work = None
        self.key = 0

    def held_by(self, round_: Round, key: int) -> None:
        if self.round is None:
            self.round, self.key = round_, key
        elif self.outer is None:
            self.outer = [(round_, key)]
        else:
            self.outer.append((round_, key))

    def settle(self, outcome: LLMResponse | BaseException) -> None:
        self._counted_out()
        if self.done():
            return
        if isinstance(outcome, asyncio.CancelledError):
            self.cancel()
        elif isinstance(outcome, BaseException):
            self.set_exception(outcome)
        else:
            self.set_result(outcome)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._counted_out()  # a cancelled item stops counting as waiting
        if self.work is not None:
            self.work.cancelled_one()
            self.work = None
        return True

    def _counted_out(self) -> None:
        # Counts drop before any waiting item resumes, so the items of a finished batch job all count as
        # running again at once, and their next calls gather into one round instead of one each.
        if self.round is not None:
            self.round.answered(self.key)
            self.round = None
            for round_, key in self.outer or ():
                round_.answered(key)
            self.outer = None

    # The coroutine protocol, for create_task and TaskGroup (they take coroutines, not futures): the
    # task waits on the call, as `await call` would.
    def send(self, value: None) -> Call:
        if not self.done():
            self._asyncio_future_blocking = True
            return self
        raise StopIteration(self.result())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Call:
        raise typ if val is None else val

    def close(self) -> None:
        pass


collections.abc.Coroutine.register(Call)

Dispatch = Callable[[list[Call]], None]


class Round:
    def __init__(self, size: int, live: int, mode: str | None, dispatch: Dispatch) -> None:
        self.parent = current()
        self.mode = mode
        self.live = live  # items started (or about to start at once) and not finished
        # Each item's calls not answered yet, by its key (0 to size - 1): a list, 8 bytes an item where a
        # dict was 52; `waiting` counts the items with any.
        self.outstanding = [0] * size
        self.waiting = 0
        self.pending: list[Call] = []
        self.dispatch = dispatch
        self.timeout = settings().round_timeout  # 0: wait for every live item, however long
        self._loop = asyncio.get_running_loop()
        self._progress = 0.0  # loop time of the last call taken, item finished or answer
        self._timer: asyncio.TimerHandle | None = None

    def admit(self) -> None:
        self.live += 1

    def start(self, key: int, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run one item as a task whose calls join this round (a done callback must call `finished`)."""
        # The task copies the context it is created in: the item's own, with no wrapping coroutine.
        round_token, item_token = _round.set(self), _item.set(key)
        try:
            # One name for all (asyncio's own, "Task-<n>", is a string made for each: 58 bytes an item).
            return self._loop.create_task(work, name="pocketbatch item")
        finally:
            _item.reset(item_token)
            _round.reset(round_token)

    def finished(self, key: int) -> None:
        self.live -= 1
        if self.outstanding[key]:
            self.outstanding[key] = 0
            self.waiting -= 1
        self._progressed()
        self._flush_if_ready()

    def submit(self, key: int, provider: Provider, request: LLMRequest, mode: str | None = None) -> Call:
        """Hold one of the item's calls in the round; its future is the answer. `mode` overrides the
        round's (schema re-asks go "concurrent" while still counting as the item's outstanding call).
        Cancelling the call (as the task of a cancelled item does) takes it out of the counts."""
        call = Call(provider, request, mode or self.mode, self._loop)
        self.take(key, [call])
        return call

    def take(self, key: int, calls: list[Call]) -> None:
        """Count calls as the item's outstanding ones and hold them until the round is ready."""
        if not self.outstanding[key]:
            self.waiting += 1
        self.outstanding[key] += len(calls)
        for call in calls:
            call.held_by(self, key)
            if call.mode is None:
                call.mode = self.mode
        self.pending.extend(calls)
        self._progressed()
        self._flush_if_ready()

    def answered(self, key: int) -> None:
        left = self.outstanding[key]
        if left:  # not when the item finished first (it was cancelled)
            self.outstanding[key] = left - 1
            if left == 1:
                self.waiting -= 1
        self._progressed()

    def _progressed(self) -> None:
        if self.timeout:
            self._progress = self._loop.time()

    def _flush_if_ready(self) -> None:
        if not self.pending:
            return
        if self.waiting < self.live:
            if self.timeout and self._timer is None:
                self._timer = self._loop.call_later(self.timeout, self._timed_out)
            return
        self._flush()

    def _timed_out(self) -> None:
        """One timer per round, re-armed for what is left while the round keeps making progress."""
        self._timer = None
        if not self.pending or self.waiting >= self.live:
            return
        left = self._progress + self.timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._timed_out)
            return
        missing = self.live - self.waiting
        note = (
            f"round flushed after POCKETBATCH_ROUND_TIMEOUT={self.timeout:g}s without progress: "
            f"{missing:,} of its {self.live:,} live items had not reached it (items waiting on each other?)"
        )
        for call in self.pending:
            call.note = call.note or note
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A call cancelled while held (its item was cancelled before the round was ready) goes nowhere: a
        # batch job would pay for an answer nobody awaits.
        calls, self.pending = [call for call in self.pending if not call.done()], []
        if not calls:
            return
        if self.parent is not None:
            parent, key = self.parent
            parent.take(key, calls)
        else:
            self.dispatch(calls)


def current() -> tuple[Round, int] | None:
    """(round, item key) of the item the running task belongs to; None outside parallel nodes."""
    round_ = _round.get()
    return None if round_ is None else (round_, _item.get())


def outside_rounds() -> contextvars.Context:
    """A copy of the running context without its round, for a call that must not join it."""
    context = contextvars.copy_context()
    context.run(_round.set, None)
    return context


def dispatch(calls: list[Call]) -> None:
    """Send a flushed round on its way: one task per (provider, model, mode) group."""
    groups: dict[tuple[str, str, str | None], list[Call]] = {}
    for call in calls:
        groups.setdefault((call.provider.name, call.request.model, call.mode), []).append(call)
    for group in groups.values():
        _Work(group)


async def _run_group(group: list[Call]) -> None:
    try:
        await _decide_and_run(group)
    except Exception as e:  # a ConfigError before any call, or a bug: every item still gets its answer
        for call in group:
            if call is not None:  # None: taken by a worker, which answers it
                call.settle(e)


async def _decide_and_run(group: list[Call]) -> None:
    from . import batch, events, strategy  # they import this module

    provider, requests = group[0].provider, [c.request for c in group]
    limiter = limiter_for(provider, requests[0].model)
    # The group's tokens counted once, for both the time and the cost (a group may hold 100,000 requests).
    tokens = strategy.group_tokens(requests, limiter.typical_output_tokens)
    decision = strategy.choose(
        requests,
        provider,
        settings(),
        concurrent_seconds=limiter.seconds_for(len(group), limiter.tokens_for(*tokens)),
        mode=group[0].mode,
        tokens=tokens,
    )
    notes = dict.fromkeys(c.note for c in group if c.note)
    if notes:
        decision = replace(decision, reason="; ".join([decision.reason, *notes]))
    if provider.batch and (
        decision.mode == "batch" or batch.may_know_rounds(provider.name, requests[0].model)
    ):
        # Hashing every request is only worth it for the batch path or a journal that may know the round.
        batch_round = batch.BatchRound.of(provider, group)
        if decision.mode == "batch" or batch_round.known():
            # The batch round answers every call from here, whatever happens (batch.run). Let go of the
            # group, so that a call answered for good is freed with its request while the rest wait.
            del requests
            group.clear()
            await batch.run(batch_round, decision)
            return
    events.emit(events.DECIDED, provider.name, requests[0].model, decision=decision)
    asked_for_batch = (group[0].mode or settings().mode) == "batch"
    log.log(logging.WARNING if asked_for_batch else logging.INFO, "%s", decision.reason)
    del requests  # the workers let go of each call once taken (_concurrently)
    await _concurrently(provider, group, limiter)


async def _concurrently(provider: Provider, group: list[Call], limiter) -> None:
    """The group's calls through a pool of workers, not a task each: at 100,000 calls that is the
    difference between a few MB and a few GB. The limiter, not the pool, sets the pace; the pool may grow
    to what the rate it allows needs at up to 10 s a call (Little's law), at most MAX_WORKERS: an
    unlimited rate would otherwise start a task for every call, twice the round's memory at its peak.

    It starts with DEFAULT_WORKERS and grows by one worker for each call that took GROW_AFTER or more
    while the process was mostly waiting (on the network or the limiter): calls answered at once (a
    local server, the offline provider) keep the pool small, and the coroutines of a small pool stay in
    the CPU's caches (4,096 workers made each such call a tenth slower than 256)."""
    from . import concurrent

    rate_workers = int(min(limiter.rpm, MAX_WORKERS * 6) / 6)
    most = min(len(group), max(concurrent.DEFAULT_WORKERS, rate_workers))
    queue = iter(range(len(group)))
    sender = concurrent.Sender(provider, group[0].request.model)
    clock = asyncio.get_running_loop().time
    workers: list[asyncio.Future] = []
    look = [clock(), time.process_time(), True]  # loop and CPU time when the pool last looked; its answer

    async def worker() -> None:
        for at in queue:  # one shared iterator: each worker takes the next call
            # The group lets go of a call once it is taken: an answered item's call and request are freed
            # while the rest of the round is sent (under a rate limit, while its next calls wait).
            call, group[at] = group[at], None
            if call.done():  # its item was cancelled meanwhile
                continue
            began = clock()
            try:
                call.settle(await sender.send(call.request))
            except Exception as e:
                call.settle(e)
            if len(workers) < most and clock() - began >= GROW_AFTER and _waited(look):
                workers.append(asyncio.ensure_future(worker()))

    workers.extend(asyncio.ensure_future(worker()) for _ in range(min(most, concurrent.DEFAULT_WORKERS)))
    try:
        for task in workers:  # the list grows while it is walked: every worker is awaited
            await task
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


def _waited(look: list) -> bool:
    """Whether the process spent most of the time since the pool last looked waiting (on the network or
    the limiter), not computing. A slow call in a process that computes all the time waited in its own
    loop's queue, and one more worker would only lengthen the queue: at 20,000 calls answered at once,
    the pool grew to 3,000 workers that way, a third of a KiB an item. Looked at most every GROW_AFTER."""
    now, cpu = asyncio.get_running_loop().time(), time.process_time()
    if now - look[0] >= GROW_AFTER:
        look[:] = now, cpu, cpu - look[1] < BUSY * (now - look[0])
    return look[2]


_running: set[asyncio.Future] = set()  # strong references: the loop keeps only weak ones
# Groups whose every call was cancelled, while they stop (a batch round cancels its job at the provider).
_stopping: set[asyncio.Future] = set()


class _Work:
    """The task sending a group; cancelled when every call it answers was (the items awaiting it are
    gone). Calls count themselves out (Call.settle), not by a callback on each future: one callback
    a call was a fifth of a concurrent round's bookkeeping."""

    __slots__ = ("left", "task")

    def __init__(self, group: list[Call]) -> None:
        self.left = len(group)
        for call in group:
            call.work = self
        self.task = asyncio.ensure_future(_run_group(group))
        _running.add(self.task)
        self.task.add_done_callback(_running.discard)

    def cancelled_one(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.task.done():
            self.task.cancel()
            _stopping.add(self.task)
            self.task.add_done_callback(_stopping.discard)


async def _stopped() -> None:
    """Wait for the groups that items cancelled just now left with nobody awaiting them: the run ends
    once their batch job is cancelled at the provider, not while it still runs (and bills)."""
    loop = asyncio.get_running_loop()
    stopping = [task for task in _stopping if task.get_loop() is loop]
    if stopping:
        await asyncio.gather(*stopping, return_exceptions=True)


async def map_parallel(
    fn: Callable[[Any], Awaitable[Any]],
    items: Iterable[Any],
    limit: int | None = None,
    mode: str | None = None,
) -> list[Any]:
    """fn over items, all at once (or `limit` at a time), results in input order.

    The items' LLM calls form rounds (engine/collector.py). The first failure cancels the items still
    running and waits for them before it propagates.
    """
    items = list(items)
    # Unbounded, every item starts at once, so all count as live from the start; bounded, an item waiting
    # for a slot is not live, or the round would wait for it forever.
    round_ = Round(len(items), 0 if limit else len(items), mode, dispatch)
    results: list[Any] = [None] * len(items)
    running: dict[asyncio.Task[Any], int] = {}  # item task -> its index
    failures: list[BaseException] = []
    slots = asyncio.Semaphore(limit) if limit else None
    settled = asyncio.get_running_loop().create_future()  # the first failure, or the last item done
    # One context for every item's done callback, not a copy each (add_done_callback's default): the
    # callbacks read no context variable of their own, and a round they flush dispatches its calls
    # with this caller's event listeners.
    here = contextvars.copy_context()
    started = 0

    def finished(task: asyncio.Task[Any]) -> None:
        index = running.pop(task)
        round_.finished(index)
        if slots:
            slots.release()
        if not task.cancelled():
            if (exc := task.exception()) is not None:
                failures.append(exc)
            else:
                results[index] = task.result()
        if (failures or (not running and started == len(items))) and not settled.done():
            settled.set_result(None)

    try:
        with frozen_until_settled(0 if slots else len(items)) as freeze:
            # While unbounded items start and their state piles up (bounded, this loop lasts the whole run).
            with cyclic_gc_paused(0 if slots else len(items)):
                for index, item in enumerate(items):
                    if slots:
                        await slots.acquire()
                    elif index % 256 == 255:
                        await asyncio.sleep(0)  # let items that finish at once free their memory
                    if failures:
                        break
                    if slots:
                        round_.admit()
                    task = round_.start(index, fn(item))
                    running[task] = index
                    started += 1
                    task.add_done_callback(finished, context=here)
                freeze()  # before the collector is back: it would walk all the items once more
            if running and not failures:
                await settled
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
            await _stopped()
    if failures:
        raise failures[0]
    return results
