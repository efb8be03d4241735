"""Gemini for pocketbatch: generateContent through the google-genai SDK, and Gemini Batch Mode.

Keys as the SDK reads them: GOOGLE_API_KEY, else GEMINI_API_KEY. GOOGLE_GEMINI_BASE_URL (the SDK's own
variable) points it at another endpoint; the plugin never overrides it.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping
from datetime import date
from typing import Any

import httpx2
from google import genai
from google.genai import types

from pocketbatch import ConfigError, LLMRequest, LLMResponse, Provider, hookimpl
from pocketbatch.providers import close_with_loop

from .api import (
    BASE_URL_ENV_VAR,
    FINISH_REASONS,
    KEY_ENV_VARS,
    SCHEMA_UNENFORCED,
    SDK_ERRORS,
    check_schema,
    finish_reason,
    gemini_schema,
    generate_config,
    parse_retry_delay,
    response_text,
    to_contents,
    translate_error,
    usage_of,
)
from .batch import GeminiBatch

# One TLS context for every client: making one reads the CA bundle (~25 ms), which on a flow's first call
# would hold its event loop (pocketbatch loads plugins at import so that nothing slow happens there).
_TLS = httpx2.create_ssl_context()

__all__ = [
    "FINISH_REASONS",
    "MODELS",
    "PRICES",
    "SCHEMA_UNENFORCED",
    "GeminiBatch",
    "GeminiProvider",
    "check_schema",
    "finish_reason",
    "gemini_schema",
    "generate_config",
    "parse_retry_delay",
    "prices_on",
    "response_text",
    "to_contents",
    "translate_error",
    "usage_of",
]

# Text models the Gemini API serves; their bare names are aliases ("gemini-3.5-flash-lite" -> gemini).
# Checked 2026-12-02 against what the search tool's stored pages say (no page was fetched live):
# - gemini-3.8-flash, gemini-3.5-flash, gemini-3.5-flash-lite and gemini-3.1-pro-preview are the current
#   models (Firebase AI Logic's structured-output page, firebase.google.com/docs/ai-logic/
#   generate-structured-output, lists their ids; the pricing page below prices them);
# - gemini-2.5-flash-lite "is not deprecated and remains available through the API until further notice";
#   gemini-2.5-pro and gemini-2.5-flash were shut down on 2026-12-01 and since then "requests to
#   gemini-2.5-pro are automatically routed to gemini-3.8-flash and requests to gemini-2.5-flash to
#   gemini-3.5-flash-lite, billed at the new model's rates" (ai.google.dev/gemini-api/docs/deprecations
#   as quoted, read 2026-11-10, by dev.to/aideprecations): they stay listed so existing code keeps
#   resolving, priced as the model that now answers;
# - gemini-2.0-flash and gemini-2.0-flash-lite are gone (shut down; Google's deprecations page names
#   gemini-2.5-flash and -flash-lite as their replacements), so they are no longer listed.
MODELS: tuple[str, ...] = (
    "gemini-3.8-flash",
    "gemini-3.5-flash",
    "gemini-3.5-flash-lite",
    "gemini-3.1-pro-preview",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
)


def prices_on(day: date) -> dict[str, tuple[float, float]]:
    """USD per million (input, output) tokens on `day`, standard (non-batch) paid-tier rates for text.

    From ai.google.dev/gemini-api/docs/pricing, as transcribed verbatim from the page read on 2026-10-07
    (github.com/api-evangelist/deepmind, plans/deepmind-plans-pricing.yml; the same figures in its
    2026-09-20 reading, api-evangelist/gemini). Output includes thinking tokens. gemini-3.8-flash costs
    "$0.75 through December 31, 2026" and "$1.50 starting January 1, 2027" for input, $3.75 then $7.50
    for output, hence the date. gemini-3.1-pro-preview is the price of prompts up to 200k tokens (longer
    ones cost 4.00 / 18.00: not modelled). gemini-2.5-flash-lite: the transcription gives its output
    ($0.40) only; its input ($0.10) is from nicolalazzari.ai's 2026 summary of the same page. The two
    retired 2.5 models are billed as the model their requests are routed to (see MODELS)."""
    flash_38 = (0.75, 3.75) if day < date(2027, 1, 1) else (1.50, 7.50)
    flash_lite_35 = (0.30, 2.50)
    return {
        "gemini-3.8-flash": flash_38,
        "gemini-3.5-flash": (1.50, 9.00),
        "gemini-3.5-flash-lite": flash_lite_35,
        "gemini-3.1-pro-preview": (2.00, 12.00),
        "gemini-2.5-flash-lite": (0.10, 0.40),
        "gemini-2.5-pro": flash_38,  # routed to gemini-3.8-flash since 2026-12-01
        "gemini-2.5-flash": flash_lite_35,  # routed to gemini-3.5-flash-lite since 2026-12-01
    }


# Read once, at import: a process running across 2027-01-01 keeps the old gemini-3.8-flash price.
PRICES: dict[str, tuple[float, float]] = prices_on(date.today())


class GeminiProvider(Provider):
    """The `gemini` provider: `gemini/gemini-3.5-flash-lite`, or any model a GOOGLE_GEMINI_BASE_URL serves.

    `client_options` are extra `types.HttpOptions` fields for every client this provider builds (e.g.
    `{"timeout": 30_000}`, in milliseconds as the SDK counts them). Retries are always off (the engine
    is the only retry layer), and the SDK always sends through an httpx2 client of the provider's own:
    left alone, the SDK would pick aiohttp whenever it is installed, which no respx-based emulator sees.
    """

    name = "gemini"
    default_model = "gemini-3.5-flash-lite"  # where gemini-2.5-flash, the default until its shutdown, goes
    # Tier-1 limits of gemini-2.5-pro as written in 2025 (not re-checked): only where learning starts.
    # Gemini sends no rate-limit headers, so the engine learns the real limit from 429s.
    rpm = 150
    tpm = 2_000_000
    max_concurrency = 0
    prices = PRICES
    prices_date = "2026-10-07"  # the day the pricing page was read (see prices_on)
    supports_schema = True  # response_json_schema with response_mime_type application/json, both paths

    def __init__(self, *, client_options: Mapping[str, Any] | None = None) -> None:
        self.client_options: dict[str, Any] = dict(client_options or {})
        for owned in ("retry_options", "httpx_async_client", "base_url"):
            self.client_options.pop(owned, None)
        # loop -> {(key, base_url): client}: pooled connections belong to the loop that opened them.
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str, str | None], genai.Client]
        ] = weakref.WeakKeyDictionary()
        self.batch: GeminiBatch = GeminiBatch(self)

    @property
    def models(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if os.environ.get(BASE_URL_ENV_VAR, "").strip() else MODELS

    @property
    def key_env_var(self) -> str:  # type: ignore[override]
        """GOOGLE_API_KEY when it is set (the SDK prefers it, so it is the key in use), else GEMINI_API_KEY:
        `pocketbatch providers` then shows the variable that really holds the key."""
        return "GOOGLE_API_KEY" if os.environ.get("GOOGLE_API_KEY", "").strip() else "GEMINI_API_KEY"

    def api_key(self) -> str | None:
        """GOOGLE_API_KEY, else GEMINI_API_KEY (as the SDK picks); a ConfigError naming both when unset."""
        for name in KEY_ENV_VARS:
            key = os.environ.get(name, "").strip()
            if key:
                return key
        raise ConfigError(
            "gemini needs an API key: set the GEMINI_API_KEY (or GOOGLE_API_KEY) environment variable"
        )

    def check_schema(self, schema: dict) -> None:
        """ConfigError for a schema Gemini cannot take (a recursive one), before any call."""
        check_schema(schema)

    def has_key(self) -> bool:
        return any(os.environ.get(name, "").strip() for name in KEY_ENV_VARS)

    def client(self) -> genai.Client:
        """The SDK client for the running event loop, the current key and GOOGLE_GEMINI_BASE_URL."""
        key = self.api_key()
        assert key is not None
        base_url = os.environ.get(BASE_URL_ENV_VAR, "").strip() or None  # part of the cache key only
        per_loop = self._clients.setdefault(asyncio.get_running_loop(), {})
        client = per_loop.get((key, base_url))
        if client is None:
            http = httpx2.AsyncClient(timeout=httpx2.Timeout(600.0, connect=10.0), verify=_TLS)
            options = types.HttpOptions(
                **self.client_options,
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=http,
            )
            client = genai.Client(api_key=key, vertexai=False, http_options=options)
            per_loop[(key, base_url)] = client
            close_with_loop(http)  # its connections are closed when the loop ends, not dropped
        return client

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        client = self.client()
        contents, config = to_contents(request), generate_config(request)
        try:
            response = await client.aio.models.generate_content(
                model=request.model, contents=contents, config=config
            )
        except SDK_ERRORS as e:
            raise translate_error(e) from e
        return LLMResponse(
            response_text(response),
            finish_reason=finish_reason(response),
            usage=usage_of(response.usage_metadata),
            model=response.model_version or request.model,
            provider=self.name,
            via="concurrent",
            raw=response,
        )


@hookimpl
def register_providers(register) -> None:
    register(GeminiProvider(), aliases=MODELS)
