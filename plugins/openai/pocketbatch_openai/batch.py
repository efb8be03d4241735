"""The OpenAI batch API: one JSONL file of chat completion requests, one job, half the price, 24 hours."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2
import openai

import pocketbatch_openai  # the package, still being imported (it imports this module): read at call time
from pocketbatch import BatchAPI, BatchError, BatchStatus, LLMRequest, LLMResponse
from pocketbatch.errors import LLMError, TransientError, error_for_status

if TYPE_CHECKING:
    from . import OpenAIProvider

logger = logging.getLogger("pocketbatch.openai")

# json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False), with its encoder made once
# instead of once a line (json.dumps makes one whenever it is given options)
_LINE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

ENDPOINT = "/v1/chat/completions"
METADATA_KEY = "pocketbatch"  # the batch metadata key holding the engine's tag (its round and chunk)
UPLOAD_PREFIX = "pocketbatch-"  # input files are named after the engine's tag: pocketbatch-<tag>.jsonl
CLOCK_MARGIN = 600.0  # seconds: batches created this long before the run's own clock said are looked at
_STATES = {
    "validating": "running",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "cancelling",
    "completed": "ended",
    "expired": "ended",
    "cancelled": "ended",
}
# A job that will deliver nothing more, told apart when `find` must choose between untagged jobs: one the
# user cancelled is, by that, not the job to follow.
_GIVEN_UP = ("cancelling", "cancelled", "failed")
_NOT_RUN = {
    "batch_expired": "expired: the batch's 24h window closed before it ran",
    "batch_cancelled": "was cancelled with its batch before it ran",
}


def upload_name(tag: str | None) -> str:
    """The name of a chunk's input file: its tag's, so that `find` can tell the file on servers whose
    jobs keep no metadata (Groq, Together); batch.jsonl for an untagged `submit`."""
    return f"{UPLOAD_PREFIX}{tag}.jsonl" if tag else "batch.jsonl"


@dataclass(frozen=True)
class Listed:
    """What `find` reads of a job in the server's list of jobs."""

    id: str
    created_at: float  # epoch seconds
    total: int  # requests in the job; 0 where not known yet (validating) or not reported (Together)
    input_file_id: str | None
    file_size: int | None = None  # the input file's bytes where the listing gives them (Together)
    status: str = "in_progress"  # in OpenAI's lower-case names


@dataclass
class Job:
    """What the batch path reads of a job, whatever shape the server gives it (Together's differs)."""

    status: str  # in OpenAI's lower-case names
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    raw: Any = None


class OpenAIBatch(BatchAPI):
    """`provider.batch` for OpenAI: `/v1/batches` over a `/v1/files` upload.

    Errors, by the pocketbatch convention: `submit` raises `BatchError(status=400)` for a request that
    cannot go in a batch file (the message names its custom_id), and `BatchError(status=413)` when the
    requests are more than `max_requests` or their exact JSONL size is over `max_bytes`; the engine
    halves a chunk on 413 and submits again. Upload or create failures are BatchErrors with the HTTP
    status (a server without `/v1/batches`, such as vLLM, gives 404): the engine then runs those
    requests concurrently. `status` raises `BatchError` for a `failed` job, with OpenAI's reasons.
    `status`, `results` and `cancel` raise the LLMError family for HTTP failures; a retryable one is a
    failed poll, and the engine polls again.

    Files: the input file is deleted once the job is over (after `results` has read everything, when
    `status` reports `failed`, or on `cancel`); output and error files are kept, so results can be read
    again (OpenAI deletes them after 30 days).
    """

    max_requests = 50_000
    # OpenAI says "200 MB"; counted in decimal megabytes so either reading of it is respected.
    max_bytes = 200_000_000
    price_factor = 0.5
    completion_window = "24h"
    label = "OpenAI"  # how messages name the server
    # Whether jobs carry the engine's tag in their `metadata` (and `find` looks for it): OpenAI keeps
    # a batch's metadata; hosts that may not (or whose jobs have another shape) leave it off.
    tags_jobs = True

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider
        # job id -> input file id; after a crash the job's own input_file_id (from retrieve) is used.
        self._input_files: dict[str, str] = {}

    def jsonl(self, items: list[tuple[str, LLMRequest]]) -> bytes:
        """The batch input file for (custom_id, request) pairs; BatchError 400/413 if it cannot go."""
        if not items:
            raise BatchError(f"a batch for {self.label} needs at least one request", status=400)
        if len(items) > self.max_requests:
            raise BatchError(
                f"{len(items):,} requests are over {self.label}'s {self.max_requests:,} per batch", status=413
            )
        lines: list[str] = []  # encoded once, joined: not 50,000 small encodes
        seen: set[str] = set()
        model = items[0][1].model
        for custom_id, request in items:
            self.check_line(custom_id, request, seen, model, "a batch file holds one model")
            if not request.messages or not all(isinstance(m, dict) and "role" in m for m in request.messages):
                raise BatchError(
                    f"custom_id {custom_id!r} has no chat messages (a non-empty list of "
                    '{"role", "content"} dicts)',
                    status=400,
                )
            body = self.provider.chat_body(request)
            line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
            try:
                text = _LINE.encode(line)
            except (TypeError, ValueError) as e:
                raise BatchError(f"custom_id {custom_id!r} cannot be sent as JSON: {e}", status=400) from e
            lines.append(text)
        lines.append("")  # the last line's newline
        data = "\n".join(lines).encode()
        size = len(data)
        if size > self.max_bytes:
            raise BatchError(
                f"the batch file is {size:,} bytes, over {self.label}'s {self.max_bytes:,}", status=413
            )
        return data

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        """Upload the requests as one JSONL file and start a job on it; return the batch id."""
        return await self._submit(items, None)

    async def submit_tagged(self, items: list[tuple[str, LLMRequest]], tag: str) -> str:
        """`submit`, with the tag in the input file's name (`pocketbatch-<tag>.jsonl`) and, where the
        server keeps metadata (`tags_jobs`), in the batch's `metadata` ({"pocketbatch": tag}), for
        `find`."""
        return await self._submit(items, tag)

    async def find(self, tag: str, items: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """The newest batch whose metadata carries the tag, among those created since `since` (less a
        margin for the two clocks), walking `GET /v1/batches` newest first. On a server that keeps no
        metadata, the job whose input file is named after the tag (`_find_by_requests`)."""
        if not self.tags_jobs:
            return await self._find_by_requests(tag, items, since)
        client = self.provider.client()
        try:
            async for batch in client.batches.list(limit=100):
                if (batch.metadata or {}).get(METADATA_KEY) == tag:
                    return batch.id
                if batch.created_at < since - CLOCK_MARGIN:
                    return None
        except openai.OpenAIError as e:
            raise self.provider.translate_error(e) from e
        return None

    async def _find_by_requests(
        self, tag: str, items: list[tuple[str, LLMRequest]], since: float
    ) -> str | None:
        """For a server that keeps no metadata (`tags_jobs` False), among the jobs created no earlier
        than `since` less CLOCK_MARGIN and reporting as many requests as `items` (where they report a
        count: a job still validating reports none):

        1. the job whose input file is named after the tag (`submit_tagged` names it so): the oldest if
           there are several, which all hold exactly these requests;
        2. else, of the jobs whose input file has another name (an upload by an earlier pocketbatch,
           which named every file batch.jsonl) or is gone, and whose file has exactly the size of these
           items' (the lines are built the same way every time), the one there is. A file named after
           another tag is another chunk's, never this one.
        Two or more of the second kind are not told apart by guessing: `BatchError`, naming them and
        what to check. Jobs cancelled or failed are left out of the second kind: cancelling the ones
        that are not this chunk's is how a user settles it."""
        count, size, name = len(items), len(self.jsonl(items)), upload_name(tag)
        client = self.provider.client()
        named: list[tuple[float, str]] = []
        alike: list[tuple[float, str]] = []
        try:
            async for job in self._recent_jobs(client, since - CLOCK_MARGIN):
                if job.total and job.total != count:
                    continue
                filename, file_size = await self._input_file(client, job.input_file_id)
                if filename == name:
                    named.append((job.created_at, job.id))
                    continue
                if (filename or "").startswith(UPLOAD_PREFIX) or job.status in _GIVEN_UP:
                    continue
                file_size = job.file_size if job.file_size is not None else file_size
                if file_size == size or (file_size is None and job.total == count):
                    alike.append((job.created_at, job.id))
        except openai.OpenAIError as e:
            raise self.provider.translate_error(e) from e
        if named:
            return min(named)[1]
        if len(alike) > 1:
            ids = ", ".join(job_id for _, job_id in sorted(alike))
            raise BatchError(
                f"{len(alike)} {self.label} batch jobs ({ids}) may hold the {count:,} requests of batch "
                f"chunk {tag}, whose create call got no answer: each was created since shortly before "
                f"that call, with an input file of the same size ({size:,} bytes) not named {name}. "
                "pocketbatch cannot tell which (if any) is this chunk's, so it neither follows one nor "
                "submits the requests again. "
                f"Check the jobs' input files at {self.label}: this chunk's holds custom_id {items[0][0]}. "
                "Cancel the jobs that are not this chunk's (to have the requests sent again, cancel them "
                "all), then run again."
            )
        return alike[0][1] if alike else None

    async def _input_file(
        self, client: openai.AsyncOpenAI, file_id: str | None
    ) -> tuple[str | None, int | None]:
        """(name, bytes) of a job's input file; (None, None) when it is gone (deleted) or unknown."""
        if not file_id:
            return None, None
        try:
            return await self._file_name_and_size(client, file_id)
        except openai.NotFoundError:
            return None, None

    async def _file_name_and_size(
        self, client: openai.AsyncOpenAI, file_id: str
    ) -> tuple[str | None, int | None]:
        file = await client.files.retrieve(file_id)
        return file.filename, file.bytes

    async def _recent_jobs(self, client: openai.AsyncOpenAI, after: float) -> AsyncIterator[Listed]:
        """The jobs created at or after `after` (epoch seconds), from `GET /batches` (newest first)."""
        async for batch in client.batches.list(limit=100):
            if batch.created_at < after:
                return
            counts = batch.request_counts
            total = counts.total if counts else 0
            yield Listed(batch.id, batch.created_at, total, batch.input_file_id, status=batch.status)

    async def _submit(self, items: list[tuple[str, LLMRequest]], tag: str | None) -> str:
        data = self.jsonl(items)
        metadata = {METADATA_KEY: tag} if tag and self.tags_jobs else None
        client = self.provider.client()
        try:
            file_id = await self._upload(client, data, upload_name(tag))
        except openai.OpenAIError as e:
            raise self._batch_error("uploading the batch file", e) from e
        try:
            if metadata:
                batch_id = await self._create(client, file_id, metadata=metadata)
            else:
                batch_id = await self._create(client, file_id)
        except openai.OpenAIError as e:
            # Refused with an answer: no job holds the file. No answer (a lost connection, a timeout):
            # a job may hold it all the same, and `find` may follow that job, so the file stays.
            if isinstance(e, openai.APIStatusError) or not isinstance(e, openai.APIConnectionError):
                await self._delete(file_id)
            raise self._batch_error("creating the batch", e) from e
        self._input_files[batch_id] = file_id
        return batch_id

    async def status(self, job_id: str) -> BatchStatus:
        job = await self._retrieve(job_id)
        status = BatchStatus(state=_STATES.get(job.status, "running"), counts=job.counts, raw=job.raw)
        if job.status == "failed":
            await self._delete(self._input_files.pop(job_id, job.input_file_id))
            raise BatchError(
                f"{self.label} batch {job_id} failed: "
                + ("; ".join(job.errors) or f"{self.label} gave no reason")
            )
        return status

    async def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        """Every line of the output file and of the error file (either may be missing), in any order."""
        job = await self._retrieve(job_id)
        client = self.provider.client()
        for file_id in (job.output_file_id, job.error_file_id):
            if not file_id:
                continue
            try:
                async with client.files.with_streaming_response.content(file_id) as response:
                    async for line in response.iter_lines():
                        if line.strip():
                            result = self._line(job_id, line)
                            if result is not None:
                                yield result
            except openai.OpenAIError as e:
                raise self.provider.translate_error(e) from e
            except httpx2.TransportError as e:  # the connection dropped mid-file
                raise TransientError(f"reading {self.label} batch {job_id}'s results: {e!r}") from e
        if _STATES.get(job.status) == "ended":  # a running job still reads its input file
            await self._delete(self._input_files.pop(job_id, job.input_file_id))

    async def cancel(self, job_id: str) -> None:
        try:
            input_file_id = await self._cancel(self.provider.client(), job_id)
        except openai.OpenAIError as e:
            raise self.provider.translate_error(e) from e
        await self._delete(self._input_files.pop(job_id, input_file_id))

    # The server's own shapes live in these: a host whose batch API differs (Together) overrides
    # them and the rest of the batch path stays as it is.

    async def _upload(self, client: openai.AsyncOpenAI, data: bytes, name: str) -> str:
        file = await client.files.create(file=(name, data), purpose="batch")
        return file.id

    async def _create(
        self, client: openai.AsyncOpenAI, file_id: str, metadata: dict[str, str] | None = None
    ) -> str:
        extra: dict[str, Any] = {"metadata": metadata} if metadata else {}
        batch = await client.batches.create(
            input_file_id=file_id, endpoint=ENDPOINT, completion_window=self.completion_window, **extra
        )
        return batch.id

    async def _job(self, client: openai.AsyncOpenAI, job_id: str) -> Job:
        batch = await client.batches.retrieve(job_id)
        counts = batch.request_counts
        return Job(
            status=batch.status,
            counts={"total": counts.total, "completed": counts.completed, "failed": counts.failed}
            if counts
            else {},
            errors=[
                f"line {e.line}: {e.code}: {e.message}" if e.line is not None else f"{e.code}: {e.message}"
                for e in (batch.errors.data or [] if batch.errors else [])
            ],
            input_file_id=batch.input_file_id,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            raw=batch,
        )

    async def _cancel(self, client: openai.AsyncOpenAI, job_id: str) -> str | None:
        """Ask the server to cancel; the job's input file id, to delete it."""
        batch = await client.batches.cancel(job_id)
        return batch.input_file_id

    def _line(self, job_id: str, line: str) -> tuple[str, LLMResponse | LLMError] | None:
        try:
            record = json.loads(line)
            custom_id = record["custom_id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s batch %s: skipped an unreadable result line: %.200s", self.label, job_id, line)
            return None
        response = record.get("response") or {}
        error = record.get("error") or {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            return custom_id, self._response(body)
        if not response and error.get("code") in _NOT_RUN:
            return custom_id, TransientError(
                f"request {custom_id} in {self.label} batch {job_id} {_NOT_RUN[error['code']]}"
            )
        detail = (body or {}).get("error") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, dict) else error
        message = detail.get("message") or f"no message (line: {line[:200]})"
        code = detail.get("code")
        text = f"request {custom_id} in {self.label} batch {job_id} failed" + (
            f" ({status})" if status else ""
        )
        text += f": {message}" + (f" [{code}]" if code else "")
        if status == 429 and code == "insufficient_quota":
            return custom_id, error_for_status(429, text, should_retry=False)
        return custom_id, error_for_status(status, text)

    def _response(self, body: dict[str, Any]) -> LLMResponse:
        choices = body.get("choices") or [{}]
        message = choices[0].get("message") or {}
        usage = body.get("usage") or {}
        return LLMResponse(
            message.get("content") or message.get("refusal") or "",
            finish_reason=pocketbatch_openai.finish_reason(choices[0].get("finish_reason"), message),
            usage=pocketbatch_openai.usage_of(usage),
            model=body.get("model"),
            provider=self.provider.name,
            via="batch",
            raw=body,
        )

    async def _retrieve(self, job_id: str) -> Job:
        try:
            return await self._job(self.provider.client(), job_id)
        except openai.OpenAIError as e:
            raise self.provider.translate_error(e) from e

    async def _delete(self, file_id: str | None) -> None:
        if not file_id:
            return
        try:
            await self.provider.client().files.delete(file_id)
        except openai.OpenAIError as e:  # a leftover file costs nothing but storage; never fail a job on it
            logger.info("could not delete %s batch input file %s: %s", self.label, file_id, e)

    def _batch_error(self, doing: str, e: openai.OpenAIError) -> BatchError:
        err = self.provider.translate_error(e)
        return BatchError(
            f"{self.label} batch: {doing} failed: {err.message}",
            status=err.status,
            retry_after=err.retry_after,
            retryable=err.retryable,
            rate_limits=err.rate_limits,
        )
