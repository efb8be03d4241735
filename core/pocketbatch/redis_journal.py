"""The journal in Redis (POCKETBATCH_JOURNAL=redis://...): the SQLite journal's rounds, jobs, outcomes and
leases, kept where every machine sees them, so a job submitted on one is re-attached from another.

The same interface as journal.Journal (journal.JournalStore); the same things kept: hashes, ids, states
and outcomes, never a key or a prompt. Every key carries one hash tag, so the journal lives on one Redis
Cluster slot and its multi-key writes stay atomic.
"""

from __future__ import annotations

import json
import time

from . import errors
from .errors import ConfigError
from .journal import OPEN_STATES, Job, Pruned, Submission, decode, encode, stale_lease
from .providers import LLMResponse

PREFIX = "pocketbatch:{journal}:"
ENDED = ("ended", "collected", "failed", "cancelled", "lost")

# KEYS: lease. ARGV: the value it must still have ("" for none), the new value. 1 when swapped.
SWAP = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: the value it must still have. Deletes it only then.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisJournal:
    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError as exc:
            raise ConfigError(
                "POCKETBATCH_JOURNAL is a Redis URL but redis-py is not installed: "
                "pip install 'pocketbatch[redis]'"
            ) from exc
        from .engine.shared_limits import safe_url

        self.url, self.path = url, safe_url(url)  # `path`: where the CLI says the journal is
        self.db = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=10, decode_responses=True
        )
        try:
            self.db.ping()
        except (redis.RedisError, OSError) as exc:
            raise ConfigError(f"POCKETBATCH_JOURNAL: Redis does not answer ({exc})") from exc

    def _job_key(self, job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    def add_job(
        self,
        job_id: str,
        round: str,
        provider: str,
        model: str,
        custom_ids: list[str],
        tag: str | None = None,
    ) -> None:
        """Record a job the provider accepted; with `tag`, its submission row goes in the same
        transaction (see journal.Journal.add_job)."""
        now = time.time()
        with self.db.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._job_key(job_id),
                mapping={
                    "job_id": job_id,
                    "round": round,
                    "provider": provider,
                    "model": model,
                    "custom_ids": json.dumps(custom_ids),
                    "state": "running",
                    "submitted_at": repr(now),
                },
            )
            pipe.zadd(f"{PREFIX}jobs", {job_id: now})
            pipe.zadd(f"{PREFIX}round-jobs:{round}", {job_id: now})
            pipe.sadd(f"{PREFIX}models", f"{provider}\0{model}")
            if tag is not None:
                pipe.hdel(f"{PREFIX}submissions:{round}", tag)
            pipe.execute()

    def start_submission(
        self, round: str, tag: str, provider: str, model: str, custom_ids: list[str]
    ) -> float:
        """The chunk's "submitting" row, written before the create call (see journal.Journal)."""
        key = f"{PREFIX}submissions:{round}"
        row = json.dumps({"custom_ids": custom_ids, "started_at": time.time()})
        with self.db.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, tag, row)  # an earlier row of the same chunk keeps its older time
            pipe.sadd(f"{PREFIX}models", f"{provider}\0{model}")
            pipe.hget(key, tag)
            *_, kept = pipe.execute()
        return float(json.loads(kept)["started_at"])

    def end_submission(self, round: str, tag: str) -> None:
        self.db.hdel(f"{PREFIX}submissions:{round}", tag)

    def submissions(self, round: str) -> list[Submission]:
        rows = {tag: json.loads(row) for tag, row in self.db.hgetall(f"{PREFIX}submissions:{round}").items()}
        found = [Submission(tag, row["custom_ids"], row["started_at"]) for tag, row in rows.items()]
        return sorted(found, key=lambda sub: sub.started_at)

    def touch(self, round: str, provider: str, model: str) -> None:
        self.db.zadd(f"{PREFIX}rounds", {round: time.time()})

    def set_state(self, job_id: str, state: str, counts: dict[str, int] | None = None) -> None:
        key = self._job_key(job_id)
        if not self.db.exists(key):
            return
        with self.db.pipeline(transaction=True) as pipe:
            pipe.hset(key, "state", state)
            if state in ENDED:
                pipe.hsetnx(key, "ended_at", repr(time.time()))
            if counts is not None:
                pipe.hset(key, "counts", json.dumps(counts))
            pipe.execute()

    def acquire(self, round: str, holder: str) -> bool:
        """Take the round's lease unless a live holder has it (see journal.Journal.acquire)."""
        key = f"{PREFIX}lease:{round}"
        while True:
            old = self.db.get(key) or ""
            if old:
                held_by, since = json.loads(old)
                if held_by != holder and not stale_lease(held_by, since):
                    return False
            if self.db.eval(SWAP, 1, key, old, json.dumps([holder, time.time()])):
                return True  # else someone else took or released it between the read and the swap

    def release(self, round: str, holder: str) -> None:
        key = f"{PREFIX}lease:{round}"
        old = self.db.get(key)
        if old and json.loads(old)[0] == holder:
            self.db.eval(RELEASE, 1, key, old)

    def knows(self, round: str) -> bool:
        keys = (f"{PREFIX}round-jobs:{round}", f"{PREFIX}outcomes:{round}", f"{PREFIX}submissions:{round}")
        return bool(self.db.exists(*keys))

    def has_jobs(self, provider: str, model: str) -> bool:
        return bool(self.db.sismember(f"{PREFIX}models", f"{provider}\0{model}"))

    def jobs(self, round: str | None = None) -> list[Job]:
        index = f"{PREFIX}jobs" if round is None else f"{PREFIX}round-jobs:{round}"
        ids = self.db.zrange(index, 0, -1)
        with self.db.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._job_key(job_id))
            rows = pipe.execute()
        return [_job(row) for row in rows if row]

    def job(self, job_id: str) -> Job | None:
        row = self.db.hgetall(self._job_key(job_id))
        return _job(row) if row else None

    def save_outcomes(
        self, round: str, outcomes: dict[str, LLMResponse | BaseException], job_id=None
    ) -> None:
        if outcomes:
            self.db.hset(
                f"{PREFIX}outcomes:{round}",
                mapping={cid: json.dumps(encode(o)) for cid, o in outcomes.items()},
            )

    def outcomes(self, round: str) -> dict[str, LLMResponse | errors.LLMError]:
        rows = self.db.hgetall(f"{PREFIX}outcomes:{round}")
        return {cid: decode(json.loads(text)) for cid, text in rows.items()}

    def prune(self, before: float, *, dry_run: bool = False) -> Pruned:
        """Delete the rounds last used before `before`, with their jobs and outcomes, under the SQLite
        journal's rules: never a round whose job may still run or deliver, with a submitting row, or
        with a live lease (a lease left by a dead run holds nothing). A dry run selects the same
        rounds, with the same function, and deletes nothing."""
        size_before = self.size()
        prunable, dead_leases, kept = self._select_prunable(before)
        jobs = sum(len(round_jobs) for _, round_jobs in prunable)
        outcomes = sum(self.db.hlen(f"{PREFIX}outcomes:{round}") for round, _ in prunable)
        records = sum(
            self.db.memory_usage(key) or 0
            for round, round_jobs in prunable
            for key in self._keys(round, round_jobs)
        )
        if not dry_run:
            for lease_key, lease in dead_leases:
                self.db.eval(RELEASE, 1, lease_key, lease)
            for round, round_jobs in prunable:
                with self.db.pipeline(transaction=True) as pipe:
                    for job in round_jobs:
                        pipe.zrem(f"{PREFIX}jobs", job.job_id)
                    keys = self._keys(round, round_jobs)
                    if keys:
                        pipe.delete(*keys)
                    pipe.zrem(f"{PREFIX}rounds", round)
                    pipe.execute()
        return Pruned(len(prunable), jobs, outcomes, kept, size_before, self.size(), records)

    def _select_prunable(
        self, before: float
    ) -> tuple[list[tuple[str, list[Job]]], list[tuple[str, str]], int]:
        """The rounds a prune deletes (with their jobs), the leases it clears (left by runs that died:
        they hold nothing, as in `acquire`) and how many old rounds it keeps. The one selection of
        both the dry run and the real prune, so that one says what the other does."""
        prunable: list[tuple[str, list[Job]]] = []
        dead_leases: list[tuple[str, str]] = []
        kept = 0
        for round in self.db.zrangebyscore(f"{PREFIX}rounds", "-inf", f"({before}"):
            round_jobs = self.jobs(round)
            last = max(
                [self.db.zscore(f"{PREFIX}rounds", round) or 0.0]
                + [j.ended_at or j.submitted_at for j in round_jobs]
            )
            if last >= before:
                continue
            lease_key = f"{PREFIX}lease:{round}"
            lease = self.db.get(lease_key)
            if lease and stale_lease(*json.loads(lease)):
                dead_leases.append((lease_key, lease))
                lease = None
            held = (
                any(j.state in (*OPEN_STATES, "ended") for j in round_jobs)
                or self.db.exists(f"{PREFIX}submissions:{round}")
                or lease is not None
            )
            if held:
                kept += 1
            else:
                prunable.append((round, round_jobs))
        return prunable, dead_leases, kept

    def _keys(self, round: str, round_jobs: list[Job]) -> list[str]:
        """The keys that hold a round's own records (its jobs, its job index, outcomes and lease)."""
        keys = [self._job_key(job.job_id) for job in round_jobs]
        keys += [f"{PREFIX}round-jobs:{round}", f"{PREFIX}outcomes:{round}", f"{PREFIX}lease:{round}"]
        return [key for key in keys if self.db.exists(key)]

    def size(self) -> int:
        """Bytes the journal's keys take in Redis (MEMORY USAGE of each)."""
        total = 0
        for key in self.db.scan_iter(match=f"{PREFIX}*", count=1000):
            total += self.db.memory_usage(key) or 0
        return total

    def close(self) -> None:
        self.db.close()


def _job(row: dict[str, str]) -> Job:
    return Job(
        row["job_id"],
        row["round"],
        row["provider"],
        row["model"],
        json.loads(row["custom_ids"]),
        row["state"],
        float(row["submitted_at"]),
        float(row["ended_at"]) if row.get("ended_at") else None,
        json.loads(row["counts"]) if row.get("counts") else None,
    )
