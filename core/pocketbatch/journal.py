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
CREATE TABLE IF NOT EXISTS submissions (
    round TEXT NOT NULL,
    tag TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    custom_ids TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (round, tag)
);
CREATE TABLE IF NOT EXISTS rounds (
    round TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    first_used REAL NOT NULL,
    last_used REAL NOT NULL
);
"""

# Journals written before the rounds table get one row per round they know, used "now": pruning then
# counts their age from the upgrade, never deleting what it cannot date.
BACKFILL_ROUNDS = """
INSERT OR IGNORE INTO rounds
    SELECT round, provider, model, MIN(submitted_at), MAX(COALESCE(ended_at, submitted_at)) FROM jobs
    GROUP BY round;
INSERT OR IGNORE INTO rounds
    SELECT DISTINCT round, '', '', CAST(strftime('%s', 'now') AS REAL), CAST(strftime('%s', 'now') AS REAL)
    FROM outcomes;
"""

OPEN_STATES = ("running", "cancelling")  # the provider may still deliver: re-attach
PRUNED = ("outcomes", "jobs", "leases", "rounds")  # the tables a pruned round's records are deleted from


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


@dataclass
class Submission:
    tag: str  # the chunk's tag, also kept on the job at the provider where its API allows
    custom_ids: list[str]
    started_at: float


class JournalStore(Protocol):
    """What the engine and the CLI use of a journal: SQLite (`Journal`, the default) or Redis
    (`redis_journal.RedisJournal`, POCKETBATCH_JOURNAL=redis://...)."""

    def add_job(
        self,
        job_id: str,
        round: str,
        provider: str,
        model: str,
        custom_ids: list[str],
        tag: str | None = None,
    ) -> None: ...
    def start_submission(
        self, round: str, tag: str, provider: str, model: str, custom_ids: list[str]
    ) -> float: ...
    def end_submission(self, round: str, tag: str) -> None: ...
    def submissions(self, round: str) -> list[Submission]: ...
    def touch(self, round: str, provider: str, model: str) -> None: ...
    def prune(self, before: float, *, dry_run: bool = False) -> Pruned: ...
    def size(self) -> int: ...
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
        fresh = not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'rounds'").fetchone()
        self.db.executescript(SCHEMA)
        if fresh:
            self.db.executescript(f"BEGIN IMMEDIATE; {BACKFILL_ROUNDS} COMMIT;")
        self.lock = threading.Lock()  # one connection may serve the sync call_llm thread too
        self._add_outcome_columns()

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

    def add_job(
        self,
        job_id: str,
        round: str,
        provider: str,
        model: str,
        custom_ids: list[str],
        tag: str | None = None,
    ) -> None:
        """Record a job the provider accepted; with `tag`, in the same transaction as its submission
        row goes away (the job is known by its id from now on)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, 'running', ?, NULL, NULL)",
                (job_id, round, provider, model, json.dumps(custom_ids), time.time()),
            )
            if tag is not None:
                db.execute("DELETE FROM submissions WHERE round = ? AND tag = ?", (round, tag))

    def start_submission(
        self, round: str, tag: str, provider: str, model: str, custom_ids: list[str]
    ) -> float:
        """Write down that these requests are about to be submitted as one job, before the create call:
        a run that finds the row and no job id asks the provider for the job before submitting again.
        Returns when it started (an earlier row of the same chunk keeps its older time)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO submissions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (round, tag) DO NOTHING",
                (round, tag, provider, model, json.dumps(custom_ids), now),
            )
            row = db.execute(
                "SELECT started_at FROM submissions WHERE round = ? AND tag = ?", (round, tag)
            ).fetchone()
        return row[0]

    def end_submission(self, round: str, tag: str) -> None:
        """The chunk was not submitted after all (rejected, or split in two): forget its row."""
        with self._tx() as db:
            db.execute("DELETE FROM submissions WHERE round = ? AND tag = ?", (round, tag))

    def submissions(self, round: str) -> list[Submission]:
        """Chunks of this round whose create call was made but whose job id was never written down."""
        rows = self._read(
            "SELECT tag, custom_ids, started_at FROM submissions WHERE round = ? ORDER BY started_at",
            (round,),
        )
        return [Submission(tag, json.loads(ids), started) for tag, ids, started in rows]

    def touch(self, round: str, provider: str, model: str) -> None:
        """Record that the round was used now (prune keeps rounds used recently)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (round) DO UPDATE SET last_used = excluded.last_used",
                (round, provider, model, now, now),
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
            " OR EXISTS (SELECT 1 FROM submissions WHERE round = ?)"
        )
        return bool(self._read(query, (round, round, round))[0][0])

    def has_jobs(self, provider: str, model: str) -> bool:
        """Whether any batch job to this provider's model is recorded (or was being submitted)."""
        query = (
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE provider = ? AND model = ?)"
            " OR EXISTS (SELECT 1 FROM submissions WHERE provider = ? AND model = ?)"
        )
        return bool(self._read(query, (provider, model, provider, model))[0][0])

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
        # Rows made as SQLite takes them, in columns: a JSON document for each of a 50,000-line job's
        # outcomes, all held until the insert, was the batch path's largest client-side cost.
        rows = (_outcome_row(round, cid, job_id, o) for cid, o in outcomes.items())
        with self._tx() as db:
            db.executemany(f"INSERT OR REPLACE INTO outcomes ({_OUTCOME_INSERT}) VALUES ({_PLACES})", rows)

    def outcomes(self, round: str) -> dict[str, LLMResponse | errors.LLMError]:
        rows = self._read(
            f"SELECT custom_id, outcome, {_OUTCOME_COLUMN_NAMES} FROM outcomes WHERE round = ?", (round,)
        )
        return {cid: decode(json.loads(text) if text else _outcome_data(*rest)) for cid, text, *rest in rows}

    def _add_outcome_columns(self) -> None:
        """Journals written before outcomes had columns get them; their rows keep their JSON."""
        with self._tx() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(outcomes)")}
            for name, kind in OUTCOME_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE outcomes ADD COLUMN {name} {kind}")

    def prune(self, before: float, *, dry_run: bool = False) -> Pruned:
        """Delete the rounds last used before `before` (epoch seconds), with their jobs and outcomes,
        then give the space back to the file system. Never a round with a job the provider may still
        run or deliver (running, cancelling, ended and not collected), a create call whose job id was
        never written down, or a run holding its lease. A dry run selects the same rounds, with the
        same function, and deletes nothing."""
        size_before = self.size()
        with self._tx() as db:
            dead_leases, kept = self._select_prunable(db, before)
            where = "WHERE round IN (SELECT round FROM prune_rounds)"
            rounds = db.execute("SELECT COUNT(*) FROM prune_rounds").fetchone()[0]
            jobs = db.execute(f"SELECT COUNT(*) FROM jobs {where}").fetchone()[0]
            outcomes = db.execute(f"SELECT COUNT(*) FROM outcomes {where}").fetchone()[0]
            records = sum(_record_bytes(db, table, where) for table in PRUNED)
            if not dry_run:
                db.executemany("DELETE FROM leases WHERE round = ? AND holder = ?", dead_leases)
                for table in PRUNED:
                    db.execute(f"DELETE FROM {table} {where}")
            db.execute("DELETE FROM prune_rounds")
        if not dry_run and rounds:
            with self.lock:
                self.db.execute("VACUUM")  # the freed pages go back to the file system
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return Pruned(rounds, jobs, outcomes, kept, size_before, self.size(), records)

    def _select_prunable(self, db: sqlite3.Connection, before: float) -> tuple[list[tuple[str, str]], int]:
        """Fill the temp table prune_rounds with the rounds a prune deletes; return the leases it clears
        (left by runs that died: they hold nothing, as in `acquire`) and how many old rounds it keeps.
        The one selection of both the dry run and the real prune, so that one says what the other does."""
        dead = [
            (r, holder) for r, holder, since in db.execute("SELECT * FROM leases") if _stale(holder, since)
        ]
        db.execute("CREATE TEMP TABLE IF NOT EXISTS dead_leases (round TEXT, holder TEXT)")
        db.execute("DELETE FROM dead_leases")
        db.executemany("INSERT INTO dead_leases VALUES (?, ?)", dead)
        states = ", ".join(f"'{state}'" for state in (*OPEN_STATES, "ended"))
        old = """MAX(r.last_used, COALESCE(
                (SELECT MAX(COALESCE(j.ended_at, j.submitted_at)) FROM jobs j WHERE j.round = r.round), 0
            )) < :before"""
        held = f"""(EXISTS (SELECT 1 FROM jobs j WHERE j.round = r.round AND j.state IN ({states}))
            OR EXISTS (SELECT 1 FROM submissions s WHERE s.round = r.round)
            OR EXISTS (SELECT 1 FROM leases l WHERE l.round = r.round AND NOT EXISTS (
                SELECT 1 FROM dead_leases d WHERE d.round = l.round AND d.holder = l.holder)))"""
        db.execute("CREATE TEMP TABLE IF NOT EXISTS prune_rounds (round TEXT PRIMARY KEY)")
        db.execute("DELETE FROM prune_rounds")
        db.execute(
            f"INSERT INTO prune_rounds SELECT r.round FROM rounds r WHERE {old} AND NOT {held}",
            {"before": before},
        )
        kept = db.execute(
            f"SELECT COUNT(*) FROM rounds r WHERE {old} AND {held}", {"before": before}
        ).fetchone()[0]
        db.execute("DELETE FROM dead_leases")
        return dead, kept

    def size(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def close(self) -> None:
        self.db.close()


@dataclass
class Pruned:
    rounds: int  # rounds deleted (or that would be, on a dry run)
    jobs: int
    outcomes: int
    kept: int  # rounds old enough that were kept: a job may still run or deliver, or a run holds them
    size_before: int  # bytes
    size_after: int
    # Bytes of the records deleted (or that would be): the same on a dry run and the real prune, where
    # the file's own shrinking (size_before - size_after) is only known once it has happened.
    records_bytes: int = 0


def _record_bytes(db: sqlite3.Connection, table: str, where: str) -> int:
    """Bytes of the rows of `table` that `where` selects: a number's 8, a text's own bytes."""
    columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    total = " + ".join(
        f"CASE typeof({c}) WHEN 'null' THEN 0 WHEN 'real' THEN 8 WHEN 'integer' THEN 8"
        f" ELSE LENGTH(CAST({c} AS BLOB)) END"
        for c in columns
    )
    return db.execute(f"SELECT COALESCE(SUM({total}), 0) FROM {table} {where}").fetchone()[0]


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
            "usage": _usage(outcome.usage),
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


def _usage(usage: Usage) -> list[int]:
    """[input, output], then the cache counts when there are any, then the 1-hour cache writes when
    there are any: Usage's fields in order, so older entries (two or four numbers) still read."""
    counts = [usage.input_tokens, usage.output_tokens]
    if usage.cache_read_tokens or usage.cache_write_tokens:
        counts += [usage.cache_read_tokens, usage.cache_write_tokens]
    if usage.cache_write_1h_tokens:
        counts += [usage.cache_write_1h_tokens]
    return counts


# An outcome's columns in the outcomes table. Its `outcome` column, the JSON of `encode`, is "" in rows
# written with columns; older rows have only the JSON.
OUTCOME_COLUMNS = (
    ("text", "TEXT"),  # the response's text, or the error's message
    ("usage", "TEXT"),  # the numbers of `_usage`, joined by commas
    ("model", "TEXT"),
    ("provider", "TEXT"),
    ("via", "TEXT"),
    ("cost_usd", "REAL"),
    ("error", "TEXT"),  # the error's class name; NULL for a response
    ("status", "INTEGER"),
    ("retryable", "INTEGER"),
)
_OUTCOME_COLUMN_NAMES = ", ".join(name for name, _ in OUTCOME_COLUMNS)
_OUTCOME_INSERT = f"round, custom_id, job_id, outcome, {_OUTCOME_COLUMN_NAMES}"
_PLACES = ", ".join("?" * (4 + len(OUTCOME_COLUMNS)))


def _outcome_row(round: str, cid: str, job_id: str | None, outcome: LLMResponse | BaseException) -> tuple:
    if isinstance(outcome, LLMResponse):
        usage = ",".join(map(str, _usage(outcome.usage)))
        return (round, cid, job_id, "", str(outcome), usage, outcome.model, outcome.provider, outcome.via,
                outcome.cost_usd, None, None, None)  # fmt: skip
    return (round, cid, job_id, "", str(outcome), None, None, None, None, None, type(outcome).__name__,
            getattr(outcome, "status", None), bool(getattr(outcome, "retryable", False)))  # fmt: skip


def _outcome_data(text, usage, model, provider, via, cost_usd, error, status, retryable) -> dict[str, Any]:
    """A row's columns as `encode` would have written them, for `decode`."""
    if error is not None:
        return {"error": error, "message": text, "status": status, "retryable": bool(retryable)}
    counts = [int(n) for n in usage.split(",")] if usage else []
    return {
        "text": text,
        "usage": counts,
        "model": model,
        "provider": provider,
        "via": via,
        "cost_usd": cost_usd,
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
