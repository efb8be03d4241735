"""Step 6 of docs/plugins.md: an optional batch API for the tutorial's reverse provider.

A real BatchAPI uploads the requests to the provider's batch endpoint and reads the results back from
its servers, so a job outlives the process and a re-run can re-attach to it. This one keeps its jobs in
memory (they end after `seconds`) and answers each line with the provider's own code: enough to show
the contract the engine relies on.
"""

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from pocketbatch_reverse import ReverseProvider

from pocketbatch import BatchAPI, BatchError, BatchStatus, LLMError, LLMRequest, LLMResponse, RequestError


class ReverseBatch(BatchAPI):
    max_requests = 1_000  # the engine splits larger rounds into several jobs
    max_bytes = 1_000_000
    price_factor = 0.5  # batch lines cost half: the engine applies it to `prices`

    def __init__(self, provider: ReverseProvider, seconds: float = 0.0) -> None:
        self.provider, self.seconds = provider, seconds
        self.jobs: dict[str, dict] = {}
        self._ids = itertools.count(1)

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        size = sum(len(json.dumps({"custom_id": cid, "body": asdict(r)})) + 1 for cid, r in items)
        if len(items) > self.max_requests or size > self.max_bytes:
            # 413: the engine halves the chunk and submits both halves.
            raise BatchError(f"reverse: {len(items)} requests, {size} bytes: over the limits", status=413)
        job_id = f"reverse-batch-{next(self._ids)}"
        ends = time.monotonic() + self.seconds
        self.jobs[job_id] = {"items": list(items), "ends": ends, "cancelled": False}
        return job_id

    def _job(self, job_id: str) -> dict:
        if job_id not in self.jobs:
            raise RequestError(f"reverse: no batch job {job_id!r}", status=404)
        return self.jobs[job_id]

    async def status(self, job_id: str) -> BatchStatus:
        job = self._job(job_id)
        if job["cancelled"] or time.monotonic() >= job["ends"]:
            return BatchStatus("ended", {"total": len(job["items"])})
        return BatchStatus("running", {"total": len(job["items"])})

    async def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        job = self._job(job_id)
        for custom_id, request in reversed(job["items"]):  # any order: the engine maps by custom_id
            if job["cancelled"]:
                # Retryable: the engine runs lines that never ran through the concurrent path.
                yield custom_id, LLMError("reverse: cancelled before it ran", retryable=True)
                continue
            try:
                response = await self.provider.call_llm_async(request)
            except LLMError as e:
                yield custom_id, e  # a RequestError is that line's final answer
                continue
            yield custom_id, response.replace(via="batch")
            await asyncio.sleep(0)

    async def cancel(self, job_id: str) -> None:
        self._job(job_id)["cancelled"] = True


class BatchingReverseProvider(ReverseProvider):
    """The tutorial's provider with the batch API switched on."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batch = ReverseBatch(self, seconds)
