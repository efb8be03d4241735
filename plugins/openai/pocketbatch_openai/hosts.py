"""Groq and Together: OpenAI-shaped chat and batch APIs, each with its documented differences.

Both run through the OpenAI provider's code (the `openai` SDK, the same request bodies and batch lines);
what differs lives here: endpoints, key variables, models and prices, Groq's per-model batch discount
and per-day request headers, and Together's own files endpoint, job shape and upper-case states.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar

import openai

from pocketbatch import RateLimits

from . import OpenAIProvider
from .batch import ENDPOINT, Job, Listed, OpenAIBatch

# -- Groq ---------------------------------------------------------------------------------------------

# Groq's chat models, checked 2026-12-02 with the search tool's stored pages (none fetched live). Groq
# decommissioned llama-3.3-70b-versatile and llama-3.1-8b-instant on 2026-08-16 (release notes of
# github.com/papi-ai/groq v0.15.2 and github.com/offpeak-ai/offpeak v0.2.3, both citing
# console.groq.com/docs/deprecations); offpeak's audit of the live list (August 2026) found the gpt-oss
# models (120b, 20b, safeguard-20b) and Groq's own compound systems, no Kimi. Names carry the model's
# maker (`openai/gpt-oss-20b`), so they are written in full after the provider: `groq/openai/gpt-oss-20b`.
GROQ_MODELS: tuple[str, ...] = (
    "openai/gpt-oss-120b",
    "openai/gpt-oss-20b",
    "openai/gpt-oss-safeguard-20b",
)

# USD per million (input, output) tokens. openai/gpt-oss-120b: 0.15 / 0.60 on groq.com/pricing and
# console.groq.com/docs/models, as quoted by tokenmix.ai (verified 2026-06-04) and by
# braintrustdata/braintrust-proxy issues #479, #566 and #925 (2026). openai/gpt-oss-20b: the sources
# disagree (0.10 / 0.50 at requesty.ai, which passes Groq's price on; 0.075 / 0.30 in the aicost crate),
# and none shows Groq's page itself, so it has no price here (cost_usd None), nor has
# openai/gpt-oss-safeguard-20b, for which no price was found.
GROQ_PRICES: dict[str, tuple[float, float]] = {
    "openai/gpt-oss-120b": (0.15, 0.60),
}

# Groq's batch discount: 50 % (tokenmix.ai, 2026-06-04; hivebook's Groq API page, May 2026). Groq's batch
# page (console.groq.com/docs/batch) names the models it applies to, but its stored versions list only
# models since shut down (and one, older, a 25 % discount); which of today's models it covers was not
# found. pocketbatch assumes the gpt-oss chat models, as before: check the page. Other models run in a
# batch at the full price (so auto mode runs them concurrently).
GROQ_BATCH_DISCOUNTED: frozenset[str] = frozenset({"openai/gpt-oss-120b", "openai/gpt-oss-20b"})


class GroqBatch(OpenAIBatch):
    """Groq's batch API: OpenAI's files and batches under `/openai/v1`, 50% off listed models only.

    `completion_window` may be anything from "24h" to "7d" on Groq; set it on the instance
    (`get_provider("groq").batch.completion_window = "7d"`) for jobs that may take longer.
    """

    label = "Groq"
    # Groq's batch metadata is not documented: no tag on the job; `find` tells a job by its input file's
    # name (the tag's: Groq's files keep `filename`), from `GET /openai/v1/batches` (OpenAI's list,
    # which Groq serves) and `GET /openai/v1/files/{id}`.
    tags_jobs = False
    max_requests = 50_000
    max_bytes = 200_000_000  # Groq's 200 MB, in decimal megabytes
    completion_window = "24h"

    def price_factor_for(self, model: str) -> float:
        return self.price_factor if model in GROQ_BATCH_DISCOUNTED else 1.0


class GroqProvider(OpenAIProvider):
    """`groq/<model>` through Groq's OpenAI-compatible API (`https://api.groq.com/openai/v1`).

    GROQ_BASE_URL, as the groq SDK names it, is the server's root (`https://api.groq.com`): the plugin
    appends `/openai/v1`, where Groq serves the OpenAI API. Setting it lifts the model-name check.
    """

    name = "groq"
    key_env_var = "GROQ_API_KEY"
    base_url_env_var = "GROQ_BASE_URL"
    default_base_url = "https://api.groq.com/openai/v1"
    host = "api.groq.com"
    known_models = GROQ_MODELS
    default_model = "openai/gpt-oss-20b"
    # Developer-tier request limit, only where learning starts: Groq's request headers count per day,
    # so requests per minute are learned from 429s; its token headers are per minute and are read.
    rpm = 1_000
    tpm = 250_000
    prices = GROQ_PRICES
    cache_prices: ClassVar[dict[str, tuple[float, float]]] = {}
    prices_date = "2026-06-04"  # the latest reading of GROQ_PRICES' sources
    batch_class = GroqBatch

    def base_url(self) -> str | None:
        root = self.base_url_override()
        return f"{root.rstrip('/')}/openai/v1" if root else self.default_base_url

    def parse_rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """Groq's x-ratelimit-*-requests headers count requests per **day**, which the engine (per
        minute) must not take for its limit: only the token figures (per minute) are kept."""
        limits = super().parse_rate_limits(headers)
        if limits is None:
            return None
        limits = replace(limits, limit_requests=None, remaining_requests=None, reset_requests=None)
        return None if limits == RateLimits() else limits


# -- Together -----------------------------------------------------------------------------------------

# A few of Together's serverless chat models, for their prices; Together serves many more and changes
# them often, so any name is accepted (`together/<the model's full name>`). USD per million (input,
# output) tokens from Together's serverless catalog (docs.together.ai/docs/serverless/models), as
# Together's own github.com/togethercomputer/skills snapshots it "as of 2026-10-07"
# (skills/together-ai/references/chat-completions/models.md). Models of the 2025 table that are no longer
# in that catalog (Meta-Llama-3.1-8B-Instruct-Turbo, DeepSeek-V3, Qwen2.5-72B-Instruct-Turbo,
# gpt-oss-20b) are left out: any name still works, with cost_usd None.
TOGETHER_PRICES: dict[str, tuple[float, float]] = {
    "meta-llama/Llama-3.3-70B-Instruct-Turbo": (1.04, 1.04),
    "openai/gpt-oss-120b": (0.15, 0.60),
    "moonshotai/Kimi-K3": (3.00, 15.00),
    "zai-org/GLM-5.3": (1.40, 4.40),
    "zai-org/GLM-5.3-Flash": (0.15, 0.50),
    "deepseek-ai/DeepSeek-V4.1-Flash": (0.30, 1.20),
    "Qwen/Qwen3.5-9B": (0.17, 0.25),
}
TOGETHER_MODELS: tuple[str, ...] = tuple(TOGETHER_PRICES)

# Together's batch API is "up to 50%" cheaper: the same snapshot (skills/together-ai/domains/
# batch-inference.md) says "the 50% discount applies to meta-llama/Llama-3.3-70B-Instruct-Turbo" (and a
# speech model); "other models run at standard rates".
TOGETHER_BATCH_DISCOUNTED: frozenset[str] = frozenset({"meta-llama/Llama-3.3-70B-Instruct-Turbo"})

# Together's job states, in OpenAI's names for the rest of the batch path.
_TOGETHER_STATES = {
    "VALIDATING": "validating",
    "IN_PROGRESS": "in_progress",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "EXPIRED": "expired",
    "CANCELLING": "cancelling",
    "CANCELLED": "cancelled",
}
_AUTH: dict[str, Any] = {"security": {"bearer_auth": True}}


class TogetherBatch(OpenAIBatch):
    """Together's batch API: OpenAI's JSONL lines, but its own files endpoint (`/files/upload`, purpose
    `batch-api`), a created job wrapped in `{"job": ...}`, upper-case states, and a `progress` percentage
    instead of request counts (reported as `counts={"progress": percent}`). 50% off only the models in
    TOGETHER_BATCH_DISCOUNTED; the others cost the full price in a batch.

    The `openai` SDK's typed batch methods cannot read Together's job, so these go through the SDK
    client's plain `get`/`post` (same auth, timeouts and error translation); results and file deletes
    use the SDK's file methods, whose paths Together shares.
    """

    label = "Together"
    # Together's jobs take no metadata: no tag on the job; `find` tells a job by its input file's name
    # (the tag's, sent as `file_name`; `GET /files/{id}` gives it back as `filename`), from
    # `GET /batches` (Together's jobs report no request count).
    tags_jobs = False
    max_requests = 50_000
    max_bytes = 100_000_000  # Together's 100 MB per input file
    completion_window = "24h"  # Together's only window, a best-effort target

    def price_factor_for(self, model: str) -> float:
        return self.price_factor if model in TOGETHER_BATCH_DISCOUNTED else 1.0

    async def _upload(self, client: openai.AsyncOpenAI, data: bytes, name: str) -> str:
        file = await client.post(
            "/files/upload",
            body={"purpose": "batch-api", "file_name": name},
            files=[("file", (name, data, "application/jsonl"))],
            options={"headers": {"Content-Type": "multipart/form-data"}, **_AUTH},
            cast_to=object,
        )
        return _field(file, "id")

    async def _create(self, client: openai.AsyncOpenAI, file_id: str) -> str:
        created = await client.post(
            "/batches",
            body={
                "input_file_id": file_id,
                "endpoint": ENDPOINT,
                "completion_window": self.completion_window,
            },
            options=_AUTH,
            cast_to=object,
        )
        return _field(_field(created, "job"), "id")

    async def _job(self, client: openai.AsyncOpenAI, job_id: str) -> Job:
        return _together_job(await client.get(f"/batches/{job_id}", options=_AUTH, cast_to=object))

    async def _recent_jobs(self, client: openai.AsyncOpenAI, after: float) -> AsyncIterator[Listed]:
        """Together's `GET /batches`: a plain array of its jobs, `created_at` an ISO 8601 time."""
        jobs = await client.get("/batches", options=_AUTH, cast_to=object)
        if not isinstance(jobs, list):
            raise openai.OpenAIError(f"Together sent a job list that is not a list: {str(jobs)[:200]}")
        for job in jobs:
            created = _timestamp(_field(job, "created_at"))
            if created is None or created < after:
                continue
            size = job.get("file_size_bytes")
            yield Listed(
                str(_field(job, "id")),
                created,
                0,
                job.get("input_file_id"),
                size if isinstance(size, int) else None,
                _TOGETHER_STATES.get(str(job.get("status")).upper(), "in_progress"),
            )

    async def _file_name_and_size(
        self, client: openai.AsyncOpenAI, file_id: str
    ) -> tuple[str | None, int | None]:
        """Together's `GET /files/{id}` (its file object is not OpenAI's: purpose `batch-api`)."""
        file = await client.get(f"/files/{file_id}", options=_AUTH, cast_to=object)
        file = file if isinstance(file, dict) else {}
        name, size = file.get("filename"), file.get("bytes")
        return (name if isinstance(name, str) else None), (size if isinstance(size, int) else None)

    async def _cancel(self, client: openai.AsyncOpenAI, job_id: str) -> str | None:
        job = await client.post(f"/batches/{job_id}/cancel", options=_AUTH, cast_to=object)
        return _together_job(job).input_file_id


def _field(obj: Any, name: str) -> Any:
    """obj[name] from a Together reply; an SDK error (not retried) when the reply has no such field."""
    if not isinstance(obj, dict) or name not in obj:
        raise openai.OpenAIError(f"Together sent a reply without {name!r}: {str(obj)[:200]}")
    return obj[name]


def _timestamp(value: Any) -> float | None:
    """Epoch seconds of an ISO 8601 time ("2026-12-02T09:00:00Z"), or None when it is not one."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _together_job(job: Any) -> Job:
    status = str(_field(job, "status"))
    progress = job.get("progress")
    return Job(
        status=_TOGETHER_STATES.get(status.upper(), "in_progress"),
        counts={"progress": round(float(progress))} if isinstance(progress, (int, float)) else {},
        errors=[str(job["error"])] if job.get("error") else [],
        input_file_id=job.get("input_file_id"),
        output_file_id=job.get("output_file_id"),
        error_file_id=job.get("error_file_id"),
        raw=job,
    )


class TogetherProvider(OpenAIProvider):
    """`together/<model>` through Together's OpenAI-compatible API (`https://api.together.xyz/v1`),
    TOGETHER_BASE_URL as the together SDK names it. Any model name is accepted."""

    name = "together"
    key_env_var = "TOGETHER_API_KEY"
    base_url_env_var = "TOGETHER_BASE_URL"
    default_base_url = "https://api.together.xyz/v1"
    host = "api.together.xyz"
    known_models = TOGETHER_MODELS
    default_model = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
    # Tier-1 requests per minute, only where learning starts; Together reports its limits in headers
    # of its own naming, which this plugin does not read, so the engine learns from 429s.
    rpm = 600
    tpm = 0
    prices = TOGETHER_PRICES
    cache_prices: ClassVar[dict[str, tuple[float, float]]] = {}
    prices_date = "2026-10-07"  # Together's catalog snapshot TOGETHER_PRICES is read from
    batch_class = TogetherBatch

    def accepts(self, model: str) -> bool:
        return bool(model)
