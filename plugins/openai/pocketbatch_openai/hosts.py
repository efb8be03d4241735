"""Groq and Together: OpenAI-shaped chat and batch APIs, each with its documented differences.

Both run through the OpenAI provider's code (the `openai` SDK, the same request bodies and batch lines);
what differs lives here: endpoints, key variables, models and prices, Groq's per-model batch discount
and per-day request headers, and Together's own files endpoint, job shape and upper-case states.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import openai

from pocketbatch import RateLimits

from . import OpenAIProvider
from .batch import ENDPOINT, Job, OpenAIBatch

# -- Groq ---------------------------------------------------------------------------------------------

# Chat models on console.groq.com/docs/models; names carry the model's maker (`openai/gpt-oss-20b`), so
# they are written in full after the provider: `groq/openai/gpt-oss-20b`.
GROQ_MODELS: tuple[str, ...] = (
    "openai/gpt-oss-120b",
    "openai/gpt-oss-20b",
    "moonshotai/kimi-k2-instruct-0905",
    "llama-3.3-70b-versatile",
    "llama-3.1-8b-instant",
)

# USD per million (input, output) tokens, groq.com/pricing as of 2025-09. Check the page before trusting
# a bill to these numbers.
GROQ_PRICES: dict[str, tuple[float, float]] = {
    "openai/gpt-oss-120b": (0.15, 0.75),
    "openai/gpt-oss-20b": (0.10, 0.50),
    "moonshotai/kimi-k2-instruct-0905": (1.00, 3.00),
    "llama-3.3-70b-versatile": (0.59, 0.79),
    "llama-3.1-8b-instant": (0.05, 0.08),
}

# Groq's batch discount applies to the models its batch page lists, not to every model it serves; the
# others run in a batch at the full price (so auto mode runs them concurrently).
GROQ_BATCH_DISCOUNTED: frozenset[str] = frozenset(
    {"openai/gpt-oss-120b", "openai/gpt-oss-20b", "llama-3.3-70b-versatile", "llama-3.1-8b-instant"}
)


class GroqBatch(OpenAIBatch):
    """Groq's batch API: OpenAI's files and batches under `/openai/v1`, 50% off listed models only.

    `completion_window` may be anything from "24h" to "7d" on Groq; set it on the instance
    (`get_provider("groq").batch.completion_window = "7d"`) for jobs that may take longer.
    """

    label = "Groq"
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

# A few of Together's serverless chat models, for their prices; Together serves hundreds and adds more
# often, so any name is accepted (`together/<the model's full name>`).
TOGETHER_MODELS: tuple[str, ...] = (
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
    "deepseek-ai/DeepSeek-V3",
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
    "openai/gpt-oss-120b",
    "openai/gpt-oss-20b",
)

# USD per million (input, output) tokens, together.ai/pricing as of 2025-09.
TOGETHER_PRICES: dict[str, tuple[float, float]] = {
    "meta-llama/Llama-3.3-70B-Instruct-Turbo": (0.88, 0.88),
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo": (0.18, 0.18),
    "deepseek-ai/DeepSeek-V3": (1.25, 1.25),
    "Qwen/Qwen2.5-72B-Instruct-Turbo": (1.20, 1.20),
    "openai/gpt-oss-120b": (0.15, 0.60),
    "openai/gpt-oss-20b": (0.05, 0.20),
}

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
    instead of request counts (reported as `counts={"progress": percent}`).

    The `openai` SDK's typed batch methods cannot read Together's job, so these go through the SDK
    client's plain `get`/`post` (same auth, timeouts and error translation); results and file deletes
    use the SDK's file methods, whose paths Together shares.
    """

    label = "Together"
    max_requests = 50_000
    max_bytes = 100_000_000  # Together's 100 MB per input file
    completion_window = "24h"  # Together's only window, a best-effort target

    async def _upload(self, client: openai.AsyncOpenAI, data: bytes) -> str:
        file = await client.post(
            "/files/upload",
            body={"purpose": "batch-api", "file_name": "batch.jsonl"},
            files=[("file", ("batch.jsonl", data, "application/jsonl"))],
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

    async def _cancel(self, client: openai.AsyncOpenAI, job_id: str) -> str | None:
        job = await client.post(f"/batches/{job_id}/cancel", options=_AUTH, cast_to=object)
        return _together_job(job).input_file_id


def _field(obj: Any, name: str) -> Any:
    """obj[name] from a Together reply; an SDK error (not retried) when the reply has no such field."""
    if not isinstance(obj, dict) or name not in obj:
        raise openai.OpenAIError(f"Together sent a reply without {name!r}: {str(obj)[:200]}")
    return obj[name]


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
    batch_class = TogetherBatch

    def accepts(self, model: str) -> bool:
        return bool(model)
