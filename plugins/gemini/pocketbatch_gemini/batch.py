"""Gemini Batch Mode: inline requests (or a JSONL file through the Files API), one job, half the price."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from google.genai import _common, types
from google.genai import batches as genai_batches
from google.genai import errors as genai_errors

from pocketbatch import BatchAPI, BatchError, BatchStatus, LLMRequest, LLMResponse, Usage
from pocketbatch.errors import LLMError, error_for_status

from .api import (
    SDK_ERRORS,
    finish_reason,
    generate_config,
    response_text,
    to_contents,
    translate_error,
    usage_of,
)

if TYPE_CHECKING:
    from . import GeminiProvider

logger = logging.getLogger("pocketbatch.gemini")

# json.dumps(line, ensure_ascii=False, separators=(",", ":")), its encoder made once (json.dumps makes one
# whenever it is given options)
_LINE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_STATES = {
    "JOB_STATE_UNSPECIFIED": "running",
    "JOB_STATE_QUEUED": "running",
    "JOB_STATE_PENDING": "running",
    "JOB_STATE_RUNNING": "running",
    "JOB_STATE_UPDATING": "running",
    "JOB_STATE_PAUSED": "running",
    "JOB_STATE_CANCELLING": "cancelling",
    "JOB_STATE_SUCCEEDED": "ended",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "ended",
    "JOB_STATE_CANCELLED": "ended",
    "JOB_STATE_EXPIRED": "ended",
}
# The Gemini API refuses a request body over 20 MB, so a batch's inline requests must stay under it;
# above it they go as a JSONL file. Counted in decimal megabytes, with room for the envelope.
INLINE_LIMIT = 19_000_000
DISPLAY_NAME = "pocketbatch"  # a job's display_name: this, or "pocketbatch <tag>" for a tagged job
# How much earlier than `since` a job found by `find` may say it was created: this machine's clock and
# Google's may disagree by this much.
CLOCK_MARGIN = 120.0


class GeminiBatch(BatchAPI):
    """`provider.batch` for Gemini: `models/{model}:batchGenerateContent`.

    Requests travel inline while their JSON is under INLINE_LIMIT, else as a JSONL file uploaded through
    the Files API (lines `{"key": custom_id, "request": {...}}`). Inline requests carry their custom_id
    in their `metadata`, so results map back by key whatever their order, as file lines do.
    `submit` raises `BatchError(status=400)` for a request that cannot go (naming its custom_id) and
    `BatchError(status=413)` when over `max_requests` or `max_bytes`. `status` raises `BatchError` for a
    `JOB_STATE_FAILED` job. A job that ended cancelled or expired returns what it finished; the engine
    runs the requests with no result again. The uploaded input file is deleted once results are read
    (Gemini deletes files after 48 hours anyway).
    """

    # Gemini documents no request count per job; this cap keeps one job's results a sane download.
    max_requests = 100_000
    # The Files API takes files up to 2 GB.
    max_bytes = 2_000_000_000
    price_factor = 0.5
    inline_limit = INLINE_LIMIT

    def __init__(self, provider: GeminiProvider) -> None:
        self.provider = provider
        self._input_files: dict[str, str] = {}  # job name -> uploaded input file name

    def lines(self, items: list[tuple[str, LLMRequest]]) -> list[dict[str, Any]]:
        """Each (custom_id, request) as a REST line `{"key", "request"}`; BatchError 400/413 if not."""
        if not items:
            raise BatchError("a Gemini batch needs at least one request", status=400)
        if len(items) > self.max_requests:
            raise BatchError(
                f"{len(items):,} requests are over pocketbatch's {self.max_requests:,} per Gemini batch",
                status=413,
            )
        api_client = self.provider.client()._api_client
        model = items[0][1].model
        seen: set[str] = set()
        out = []
        for custom_id, request in items:
            self.check_line(custom_id, request, seen, model, "a Gemini batch job runs one model")
            try:
                inlined = types.InlinedRequest(contents=to_contents(request), config=generate_config(request))
                # The SDK's own converter, so a file line is the body the SDK would send inline.
                wire = genai_batches._InlinedRequest_to_mldev(api_client, inlined)
                wire = _common.encode_unserializable_types(_common.convert_to_dict(wire))
            except Exception as e:  # pydantic's ValidationError, a ConfigError from the mapping
                raise BatchError(
                    f"custom_id {custom_id!r} cannot go in a Gemini batch: {e}", status=400
                ) from e
            out.append({"key": custom_id, "request": wire["request"]})
        return out

    def jsonl(self, items: list[tuple[str, LLMRequest]]) -> bytes:
        """The batch input file for (custom_id, request) pairs, checked against max_bytes."""
        data = b"".join(_LINE.encode(line).encode() + b"\n" for line in self.lines(items))
        if len(data) > self.max_bytes:
            raise BatchError(
                f"the batch file is {len(data):,} bytes, over Gemini's {self.max_bytes:,}", status=413
            )
        return data

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        """Start one job (inline requests, or a file above the inline limit); return the job's name."""
        return await self._submit(items, DISPLAY_NAME)

    async def submit_tagged(self, items: list[tuple[str, LLMRequest]], tag: str) -> str:
        """`submit`, with the tag in the job's display_name ("pocketbatch <tag>") for `find`."""
        return await self._submit(items, f"{DISPLAY_NAME} {tag}")

    async def find(self, tag: str, items: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """The job whose display_name carries the tag, among those created no earlier than `since` less
        CLOCK_MARGIN, walking every page of `batches.list` (Gemini documents no order for it); of
        several, the oldest (the one closest to the lost create call)."""
        wanted = f"{DISPLAY_NAME} {tag}"
        found: list[tuple[float, str]] = []
        try:
            config = types.ListBatchJobsConfig(page_size=100)
            pager = await self.provider.client().aio.batches.list(config=config)
            async for job in pager:
                if job.display_name != wanted or not job.name:
                    continue
                created = job.create_time.timestamp() if job.create_time else None
                if created is not None and created < since - CLOCK_MARGIN:
                    continue
                found.append((created or 0.0, job.name))
        except SDK_ERRORS as e:
            raise self.provider_error(e) from e
        return min(found)[1] if found else None

    async def _submit(self, items: list[tuple[str, LLMRequest]], display_name: str) -> str:
        data = self.jsonl(items)
        client = self.provider.client()
        model = items[0][1].model
        file_name = None
        if len(data) <= self.inline_limit:
            src: Any = [
                {
                    "contents": to_contents(request),
                    "config": generate_config(request),
                    "metadata": {"key": key},
                }
                for key, request in items
            ]
        else:
            try:
                uploaded = await client.aio.files.upload(
                    file=io.BytesIO(data),
                    config=types.UploadFileConfig(mime_type="application/jsonl", display_name="pocketbatch"),
                )
            except SDK_ERRORS as e:
                raise self._batch_error("uploading the batch file", e) from e
            file_name = src = uploaded.name
        try:
            job = await client.aio.batches.create(
                model=model, src=src, config=types.CreateBatchJobConfig(display_name=display_name)
            )
        except SDK_ERRORS as e:
            # Refused with an answer: no job holds the file. No answer (a transport error): a job may
            # hold it all the same, and `find` may follow that job, so the file stays (48 h at most).
            if isinstance(e, genai_errors.APIError):
                await self._delete(file_name)
            raise self._batch_error("creating the batch", e) from e
        assert job.name
        if file_name:
            self._input_files[job.name] = file_name
        return job.name

    async def status(self, job_id: str) -> BatchStatus:
        job = await self._get(job_id)
        state = _state_name(job)
        if state == "JOB_STATE_FAILED":
            await self._delete(self._input_files.pop(job_id, None))
            reason = f"{job.error.code}: {job.error.message}" if job.error else "Gemini gave no reason"
            raise BatchError(f"Gemini batch {job_id} failed: {reason}")
        inlined = (job.dest.inlined_responses if job.dest else None) or []
        counts = {}
        if inlined:
            errored = sum(1 for r in inlined if r.error)
            counts = {"succeeded": len(inlined) - errored, "errored": errored}
        return BatchStatus(state=_STATES.get(state, "running"), counts=counts, raw=job)

    async def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        """Every inline response or result-file line of the job, in the order Gemini gives them."""
        job = await self._get(job_id)
        dest = job.dest
        for n, inline in enumerate((dest.inlined_responses if dest else None) or []):
            key = (inline.metadata or {}).get("key")
            if key is None:
                logger.warning("Gemini batch %s: skipped inline response %d, which has no key", job_id, n)
                continue
            if inline.error is not None:
                yield key, self._line_error(job_id, key, inline.error.model_dump(exclude_none=True))
            elif inline.response is not None:
                yield key, self._response(inline.response)
        if dest is not None and dest.file_name:
            try:
                data = await self.provider.client().aio.files.download(file=dest.file_name)
            except SDK_ERRORS as e:
                raise self.provider_error(e) from e
            for raw in data.decode("utf-8", "replace").splitlines():
                if raw.strip():
                    result = self._file_line(job_id, raw)
                    if result is not None:
                        yield result
        if _STATES.get(_state_name(job)) == "ended":
            await self._delete(self._input_files.pop(job_id, None))

    async def cancel(self, job_id: str) -> None:
        try:
            await self.provider.client().aio.batches.cancel(name=job_id)
        except SDK_ERRORS as e:
            raise self.provider_error(e) from e

    def provider_error(self, e: Exception) -> LLMError:
        return translate_error(e)

    def _file_line(self, job_id: str, raw: str) -> tuple[str, LLMResponse | LLMError] | None:
        try:
            record = json.loads(raw)
            key = record["key"]
        except (ValueError, KeyError, TypeError):
            logger.warning("Gemini batch %s: skipped an unreadable result line: %.200s", job_id, raw)
            return None
        if record.get("error"):
            return key, self._line_error(job_id, key, record["error"])
        response = types.GenerateContentResponse._from_response(
            response=genai_batches._GenerateContentResponse_from_mldev(record.get("response") or {}),
            kwargs={},
        )
        return key, self._response(response)

    def _line_error(self, job_id: str, key: str, error: dict[str, Any]) -> LLMError:
        code = error.get("code")
        status = code if isinstance(code, int) else None
        text = f"request {key} in Gemini batch {job_id} failed" + (f" ({status})" if status else "")
        name = f"{error['status']}: " if error.get("status") else ""
        text += f": {name}{error.get('message') or 'no message'}"
        return error_for_status(status, text)

    def _response(self, response: Any) -> LLMResponse:
        return LLMResponse(
            response_text(response),
            finish_reason=finish_reason(response),
            usage=usage_of(response.usage_metadata) if response.usage_metadata else Usage(),
            model=response.model_version,
            provider=self.provider.name,
            via="batch",
            raw=response,
        )

    async def _get(self, job_id: str) -> Any:
        try:
            return await self.provider.client().aio.batches.get(name=job_id)
        except SDK_ERRORS as e:
            raise self.provider_error(e) from e

    async def _delete(self, file_name: str | None) -> None:
        if not file_name:
            return
        try:
            await self.provider.client().aio.files.delete(name=file_name)
        except SDK_ERRORS as e:  # a leftover file expires in 48 h: never fail on it
            logger.info("could not delete Gemini batch input file %s: %s", file_name, e)

    def _batch_error(self, doing: str, e: Exception) -> BatchError:
        err = self.provider_error(e)
        return BatchError(
            f"Gemini batch: {doing} failed: {err.message}",
            status=err.status,
            retry_after=err.retry_after,
            retryable=err.retryable,
        )


def _state_name(job: Any) -> str:
    state = job.state
    return getattr(state, "value", None) or str(state or "JOB_STATE_UNSPECIFIED")
