"""The offline provider: no key, deterministic replies, and a server's habits (latency, 429s, a batch API).

Tuned by POCKETBATCH_OFFLINE_LATENCY (seconds per call), POCKETBATCH_OFFLINE_SERVER_RPM (the simulated
server's limit; 0 for none), POCKETBATCH_OFFLINE_BATCH_SECONDS (how long a batch job runs),
POCKETBATCH_OFFLINE_FAIL_RATE (the share of calls and batch lines that fail retryably),
POCKETBATCH_OFFLINE_DOWNLOAD_SECONDS (how long reading a job's results takes) and
POCKETBATCH_OFFLINE_DIR (where batch jobs live, so they outlive the process as a real server's do).
A request's option `offline_error` ("request", "transient" or "expired") makes that one request fail;
"refusal" makes a schema request answer with a refusal.

Schema requests (LLMRequest.schema) are answered with a deterministic instance of the schema, cut at
max_tokens (about 4 characters a token) like a real truncated answer; POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE
is the share of them answered with a required field left out, decided by a hash of the request, so a
re-ask (a different request) may pass where its first answer failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import platformdirs

from pocketbatch.config import settings
from pocketbatch.errors import BatchError, ConfigError, LLMError, RateLimitError, RequestError, TransientError
from pocketbatch.hookspecs import hookimpl
from pocketbatch.providers import BatchAPI, BatchStatus, LLMRequest, LLMResponse, Provider, RateLimits, Usage
from pocketbatch.schema import example


@hookimpl
def register_providers(register):
    register(OfflineProvider(), aliases=OfflineProvider.models)


def _env_number(name: str, default: float) -> float:
    """One of the offline provider's numbers (above), read when the settings are: config.reload() reads it
    again, as for every pocketbatch variable (reading the environment on every call took a tenth of the
    provider's time)."""
    global _numbers_under
    current = settings()
    if _numbers_under is not current:
        _numbers.clear()
        _numbers_under = current
    value = _numbers.get(name)
    if value is None:
        value = _numbers[name] = _parse_number(name, os.environ.get(name, ""), default)
    return value


_numbers: dict[str, float] = {}
_numbers_under: object = None  # the settings the numbers in _numbers were read under


def _parse_number(name: str, raw: str, default: float) -> float:
    raw = raw.strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a number ≥ 0, not {raw!r}")
    return value


def reply(request: LLMRequest) -> tuple[str, Usage]:
    """The deterministic reply to a request, and what it "cost" in tokens (about 4 characters a token)."""
    if request.schema is not None:
        text, usage, _ = schema_reply(request)
        return text, usage
    messages = request.messages
    last = messages[-1]
    if last.get("role") != "user":
        last = next((m for m in reversed(messages) if m.get("role") == "user"), last)
    content = last.get("content", "")
    if not isinstance(content, str):  # content blocks
        content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    words = content.split(None, 12)  # the first twelve, and the rest in one piece if there is more
    digest = hashlib.sha256(_reply_key(request).encode()).digest()[:3].hex()  # hexdigest()[:6], made smaller
    text = f"[{request.model} {digest}] " + " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    prompt_chars = len(request.system or "") + sum(len(str(m.get("content", ""))) for m in messages)
    return text, Usage(max(1, -(-prompt_chars // 4)), max(1, -(-len(text) // 4)))


def _reply_key(request: LLMRequest) -> str:
    """json.dumps([system, messages]), what a reply's digest is of; a one-message prompt's written out,
    since json.dumps of the list took a third of the offline provider's time per call."""
    messages = request.messages
    if request.system is None and len(messages) == 1 and tuple(messages[0]) == ("role", "content"):
        role, content = messages[0]["role"], messages[0]["content"]
        if isinstance(role, str) and isinstance(content, str):
            return f'[null, [{{"role": {_json_str(role)}, "content": {_json_str(content)}}}]]'
    return json.dumps([request.system, messages])


_json_str = json.encoder.encode_basestring_ascii  # json.dumps of a str, as its default ensure_ascii does


def schema_reply(request: LLMRequest) -> tuple[str, Usage, str]:
    """The JSON answer to a schema request, its usage, and its finish reason ("stop", "length" when
    max_tokens cut it, "refusal" for offline_error="refusal")."""
    assert request.schema is not None
    digest = hashlib.sha256(json.dumps([request.system, request.messages]).encode()).hexdigest()
    prompt_chars = len(request.system or "") + sum(len(str(m.get("content", ""))) for m in request.messages)
    if request.options.get("offline_error") == "refusal":
        text, finish = "I can't help with that request.", "refusal"
    else:
        value = example(request.schema, seed=digest)
        rate = _env_number("POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE", 0)
        if rate > 1:
            raise ConfigError(f"POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE must be between 0 and 1, not {rate:g}")
        if isinstance(value, dict) and value and int(digest[:8], 16) / 16**8 < rate:
            value.pop(next(iter(value)))  # a required field left out: invalid, as a sloppy model's answer
        text, finish = json.dumps(value), "stop"
        if request.max_tokens is not None and len(text) > request.max_tokens * 4:
            text, finish = text[: request.max_tokens * 4], "length"
    usage = Usage(max(1, math.ceil(prompt_chars / 4)), max(1, math.ceil(len(text) / 4)))
    return text, usage, finish


def _request_failure(request: LLMRequest) -> LLMError | None:
    if request.max_tokens is not None and request.max_tokens < 1:
        return RequestError(f"offline: max_tokens must be at least 1, not {request.max_tokens}", status=400)
    kind = request.options.get("offline_error")
    if kind == "request":
        return RequestError("offline: this request was marked to fail (offline_error='request')", status=400)
    if kind == "transient":
        return TransientError("offline: simulated server error (offline_error='transient')", status=500)
    if kind is not None and kind not in ("expired", "refusal"):
        return RequestError(
            f"offline_error must be 'request', 'transient', 'expired' or 'refusal', not {kind!r}", status=400
        )
    return None


class _ServerLimit:
    """The simulated server's request limit: a token bucket that answers 429 with Retry-After when empty."""

    def __init__(self, rpm: float, burst: float = 5) -> None:
        self.rate, self.burst = rpm / 60, burst
        self.level, self.stamp = burst, time.monotonic()

    def admit(self) -> RateLimits:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        limits = RateLimits(
            limit_requests=round(self.rate * 60),
            remaining_requests=max(0, int(self.level) - 1),
            reset_requests=(self.burst - self.level) / self.rate,
        )
        if self.level < 1:
            wait = (1 - self.level) / self.rate
            raise RateLimitError(
                f"offline: rate limit of {self.rate * 60:g} requests per minute reached",
                status=429,
                retry_after=wait,
                rate_limits=limits,
            )
        self.level -= 1
        return limits


class OfflineProvider(Provider):
    name = "offline"
    key_env_var = None
    default_model = "offline-small"
    models = ("offline-small", "offline-large")
    supports_schema = True  # it answers LLMRequest.schema itself, as a structured-output API does
    rpm = 6000
    # Pretend prices, so the cost of each way shows in the demo; no money is spent offline.
    prices = {"offline-small": (0.15, 0.60), "offline-large": (2.50, 10.00)}

    def __init__(self) -> None:
        self.batch = OfflineBatch()
        self._limit: _ServerLimit | None = None

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        limits = None
        server_rpm = _env_number("POCKETBATCH_OFFLINE_SERVER_RPM", 0)
        if server_rpm:
            if self._limit is None or self._limit.rate != server_rpm / 60:
                self._limit = _ServerLimit(server_rpm)
            limits = self._limit.admit()  # rejected calls cost no latency, as a real 429 costs little
        await asyncio.sleep(_env_number("POCKETBATCH_OFFLINE_LATENCY", 0.05))
        failure = _request_failure(request)
        fail_rate = _env_number("POCKETBATCH_OFFLINE_FAIL_RATE", 0)
        if failure is None and fail_rate and random.random() < fail_rate:
            failure = TransientError("offline: simulated server error", status=500)
        if failure:
            raise failure
        return _response(request, via="concurrent", rate_limits=limits, price=self)


def _response(
    request: LLMRequest, *, via: str, rate_limits: RateLimits | None = None, price: Provider | None = None
) -> LLMResponse:
    """The response to a request; priced by `price` (the engine prices what a provider leaves unpriced,
    by copying the response: a tenth of this provider's time per call, when it does it itself)."""
    if request.schema is not None:
        text, usage, finish = schema_reply(request)
    else:
        (text, usage), finish = reply(request), "stop"
    return LLMResponse(
        text,
        usage=usage,
        model=request.model,
        provider=OfflineProvider.name,
        via=via,
        cost_usd=price.cost(request.model, usage) if price else None,
        rate_limits=rate_limits,
        finish_reason=finish,
    )


_FATES = ("succeeded", "errored", "expired", "canceled")
_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(LLMRequest))


class OfflineBatch(BatchAPI):
    """A simulated batch API: jobs are files that finish after POCKETBATCH_OFFLINE_BATCH_SECONDS.

    A job is two files, as a real batch API keeps its input file apart from the job: `<id>.jsonl`, one
    request a line (custom_id and request), and `<id>.json`, the job itself (created, seconds, fail
    rate, cancelled, tag, count), written last: a job exists once its `.json` does. Both are read line by
    line, never held whole: a million-item round is a hundred jobs, all read at once when they end."""

    max_requests = 10_000
    max_bytes = 50 * 1024 * 1024

    @staticmethod
    def folder() -> Path:
        path = os.environ.get("POCKETBATCH_OFFLINE_DIR", "").strip()
        folder = Path(path) if path else Path(platformdirs.user_cache_dir("pocketbatch")) / "offline-batches"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _path(self, job_id: str) -> Path:
        path = self.folder() / f"{job_id}.json"
        if not job_id.startswith("offline-batch-") or not path.exists():
            raise RequestError(f"offline: no batch job {job_id!r}", status=404)
        return path

    def _load(self, job_id: str) -> dict:
        path = self._path(job_id)
        job = json.loads(path.read_text())
        if "lines" in job:  # written before jobs had a .jsonl: its lines move there, once
            lines = job.pop("lines")
            (self.folder() / f"{job_id}.jsonl").write_text("".join(line + "\n" for line in lines))
            job["count"] = len(lines)
            path.write_text(json.dumps(job))
        return job

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        return self._create(items, None)

    async def submit_tagged(self, items: list[tuple[str, LLMRequest]], tag: str) -> str:
        return self._create(items, tag)

    async def find(self, tag: str, items: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """The job with this tag created since then (the offline API keeps tags, as OpenAI's metadata)."""
        for path in sorted(self.folder().glob("offline-batch-*.json")):
            job = json.loads(path.read_text())
            if job.get("tag") == tag and job["created"] >= since - 1:
                return job["id"]
        return None

    def _create(self, items: list[tuple[str, LLMRequest]], tag: str | None) -> str:
        if len({cid for cid, _ in items}) != len(items):
            raise BatchError("offline: custom_ids in one batch must be unique", status=400)
        job_id = f"offline-batch-{uuid.uuid4().hex[:12]}"
        folder = self.folder()
        size = 0
        with open(folder / f"{job_id}.jsonl.tmp", "w", encoding="utf-8") as file:
            for cid, req in items:
                # The fields as they are (plain JSON values): asdict() would deep-copy them, and vars()
                # would make each request's __dict__ for good, 64 bytes of every item still waiting.
                fields = {name: getattr(req, name) for name in _REQUEST_FIELDS}
                line = json.dumps({"custom_id": cid, "request": fields}) + "\n"
                size += len(line)
                file.write(line)
        if len(items) > self.max_requests or size > self.max_bytes:
            (folder / f"{job_id}.jsonl.tmp").unlink()
            raise BatchError(
                f"offline: a batch holds at most {self.max_requests} requests and {self.max_bytes} bytes; "
                f"this one has {len(items)} and {size}",
                status=413,
            )
        job = {
            "id": job_id,
            "created": time.time(),
            "seconds": _env_number("POCKETBATCH_OFFLINE_BATCH_SECONDS", 2.0),
            "fail_rate": _env_number("POCKETBATCH_OFFLINE_FAIL_RATE", 0),
            "cancelled": None,
            "tag": tag,
            "count": len(items),
        }
        (folder / f"{job_id}.jsonl.tmp").replace(folder / f"{job_id}.jsonl")
        tmp = folder / f"{job_id}.tmp"
        tmp.write_text(json.dumps(job))
        tmp.replace(folder / f"{job_id}.json")  # a crash never leaves half a job
        return job_id

    def _finished_at(self, job: dict) -> float:
        end = job["created"] + job["seconds"]
        return min(end, job["cancelled"]) if job["cancelled"] else end

    async def status(self, job_id: str) -> BatchStatus:
        job = self._load(job_id)
        total = job["count"]
        if time.time() < self._finished_at(job):
            return BatchStatus("running", {"processing": total}, raw={"id": job_id})
        fates, _, _ = self._outcomes(job)
        counts: dict[str, int] = {}
        for fate in fates:
            counts[_FATES[fate]] = counts.get(_FATES[fate], 0) + 1
        return BatchStatus("ended", counts, raw={"id": job_id})

    def _outcomes(self, job: dict) -> tuple[bytes, array, array]:
        """The fate of every line (an index into _FATES, by line number), where each line starts in the
        job's file, and the order results come back in (line numbers): a few bytes a line, where the
        decoded lines were a third of a KiB."""
        rng = random.Random(job["id"])  # the same job always ends the same way
        done_share = 1.0
        if job["cancelled"] and job["cancelled"] < job["created"] + job["seconds"]:
            done_share = max(0.0, (job["cancelled"] - job["created"]) / max(job["seconds"], 1e-9))
        fates, starts, at = bytearray(), array("Q"), 0
        with open(self.folder() / f"{job['id']}.jsonl", "rb") as file:
            for line in file:
                starts.append(at)
                at += len(line)
                request = json.loads(line)["request"]
                marked = request["options"].get("offline_error")
                roll = rng.random()
                if rng.random() >= done_share:
                    outcome = "canceled"
                elif marked == "expired":
                    outcome = "expired"
                elif _request_failure(LLMRequest(**request)) or roll < job["fail_rate"] / 2:
                    outcome = "errored"
                elif roll < job["fail_rate"]:
                    outcome = "expired"
                else:
                    outcome = "succeeded"
                fates.append(_FATES.index(outcome))
        order = array("L", range(len(fates)))
        rng.shuffle(order)  # real batch APIs return lines in any order
        return bytes(fates), starts, order

    async def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        job = self._load(job_id)
        if time.time() < self._finished_at(job):
            raise RequestError(f"offline: batch job {job_id} has not ended yet", status=409)
        await asyncio.sleep(_env_number("POCKETBATCH_OFFLINE_DOWNLOAD_SECONDS", 0))
        fates, starts, order = self._outcomes(job)
        for n, (index, line) in enumerate(self._read_back(job_id, starts, order), 1):
            if n % 256 == 0:
                await asyncio.sleep(0)  # a download takes turns with the program's other tasks
            item = json.loads(line)
            cid, request, fate = item["custom_id"], LLMRequest(**item["request"]), _FATES[fates[index]]
            if fate == "succeeded":
                yield cid, _response(request, via="batch")
            elif fate == "errored":
                failure = _request_failure(request)
                yield cid, failure or TransientError("offline: batch line failed", status=500)
            else:
                verb = "expired before it ran" if fate == "expired" else "was cancelled before it ran"
                yield cid, TransientError(f"offline: the batch request {verb}")

    def _read_back(self, job_id: str, starts: array, order: array) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of the job's request lines, in `order`; `starts`: where each begins."""
        with open(self.folder() / f"{job_id}.jsonl", "rb") as file:
            for index in order:
                file.seek(starts[index])
                yield index, file.readline()

    async def cancel(self, job_id: str) -> None:
        path = self._path(job_id)
        job = json.loads(path.read_text())
        if job["cancelled"] is None and time.time() < job["created"] + job["seconds"]:
            job["cancelled"] = time.time()
            path.write_text(json.dumps(job))
