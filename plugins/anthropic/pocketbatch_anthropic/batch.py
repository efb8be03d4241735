"""The Message Batches API as a pocketbatch BatchAPI: one job for up to 100,000 requests at half price."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2

from pocketbatch import BatchAPI, BatchError, BatchStatus, LLMError, LLMRequest, LLMResponse, TransientError

from .api import InvalidRequest, build_params, dumps, error_for_type, to_response, translate_error

if TYPE_CHECKING:
    from . import AnthropicProvider

logger = logging.getLogger("pocketbatch.anthropic")

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
STATES = {"in_progress": "running", "canceling": "cancelling", "ended": "ended"}
COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")
# `find` looks at batches created this many seconds before the engine's clock said it started submitting
# (the API's clock and this machine's may differ a little; a wider margin risks a same-sized stranger).
CLOCK_MARGIN = 120.0

# The body is {"requests":[r1,r2,...]}: its size is the requests' sizes plus this frame and the commas.
_FRAME = len(b'{"requests":[') + len(b"]}")


class AnthropicBatch(BatchAPI):
    """`client.messages.batches` for an AnthropicProvider.

    Limits are Anthropic's: 100,000 requests or 256 MB (taken as 256,000,000 bytes, the stricter reading)
    per batch, whichever comes first. Set `max_requests` / `max_bytes` on the instance to go lower.
    """

    max_requests: int = 100_000
    max_bytes: int = 256_000_000
    price_factor: float = 0.5

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        """Create one Message Batch for (custom_id, request) pairs and return its id.

        Everything is checked before anything is sent. Status codes on the BatchError follow one
        convention, which the engine relies on:
        - 400: a request is invalid (bad or duplicate custom_id, empty messages, max_tokens < 1, params
          that are not JSON); the message names the custom_id and what is wrong. Splitting cannot help.
        - 413: the batch is over `max_requests` or `max_bytes` (the exact size of the JSON body the SDK
          sends), or the API answered 413; the engine halves the chunk and submits each half.
        - otherwise the API's own status, with `retryable` as the API said (429, 5xx: try again later).
        """
        if not items:
            raise BatchError("a Message Batch needs at least one request", status=400)
        if len(items) > self.max_requests:
            raise BatchError(
                f"{len(items)} requests are over the Message Batches limit of {self.max_requests}",
                status=413,
            )
        requests: list[dict[str, Any]] = []
        seen: set[str] = set()
        size = _FRAME + len(items) - 1
        for custom_id, request in items:
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                raise BatchError(f"custom_id {custom_id!r} must match ^[a-zA-Z0-9_-]{{1,64}}$", status=400)
            if custom_id in seen:
                raise BatchError(f"custom_id {custom_id!r} is used twice in one batch", status=400)
            seen.add(custom_id)
            try:
                params = build_params(request)
            except InvalidRequest as e:
                raise BatchError(f"request {custom_id!r} is invalid: {e}", status=400) from None
            entry = {"custom_id": custom_id, "params": params}
            try:
                size += len(dumps(entry))
            except (TypeError, ValueError) as e:
                raise BatchError(
                    f"request {custom_id!r} is invalid: its params are not JSON-serialisable ({e})",
                    status=400,
                ) from None
            requests.append(entry)
        if size > self.max_bytes:
            raise BatchError(
                f"the batch body is {size:,} bytes, over the Message Batches limit of {self.max_bytes:,}",
                status=413,
            )
        client = self.provider.client()
        try:
            batch = await client.messages.batches.create(requests=requests)
        except _sdk_errors() as e:
            raise _batch_error("anthropic refused the Message Batch", e) from e
        return batch.id

    async def find(self, tag: str, items: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """A Message Batch has no metadata to carry a tag, so a job is told by its requests: created no
        earlier than `since` less CLOCK_MARGIN, with as many requests as `items`; of an ended batch the
        custom_ids of its results must be exactly those of `items`. Of several running candidates, the
        oldest (the one closest to the lost create call) is taken."""
        client = self.provider.client()
        ids = {cid for cid, _ in items}
        running: list[str] = []
        try:
            async for batch in client.messages.batches.list(limit=100):  # newest first
                if batch.created_at.timestamp() < since - CLOCK_MARGIN:
                    break
                counts = batch.request_counts
                if sum(getattr(counts, name) for name in COUNTS) != len(ids):
                    continue
                if batch.processing_status != "ended":
                    running.append(batch.id)
                elif {cid async for cid, _ in self.results(batch.id)} == ids:
                    return batch.id
        except _sdk_errors() as e:
            raise _llm_error(e) from e
        return running[-1] if running else None

    async def status(self, job_id: str) -> BatchStatus:
        client = self.provider.client()
        try:
            batch = await client.messages.batches.retrieve(job_id)
        except _sdk_errors() as e:
            raise _llm_error(e) from e
        state = STATES.get(batch.processing_status)
        if state is None:
            # An unknown new state: polling on is safe, while calling the job lost would pay twice.
            logger.warning(
                "Message Batch %s has unknown processing_status %r", job_id, batch.processing_status
            )
            state = "running"
        counts = {name: getattr(batch.request_counts, name) for name in COUNTS}
        return BatchStatus(state=state, counts=counts, raw=batch)

    def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        return self._results(job_id)

    async def _results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        client = self.provider.client()
        try:
            lines = await client.messages.batches.results(job_id)
        except anthropic.APIError as e:
            raise translate_error(e) from e
        except anthropic.AnthropicError as e:
            # The SDK's own refusal when results_url is still null: the batch has not ended, poll again.
            raise TransientError(f"Message Batch {job_id} has no results yet: {e}") from e
        try:
            async for line in lines:
                yield line.custom_id, _result(line.result)
        except _sdk_errors() as e:
            raise _llm_error(e) from e

    async def cancel(self, job_id: str) -> None:
        client = self.provider.client()
        try:
            await client.messages.batches.cancel(job_id)
        except _sdk_errors() as e:
            raise _llm_error(e) from e


def _result(result: Any) -> LLMResponse | LLMError:
    kind = result.type
    if kind == "succeeded":
        return to_response(result.message, via="batch")
    if kind == "errored":
        error = getattr(result.error, "error", None)
        error_type = getattr(error, "type", None)
        detail = getattr(error, "message", None) or "no message"
        return error_for_type(error_type, f"anthropic batch request errored: {error_type}: {detail}")
    if kind == "expired":
        return TransientError(
            "the request expired: the Message Batch reached its 24 h limit before running it"
        )
    if kind == "canceled":
        return TransientError("the request was cancelled with its Message Batch before it ran")
    return TransientError(f"anthropic batch result of unknown type {kind!r}")


def _sdk_errors() -> tuple[type[Exception], ...]:
    """What the SDK raises: its own errors, and httpx2's when a streamed body breaks mid-read."""
    return (anthropic.AnthropicError, httpx2.HTTPError)


def _llm_error(exc: Exception) -> LLMError:
    if isinstance(exc, anthropic.AnthropicError):
        return translate_error(exc)
    return TransientError(f"lost the connection to anthropic: {exc}")


def _batch_error(prefix: str, exc: Exception) -> BatchError:
    error = _llm_error(exc)
    return BatchError(
        f"{prefix}: {error.message}",
        status=error.status,
        retry_after=error.retry_after,
        retryable=error.retryable,
        rate_limits=error.rate_limits,
    )
