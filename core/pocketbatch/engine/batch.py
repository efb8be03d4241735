"""The batch path: a round's calls to one model as provider batch jobs, with nothing lost on the way.

Split over the provider's limits, submit, write each job to the journal before waiting, poll with growing
intervals, map lines back by custom_id, and send what failed retryably, expired, was cancelled or never
came back through the concurrent path. A job the provider rejects or fails runs concurrently, with a
warning. A deadline cancels the job, keeps its partial results and finishes the rest concurrently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import random
import time
from array import array
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .. import journal as journals
from ..config import settings
from ..errors import BatchError, LLMError, TransientError
from ..providers import CachePrice, LLMRequest, LLMResponse, Provider, Usage, usd
from . import concurrent, events
from .collector import Call
from .gcpause import cyclic_gc_paused, frozen_until_settled
from .retry import with_retries
from .strategy import Decision

log = logging.getLogger("pocketbatch")


@dataclass
class CancelPolicy:
    """What cancelling the task that awaits a job does to it: "cancel" it at the provider, or "leave" it
    running for a later run to re-attach to. The CLI sets its own and changes it when Ctrl-C comes."""

    action: str = "cancel"


cancel_policy: ContextVar[CancelPolicy | None] = ContextVar("pocketbatch_cancel_policy", default=None)

MAX_POLL_INTERVAL = 60.0
SETTLE_EVERY = 1_000  # a job's lines answered before the items they answer get a turn to resume
ENVELOPE_BYTES = 200  # custom_id, method, url and JSON punctuation around each request body


def custom_ids(requests: list[LLMRequest]) -> list[str]:
    """Ids from each request's content (the same round gets the same ids in any order), unique per round."""
    return list(by_custom_id(map(_canonical, requests), requests))


V = TypeVar("V")


def by_custom_id(canonical: Iterable[str], values: Iterable[V]) -> dict[str, V]:
    """Each value by its custom id, `pb-<digest>-<n>`: the n-th request of the round with that content (the
    canonical JSON of the request it stands for). Counted only for contents seen twice; the others are
    told apart by the dict itself."""
    out: dict[str, V] = {}
    again: dict[str, int] = {}
    for text, value in zip(canonical, values, strict=True):
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        cid = f"pb-{digest}-0"
        if cid in out:
            n = again[digest] = again.get(digest, 0) + 1
            cid = f"pb-{digest}-{n}"
        out[cid] = value
    return out


def round_key(provider: Provider, model: str, ids: Iterable[str]) -> str:
    """The digest of `json.dumps([provider, model, sorted(ids)])`, fed in pieces: at 200,000 ids the JSON
    and its bytes were two strings of 6 MB at the batch path's peak of memory. (Custom ids need no JSON
    escaping; the journal knows rounds by this key, so it must not change.)"""
    digest = hashlib.sha256(f"[{json.dumps(provider.name)}, {json.dumps(model)}, [".encode())
    ordered = sorted(ids)
    for start in range(0, len(ordered), 4096):
        digest.update(", ".join(f'"{cid}"' for cid in ordered[start : start + 4096]).encode())
        if start + 4096 < len(ordered):
            digest.update(b", ")
    digest.update(b"]]")
    return digest.hexdigest()[:32]


def chunk_tag(round: str, ids: list[str]) -> str:
    """A chunk's tag: its round and its requests, 49 characters of [a-z0-9-] (kept on the job at the
    provider where the API allows, so the job can be found again without its id)."""
    digest = hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]
    return f"{round[:32]}-{digest}"


def _canonical(request: LLMRequest) -> str:
    """The JSON of `asdict(request)` with sorted keys: the ids the journal knows depend on it exactly.

    asdict deep-copies every message only for json.dumps to read it once; on a large round that copy
    was most of the batch path's client-side time. The fields go to json.dumps as they are, and a
    dataclass nested in them is expanded as asdict would have done.
    """
    fields = {name: getattr(request, name) for name in _field_names(type(request))}
    for name in _ADDED_FIELDS:  # left out at their default: older journals' ids stay valid
        if fields.get(name) is None:
            fields.pop(name, None)
    return _CANONICAL.encode(fields)


# LLMRequest fields added after journals were first written (the schema is part of the round key).
_ADDED_FIELDS = ("schema",)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _as_asdict_would(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


# json.dumps(fields, sort_keys=True, default=_as_asdict_would), with its encoder made once instead of once a
# request (json.dumps makes one whenever it is given options)
_CANONICAL = json.JSONEncoder(sort_keys=True, default=_as_asdict_would)


def may_know_rounds(provider: str, model: str) -> bool:
    """Whether the journal may hold an earlier run of a round to this model: it is on, reuse is not
    turned off, and some batch job of the model is recorded (one query, so a concurrent round hashes its
    requests only when there is something to find)."""
    journal = journals.journal()
    return settings().reuse and journal is not None and journal.has_jobs(provider, model)


def split_ids(provider: Provider, sized: Iterable[tuple[str, int]]) -> list[list[str]]:
    """Custom ids, with the length of each one's canonical JSON, split over max_requests and max_bytes by
    an estimate with a margin; submit checks the exact size."""
    api = provider.batch
    assert api is not None
    budget = api.max_bytes * 0.9
    out: list[list[str]] = []
    size = 0.0
    for cid, length in sized:
        estimate = length + ENVELOPE_BYTES
        if not out or len(out[-1]) >= api.max_requests or size + estimate > budget:
            out.append([])
            size = 0.0
        out[-1].append(cid)
        size += estimate
    return out


class _CannotTell(Exception):
    """`BatchAPI.find` found several jobs that could be a chunk's and could not tell which."""

    def __init__(self, error: BatchError) -> None:
        super().__init__(str(error))
        self.error = error


class BatchRound:
    """One group of calls (one provider, one model) on its way through batch jobs."""

    def __init__(
        self,
        provider: Provider,
        model: str,
        calls: dict[str, Call],
        key: str,
        sizes: array | None = None,
    ) -> None:
        self.provider, self.api, self.model = provider, provider.batch, model
        self.calls, self.key = calls, key  # by custom_id
        # The length of each call's canonical JSON, in the order of `calls`, for split_ids: in an array,
        # 4 bytes a call where a dict by custom id (with an int each) was 70.
        self.sizes = sizes
        # model -> (provider.price(model), provider.cache_price(model))
        self._prices: dict[str, tuple[tuple[float, float] | None, CachePrice | None]] = {}
        self.journal = journals.journal()
        self.settings = settings()

    @classmethod
    def of(cls, provider: Provider, calls: list[Call]) -> BatchRound:
        with cyclic_gc_paused(len(calls)):
            return cls._of(provider, calls)

    @classmethod
    def _of(cls, provider: Provider, calls: list[Call]) -> BatchRound:
        model = calls[0].request.model
        lengths = array("I")

        def canonical() -> Iterator[str]:
            # Measured and hashed as each is made, not held: at 200,000 requests the texts were a
            # quarter of a KiB each at the round's peak of memory.
            for call in calls:
                text = _canonical(call.request)
                lengths.append(len(text))
                yield text

        by_id = by_custom_id(canonical(), calls)
        return cls(provider, model, by_id, round_key(provider, model, by_id), lengths)

    def known(self) -> bool:
        """True when the journal has this round: it goes back to its jobs, whatever the choice says."""
        return self.journal is not None and self.settings.reuse and self.journal.knows(self.key)

    async def run(self, decision: Decision) -> None:
        # The collector paused while the jobs are made and sent, as while their results are read (_collect):
        # a line and its pieces for each call, and nothing to collect among them. What is left alive then
        # (the ids, the jobs' lists) stays until the round ends: frozen, not walked when the collector is
        # back (at 50,000 calls that walk was a twentieth of the batch path's time).
        with frozen_until_settled(len(self.calls)) as freeze:
            with cyclic_gc_paused(len(self.calls)):
                submitted, attached = await self._submit_all(decision)
                freeze()
            # Every job of the round is in the journal now: another run of it may go and re-attach.
            jobs = [(job.job_id, job.custom_ids, job.submitted_at) for job in attached]
            jobs += [job for done, _ in submitted for job in done]
            rejected = [cid for _, ids in submitted for cid in ids]
            await asyncio.gather(*(self._follow(*job) for job in jobs), self._concurrently(rejected))

    async def _submit_all(self, decision: Decision) -> tuple[list, list]:
        """(what each chunk's submission gave, the journal's jobs re-attached to)"""
        async with self._lease():
            if self.journal is not None:
                self.journal.touch(self.key, self.provider.name, self.model)
            reused, attached = self._from_journal()
            self._announce(decision, reused, attached)
            for cid, outcome in reused.items():
                self._settle(cid, outcome, record=False)
            taken = set(reused).union(*(job.custom_ids for job in attached))
            # Chunks an earlier run was submitting when it died (or lost the create call's answer): the
            # same chunks again, so that the provider is asked for their jobs before anything is sent.
            earlier = []
            for sub in self._submissions():
                if taken.isdisjoint(sub.custom_ids) and all(cid in self.calls for cid in sub.custom_ids):
                    earlier.append((sub.custom_ids, sub))
                    taken.update(sub.custom_ids)
                else:  # answered meanwhile, or not this round's requests any more
                    self.journal.end_submission(self.key, sub.tag)
            sizes = self.sizes or [len(_canonical(c.request)) for c in self.calls.values()]
            self.sizes = None  # read once, here
            fresh = ((cid, n) for cid, n in zip(self.calls, sizes, strict=True) if cid not in taken)
            planned = earlier + [(ids, None) for ids in split_ids(self.provider, fresh)]
            submitted = await asyncio.gather(*(self._submit(ids, sub) for ids, sub in planned))
        return submitted, attached

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[None]:
        """Hold the round's lease in the journal while deciding what to submit and submitting it."""
        if self.journal is None or not self.settings.reuse:
            yield
            return
        holder, waiting = journals.lease_holder(), False
        while not self.journal.acquire(self.key, holder):
            if not waiting:
                log.info("another run is submitting this round's batch jobs; waiting to re-attach to them")
                waiting = True
            await asyncio.sleep(self.settings.poll_interval)
        try:
            yield
        finally:
            self.journal.release(self.key, holder)

    def _announce(self, decision: Decision, reused: dict, attached: list) -> None:
        notes = []
        if decision.mode != "batch":
            notes.append("the journal has this round's batch jobs: going back to them, not paying twice")
        if reused:
            notes.append(f"reusing {len(reused):,} results from the journal")
        if attached:
            notes.append(f"re-attaching to {', '.join(job.job_id for job in attached)}")
        reason = "; ".join([decision.reason, *notes])
        events.emit(
            events.DECIDED,
            self.provider.name,
            self.model,
            decision=replace(decision, mode="batch", reason=reason),
        )
        log.info("%s", reason)

    def _from_journal(self):
        if self.journal is None or not self.settings.reuse:
            return {}, []
        reused = {cid: o for cid, o in self.journal.outcomes(self.key).items() if cid in self.calls}
        attached = [
            job
            for job in self.journal.jobs(self.key)
            if job.state in (*journals.OPEN_STATES, "ended") and not set(job.custom_ids) <= set(reused)
        ]
        return reused, attached

    def _submissions(self) -> list[journals.Submission]:
        if self.journal is None or not self.settings.reuse:
            return []
        return self.journal.submissions(self.key)

    async def _submit(
        self, ids: list[str], earlier: journals.Submission | None = None
    ) -> tuple[list[tuple[str, list[str], float]], list[str]]:
        """Submit a chunk (these calls) as one job (two halves when the provider says it is too large): the
        jobs submitted, as (job_id, custom_ids, submitted_at), and the ids of requests to run concurrently.

        No double submission: the chunk's "submitting" row is written before the create call and
        replaced by the job in one transaction after it. Before the create call is made again (a retry
        after a lost answer, or a re-run that finds the row of one that died), the provider is asked
        for a job with the chunk's tag or requests (`BatchAPI.find`)."""
        assert self.api is not None
        api = self.api
        # Paired with their requests only while the chunk is being submitted (a tuple each, 72 bytes).
        chunk = [(cid, self.calls[cid].request) for cid in ids]
        tag = chunk_tag(self.key, ids)
        since = earlier.started_at if earlier is not None else time.time()
        if self.journal is not None:
            since = self.journal.start_submission(self.key, tag, self.provider.name, self.model, ids)
        asked = earlier is not None  # a create call for this chunk may have reached the provider

        async def submit() -> str:
            nonlocal asked
            if asked:
                found = await self._find(tag, chunk, since)
                if found is not None:
                    log.info(
                        "found batch job %s at %s, submitted earlier for these %s requests but never "
                        "recorded: following it instead of submitting again",
                        found,
                        self.provider.name,
                        f"{len(ids):,}",
                    )
                    return found
            asked = True
            try:
                return await api.submit_tagged(chunk, tag)
            except BatchError as e:
                if e.status is None and e.retryable:  # no answer at all: the job may exist all the same
                    raise TransientError(f"{e} (no answer: looking for the job before trying again)") from e
                raise

        try:
            job_id = await with_retries(submit)
        except _CannotTell as e:
            self._cannot_tell(e.error, ids)
            return [], []
        except BatchError as e:
            # Refused with an answer (a status), or before anything was sent: no job was created.
            if self.journal is not None:
                self.journal.end_submission(self.key, tag)
            if e.status == 413 and len(ids) > 1:  # over the provider's exact limit: halve and try again
                half = len(ids) // 2
                (a, ra), (b, rb) = await asyncio.gather(self._submit(ids[:half]), self._submit(ids[half:]))
                return a + b, ra + rb
            log.warning(
                "batch job of %d requests was rejected (%s); running them concurrently", len(chunk), e
            )
            return [], ids
        except LLMError as e:
            # The last create call's answer may be what was lost: one more look before paying again.
            try:
                found = await self._find_quietly(tag, chunk, since) if asked else None
            except _CannotTell as cannot:
                self._cannot_tell(cannot.error, ids)
                return [], []
            if found is not None:
                if self.journal is not None:
                    self.journal.add_job(found, self.key, self.provider.name, self.model, ids, tag=tag)
                return [(found, ids, time.time())], []
            # Otherwise the row stays, so that the next run asks the provider for a job it may have
            # created after all (and re-attaches to it) before it submits these requests again.
            log.warning(
                "could not submit a batch job of %d requests (%s); running them concurrently", len(chunk), e
            )
            return [], ids
        if self.journal is not None:  # before any waiting: a crash from here on re-attaches, never re-submits
            self.journal.add_job(job_id, self.key, self.provider.name, self.model, ids, tag=tag)
        count = f"{len(ids):,} request{'s' if len(ids) != 1 else ''}"
        log.info("submitted batch job %s with %s to %s/%s", job_id, count, self.provider.name, self.model)
        return [(job_id, ids, time.time())], []

    async def _find(self, tag: str, chunk: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """`BatchAPI.find`; a BatchError from it (several jobs could be this chunk's) as _CannotTell."""
        assert self.api is not None
        try:
            return await self.api.find(tag, chunk, since)
        except BatchError as e:
            raise _CannotTell(e) from e

    def _cannot_tell(self, error: BatchError, ids: list[str]) -> None:
        """The provider has jobs that may be this chunk's and cannot tell which: following the wrong one
        or submitting again could pay twice, so the chunk's calls fail with the error that says what to
        check, and its "submitting" row stays for the run after the user has settled it."""
        log.error("%s", error)
        for cid in ids:
            self._settle(cid, error, record=False)

    async def _find_quietly(self, tag: str, chunk: list[tuple[str, LLMRequest]], since: float) -> str | None:
        try:
            return await self._find(tag, chunk, since)
        except LLMError as e:
            log.info("could not look for an unrecorded batch job at %s: %s", self.provider.name, e)
            return None

    async def _follow(self, job_id: str, ids: list[str], submitted_at: float) -> None:
        assert self.api is not None
        retry: list[str] = []
        try:
            status = await self._wait_ended(job_id, submitted_at)
            if status is None:  # the job failed at the provider: run its requests concurrently
                retry = [cid for cid in ids if cid in self.calls and not self.calls[cid].done()]
            else:
                self._state(job_id, "ended", status.counts)
                retry = await self._collect(job_id, ids)
                self._state(job_id, "collected")
        except asyncio.CancelledError:
            policy = cancel_policy.get()
            if policy is None or policy.action == "cancel":
                await asyncio.shield(self._cancel(job_id))
            raise
        await self._concurrently(retry)

    async def _wait_ended(self, job_id: str, submitted_at: float):
        interval = self.settings.poll_interval
        deadline = self.settings.batch_deadline
        cancelled = False
        while True:
            try:
                status = await self.api.status(job_id)
            except BatchError as e:
                log.warning("batch job %s failed (%s); running its requests concurrently", job_id, e)
                self._state(job_id, "failed")
                return None
            except LLMError as e:
                if e.status == 404 and not e.retryable:
                    # The provider no longer knows the job (deleted, or past its retention): waiting can
                    # never end, so its requests run concurrently and the journal stops pointing at it.
                    log.warning("batch job %s is gone (%s); running its requests concurrently", job_id, e)
                    self._state(job_id, "lost")
                    return None
                if not e.retryable:
                    raise
                log.info("polling batch job %s failed (%s); polling again", job_id, e)  # never "lost"
                status = None
            if status is not None and status.state == "ended":
                return status
            left = None if deadline is None else submitted_at + deadline - time.time()
            if left is not None and left <= 0 and not cancelled:
                log.warning(
                    "batch job %s passed POCKETBATCH_BATCH_DEADLINE=%gs: cancelling it, keeping its "
                    "results and finishing the rest concurrently",
                    job_id,
                    deadline,
                )
                await self._cancel(job_id)
                cancelled = True
            pause = interval * random.uniform(1.0, 1.1)
            await asyncio.sleep(pause if left is None or left <= 0 else min(pause, left))
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    async def _collect(self, job_id: str, ids: list[str]) -> list[str]:
        """Settle every line the job answered for good; return the ids to run again concurrently."""
        # The results stay alive until their items take them: once read, they are frozen with the round's
        # waiting items (or, outside a round, kept out of the young generations' walks).
        with frozen_until_settled(len(ids)) as freeze, cyclic_gc_paused():
            retry = await self._collect_lines(job_id, ids)
            freeze()
            return retry

    async def _collect_lines(self, job_id: str, ids: list[str]) -> list[str]:
        assert self.api is not None
        interval = self.settings.poll_interval
        final: dict[str, LLMResponse | BaseException] = {}  # the job's lines answered for good
        while True:
            try:
                await self._settle_lines(job_id, final)
                break
            except LLMError as e:  # read again: the lines settled so far are skipped
                if not e.retryable:
                    raise
                log.info("reading the results of batch job %s failed (%s); trying again", job_id, e)
                await asyncio.sleep(interval)
                interval = min(interval * 1.5, MAX_POLL_INTERVAL)
        # One transaction for the job: in transactions of a thousand, SQLite wrote each one's pages of the
        # outcomes' index (custom_ids are hashes, so every insert lands on a page of its own) again, and
        # the journal took twice as long. Until then a crash loses nothing: the job's id is journaled, and
        # the next run reads its lines again.
        if self.journal is not None and final:
            self.journal.save_outcomes(self.key, final, job_id)
        # Errored retryably, expired, cancelled or missing from the output.
        return [cid for cid in ids if cid not in final]

    async def _settle_lines(self, job_id: str, final: dict[str, LLMResponse | BaseException]) -> None:
        """Settle the job's final lines as they are read: the items they answer resume every SETTLE_EVERY
        lines, before more are read. A job of 50,000 lines held whole until it was settled, next to the
        50,000 items still waiting on it, was a batch round's peak of memory."""
        assert self.api is not None
        read, calls, told = 0, self.calls, events.listening()
        async for cid, outcome in self.api.results(job_id):
            call = calls.get(cid)
            if call is None:
                continue  # not this round's, or settled by an earlier read
            if isinstance(outcome, LLMResponse):
                outcome = final[cid] = self._priced(outcome)
            elif isinstance(outcome, LLMError) and not outcome.retryable:
                final[cid] = outcome
            else:
                continue
            if told:
                self._tell(outcome)
            call.settle(outcome)
            # The round forgets a call answered for good: its item has the answer, and the call with its
            # request (0.6 KiB) is freed for the results still to come, not kept until the round ends.
            del calls[cid]
            read += 1
            if read % SETTLE_EVERY == 0:
                await asyncio.sleep(0)

    def _priced(self, response: LLMResponse) -> LLMResponse:
        """The line's response as the round answers with it: via "batch", priced, its provider named.
        Filled in on the response the provider's results gave, not on a copy: one response less made
        and dropped for each of a job's lines (a provider that gives one response for several lines
        gets the same fields on it each time)."""
        if response.cost_usd is None:
            response.cost_usd = self._cost(response.model or self.model, response.usage)
        response.via = "batch"
        response.provider = response.provider or self.provider.name
        return response

    def _cost(self, model: str, usage: Usage) -> float | None:
        assert self.api is not None
        if type(self.provider).cost is not Provider.cost:  # the provider prices in its own way
            return self.provider.cost(model, usage, self.api.price_factor_for(self.model))
        # Provider.cost, with the price looked up once per model: matching a model against every price
        # key for each of a round's lines cost more than parsing the line did.
        if model not in self._prices:
            self._prices[model] = (self.provider.price(model), self.provider.cache_price(model))
        price, cache = self._prices[model]
        return usd(usage, price, self.api.price_factor_for(self.model), cache)

    async def _concurrently(self, ids: list[str]) -> None:
        async def one(cid: str) -> None:
            call = self.calls[cid]
            if call.done():
                return
            try:
                outcome: LLMResponse | BaseException = await concurrent.call(self.provider, call.request)
            except LLMError as e:
                outcome = e
            self._settle(cid, outcome, record=True)

        await asyncio.gather(*(one(cid) for cid in ids))

    def _settle(self, cid: str, outcome: LLMResponse | BaseException, *, record: bool) -> None:
        if record and self.journal is not None:
            self.journal.save_outcomes(self.key, {cid: outcome})
        if not record:  # concurrent.call already told the listeners about its own calls
            self._tell(outcome)
        self.calls[cid].settle(outcome)

    def _tell(self, outcome: LLMResponse | BaseException) -> None:
        """The events of a call answered without concurrent.call (by a job, or by the journal)."""
        name, model = self.provider.name, self.model
        events.emit(events.STARTED, name, model)
        if isinstance(outcome, LLMResponse):
            usage, cost = outcome.usage, outcome.cost_usd
            events.emit(events.DONE, name, model, usage=usage, cost_usd=cost, via=outcome.via)
        else:
            events.emit(events.FAILED, name, model, error=outcome)

    async def _cancel(self, job_id: str) -> None:
        assert self.api is not None
        try:
            await self.api.cancel(job_id)
            self._state(job_id, "cancelling")
        except LLMError as e:
            log.warning("could not cancel batch job %s: %s", job_id, e)

    def _state(self, job_id: str, state: str, counts: dict[str, int] | None = None) -> None:
        if self.journal is not None:
            self.journal.set_state(job_id, state, counts)


async def follow(job: journals.Job) -> dict[str, int]:
    """Wait for a journaled job with no one awaiting its calls (`pocketbatch batches resume`), and keep
    its final outcomes in the journal, where the next run of the same round finds them."""
    from ..registry import get_provider

    provider = get_provider(job.provider)
    nobody = LLMRequest(messages=[], model=job.model)  # the journal keeps no prompts; none is needed here
    calls = {cid: Call(provider, nobody, None) for cid in job.custom_ids}
    batch_round = BatchRound(provider, job.model, calls, job.round)
    status = await batch_round._wait_ended(job.job_id, job.submitted_at)
    if status is None:
        return {"failed": len(calls)}
    batch_round._state(job.job_id, "ended", status.counts)
    left = await batch_round._collect(job.job_id, job.custom_ids)
    batch_round._state(job.job_id, "collected")
    return {**status.counts, "to_rerun": len(left)}


async def run(batch_round: BatchRound, decision: Decision) -> None:
    """Every call ends settled: by a batch job, a concurrent retry, or with its own error."""
    try:
        await batch_round.run(decision)
    except BaseException as e:
        failure = e if isinstance(e, Exception) else asyncio.CancelledError()
        for call in batch_round.calls.values():  # nothing is left waiting forever, whatever went wrong
            call.settle(failure)
        if not isinstance(e, Exception):
            raise
