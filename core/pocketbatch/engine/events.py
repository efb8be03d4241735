"""Progress and accounting: the engine emits an Event per step of a call; listeners (a progress bar, a
Summary) subscribe with `listen(callback)` for the code that runs inside the `with` block.

Listeners live in a contextvar, so tasks started inside the block (worker pools, parallel nodes) report
to them and two runs in different tasks do not see each other's events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..providers import Usage

log = logging.getLogger("pocketbatch")

# The kinds, in the order a call can go through them.
STARTED = "started"  # a call began (once per call, before its first attempt)
RATE_LIMITED = "rate_limited"  # an attempt was answered 429
RETRIED = "retried"  # an attempt failed retryably and another follows after `wait` seconds
DONE = "done"  # the call returned a response (usage and cost set)
FAILED = "failed"  # the call ended with an error (`error` set)
DECIDED = "decided"  # a round's calls to one model were sent concurrent or to the batch API (`decision`)
# Schema calls (structured.py): the answer just reported DONE did not validate and its item asks again
# (`error` holds the validation errors), or it ended the item with a SchemaError, RefusalError or
# TruncationError (`error`). Either way that DONE (whose `via` they repeat) no longer counts as an item
# answered; its tokens and cost still count.
REASKED = "reasked"
REJECTED = "rejected"
KINDS = (STARTED, RATE_LIMITED, RETRIED, DONE, FAILED, DECIDED, REASKED, REJECTED)


@dataclass(frozen=True)
class Event:
    kind: str
    provider: str
    model: str
    item: int | None = None  # the index in run_all's input; None for a single call
    attempt: int = 1
    usage: Usage | None = None
    cost_usd: float | None = None
    via: str | None = None  # "concurrent" or "batch", on done events
    error: BaseException | None = None
    wait: float | None = None  # seconds until the next attempt, on retried events
    decision: Any = None  # the strategy's Decision, on decided events
    time: float = field(default_factory=time.monotonic)


Listener = Callable[[Event], Any]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("pocketbatch_listeners", default=())


@contextmanager
def listen(callback: Listener) -> Iterator[Listener]:
    """Send every event emitted inside the block (and in tasks started inside it) to callback."""
    token = _listeners.set((*_listeners.get(), callback))
    try:
        yield callback
    finally:
        _listeners.reset(token)


def listening() -> bool:
    """Whether anyone listens here: a hot path asks once, instead of building each event's fields."""
    return bool(_listeners.get())


def emit(kind: str, provider: str, model: str, **fields: Any) -> None:
    """Tell the current listeners; a listener that raises is logged and never fails the call."""
    listeners = _listeners.get()
    if not listeners:
        return  # the common case costs one contextvar read
    event = Event(kind, provider, model, **fields)
    for callback in listeners:
        try:
            callback(event)
        except Exception:
            log.exception("pocketbatch event listener %r failed", callback)


@dataclass
class Summary:
    """Totals of one run, built from its events (use `summarize()`, or pass `summary.add` to listen)."""

    items: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0  # attempts answered 429
    reasks: int = 0  # answers asked again because they did not match their schema
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None  # None until some response had a known cost
    via: dict[str, int] = field(default_factory=dict)
    decisions: list[Any] = field(default_factory=list)  # every round's Decision, with its reason
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None

    def add(self, event: Event) -> None:
        kind = event.kind
        if kind == STARTED:
            self.items += 1
        elif kind == DONE:
            self.ok += 1
            if event.usage is not None:
                self.input_tokens += event.usage.input_tokens
                self.output_tokens += event.usage.output_tokens
            if event.cost_usd is not None:
                self.cost_usd = (self.cost_usd or 0.0) + event.cost_usd
            if event.via:
                self.via[event.via] = self.via.get(event.via, 0) + 1
        elif kind == FAILED:
            self.failed += 1
        elif kind == RETRIED:
            self.retries += 1
        elif kind == RATE_LIMITED:
            self.rate_limited += 1
        elif kind == DECIDED:
            self.decisions.append(event.decision)
        elif kind in (REASKED, REJECTED):  # the answer just counted as done did not end its item well
            self.ok -= 1
            if event.via and self.via.get(event.via):
                self.via[event.via] -= 1
                if not self.via[event.via]:
                    del self.via[event.via]
            if kind == REASKED:  # the re-ask's own started and done follow: the same item, still open
                self.reasks += 1
                self.items -= 1
            else:
                self.failed += 1

    __call__ = add

    @property
    def elapsed(self) -> float:
        """Seconds from the start of the run to its end (or to now, while it runs)."""
        return (self.ended_at if self.ended_at is not None else time.monotonic()) - self.started_at

    def __str__(self) -> str:
        via = ", ".join(f"{n:,} {v}" for v, n in sorted(self.via.items()))
        cost = "cost unknown" if self.cost_usd is None else f"${self.cost_usd:,.4f}"
        return (
            f"{self.items:,} items: {self.ok:,} ok, {self.failed:,} failed"
            + (f" ({via})" if via else "")
            + f"; {self.retries:,} retries, {self.rate_limited:,} × 429"
            + (f", {self.reasks:,} re-asks" if self.reasks else "")
            + f"; {self.input_tokens:,} input + {self.output_tokens:,} output tokens, {cost}"
            + f"; {self.elapsed:.1f} s"
        )


@contextmanager
def summarize() -> Iterator[Summary]:
    """Collect a Summary of every call made inside the block."""
    summary = Summary()
    try:
        with listen(summary.add):
            yield summary
    finally:
        summary.ended_at = time.monotonic()
