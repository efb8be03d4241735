"""A SQLite record of batch rounds, jobs and outcomes, so a re-run re-attaches instead of paying twice.

A round is keyed by a content hash of its provider, model and requests. Each job is written down right
after the provider accepts it and before anyone waits on it; each request's final outcome is written once
known. Only hashes, ids, states and outcomes are kept: never a key, never a prompt.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import errors
from .config import settings
from .providers import LLMResponse, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    round TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    custom_ids TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    ended_at REAL,
    counts TEXT
);
CREATE INDEX IF NOT EXISTS jobs_round ON jobs (round);
CREATE TABLE IF NOT EXISTS leases (
    round TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    round TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    job_id TEXT,
    outcome TEXT NOT NULL,
    PRIMARY KEY (round, custom_id)
);
"""

OPEN_STATES = ("running", "cancelling")  # the provider may still deliver: re-attach


@dataclass
class Job:
    job_id: str
    round: str
    provider: str
    model: str
    custom_ids: list[str]
    state: str  # running | cancelling | ended (at the provider) | collected (results read) | failed | lost
    submitted_at: float
    ended_at: float | None
    counts: dict[str, int] | None


class JournalStore(Protocol):
    """What the engine and the CLI use of a journal: SQLite (`Journal`, the default) or Redis
    (`redis_journal.RedisJournal`, POCKETBATCH_JOURNAL=redis://...)."""

    def add_job(self, job_id: str, round: str, provider: str, model: str, custom_ids: list[str]) -> None: ...
    def set_state(self, job_id: str, state: str, counts: dict[str, int] | None = None) -> None: ...
    def acquire(self, round: str, holder: str) -> bool: ...
    def release(self, round: str, holder: str) -> None: ...
    def knows(self, round: str) -> bool: ...
    def has_jobs(self, provider: str, model: str) -> bool: ...
    def jobs(self, round: str | None = None) -> list[Job]: ...
    def job(self, job_id: str) -> Job | None: ...
    def save_outcomes(
        self, round: str, outcomes: dict[str, LLMResponse | BaseException], job_id=None
    ) -> None: ...
    def outcomes(self, round: str) -> dict[str, LLMResponse | errors.LLMError]: ...
    def close(self) -> None: ...


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers and several writing processes at once
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()  # one connection may serve the sync call_llm thread too

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(query, args).fetchall()

    def add_job(self, job_id: str, round: str, provider: str, model: str, custom_ids: list[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, 'running', ?, NULL, NULL)",
                (job_id, round, provider, model, json.dumps(custom_ids), time.time()),
            )

    def set_state(self, job_id: str, state: str, counts: dict[str, int] | None = None) -> None:
        ended = time.time() if state in ("ended", "collected", "failed", "cancelled", "lost") else None
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, ended_at = COALESCE(ended_at, ?), counts = COALESCE(?, counts)"
                " WHERE job_id = ?",
                (state, ended, json.dumps(counts) if counts is not None else None, job_id),
            )

    def acquire(self, round: str, holder: str) -> bool:
        """Take the round's lease (who may submit its jobs) unless a live holder has it: so two runs of
        the same round at once submit once, and the second re-attaches to the first one's jobs."""
        with self._tx() as db:
            row = db.execute("SELECT holder, since FROM leases WHERE round = ?", (round,)).fetchone()
            if row and row[0] != holder and not _stale(*row):
                return False
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (round, holder, time.time()))
            return True

    def release(self, round: str, holder: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE round = ? AND holder = ?", (round, holder))

    def knows(self, round: str) -> bool:
        """Whether any job or outcome of this round is recorded."""
        query = (
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE round = ?)"
            " OR EXISTS (SELECT 1 FROM outcomes WHERE round = ?)"
        )
        return bool(self._read(query, (round, round))[0][0])

    def has_jobs(self, provider: str, model: str) -> bool:
        """Whether any batch job to this provider's model is recorded."""
        query = "SELECT EXISTS (SELECT 1 FROM jobs WHERE provider = ? AND model = ?)"
        return bool(self._read(query, (provider, model))[0][0])

    def jobs(self, round: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", ()
        if round is not None:
            query, args = query + " WHERE round = ?", (round,)
        rows = self._read(query + " ORDER BY submitted_at", args)
        return [_job(row) for row in rows]

    def job(self, job_id: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def save_outcomes(
        self, round: str, outcomes: dict[str, LLMResponse | BaseException], job_id=None
    ) -> None:
        rows = [(round, cid, job_id, json.dumps(encode(o))) for cid, o in outcomes.items()]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?)", rows)

    def outcomes(self, round: str) -> dict[str, LLMResponse | errors.LLMError]:
        rows = self._read("SELECT custom_id, outcome FROM outcomes WHERE round = ?", (round,))
        return {cid: decode(json.loads(text)) for cid, text in rows}

    def close(self) -> None:
        self.db.close()


def lease_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _stale(holder: str, since: float) -> bool:
    """A lease whose process is gone (on this host), or older than an hour, no longer holds."""
    host, pid, _ = holder.split(":", 2)
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            pass
    return time.time() - since > 3600


stale_lease = _stale  # the Redis journal's leases follow the same rule


def _job(row: tuple) -> Job:
    job_id, round, provider, model, ids, state, submitted, ended, counts = row
    return Job(job_id, round, provider, model, json.loads(ids), state, submitted, ended,
               json.loads(counts) if counts else None)  # fmt: skip


def encode(outcome: LLMResponse | BaseException) -> dict[str, Any]:
    if isinstance(outcome, LLMResponse):
        return {
            "text": str(outcome),
            "usage": [outcome.usage.input_tokens, outcome.usage.output_tokens],
            "model": outcome.model,
            "provider": outcome.provider,
            "via": outcome.via,
            "cost_usd": outcome.cost_usd,
        }
    return {
        "error": type(outcome).__name__,
        "message": str(outcome),
        "status": getattr(outcome, "status", None),
        "retryable": getattr(outcome, "retryable", False),
    }


def decode(data: dict[str, Any]) -> LLMResponse | errors.LLMError:
    if "error" in data:
        cls = getattr(errors, data["error"], errors.LLMError)
        if not (isinstance(cls, type) and issubclass(cls, errors.LLMError)):
            cls = errors.LLMError
        return cls(data["message"], status=data["status"], retryable=data["retryable"])
    return LLMResponse(
        data["text"],
        usage=Usage(*data["usage"]),
        model=data["model"],
        provider=data["provider"],
        via=data["via"],
        cost_usd=data["cost_usd"],
    )


_open: dict[Path | str, JournalStore] = {}


def journal() -> JournalStore | None:
    """The journal at POCKETBATCH_JOURNAL (None when it is off), one connection per path per process."""
    url = settings().journal_url
    if url is not None:
        if url not in _open:
            from .redis_journal import RedisJournal

            _open[url] = RedisJournal(url)
        return _open[url]
    path = settings().journal
    if path is None:
        return None
    if path not in _open:
        _open[path] = Journal(path)
    return _open[path]
