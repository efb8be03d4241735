"""Gemini for pocketbatch: generateContent through the google-genai SDK, and Gemini Batch Mode.

Keys as the SDK reads them: GOOGLE_API_KEY, else GEMINI_API_KEY. GOOGLE_GEMINI_BASE_URL (the SDK's own
variable) points it at another endpoint; the plugin never overrides it.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping
from typing import Any

import httpx2
from google import genai
from google.genai import types

from pocketbatch import ConfigError, LLMRequest, LLMResponse, Provider, hookimpl

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
    "response_text",
    "to_contents",
    "translate_error",
    "usage_of",
]

# Text models the Gemini API serves; their bare names are aliases ("gemini-2.5-flash" -> gemini).
MODELS: tuple[str, ...] = (
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.0-flash",
    "gemini-2.0-flash-lite",
)

# USD per million (input, output) tokens at standard (non-batch) rates, text input, from
# ai.google.dev/gemini-api/docs/pricing as of 2025-09. Output includes thinking tokens. gemini-2.5-pro
# is the price of prompts up to 200k tokens (longer prompts cost 2.50 / 15.00: not modelled here).
PRICES: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
}


class GeminiProvider(Provider):
    """The `gemini` provider: `gemini/gemini-2.5-flash`, or any model a GOOGLE_GEMINI_BASE_URL serves.

    `client_options` are extra `types.HttpOptions` fields for every client this provider builds (e.g.
    `{"timeout": 30_000}`, in milliseconds as the SDK counts them). Retries are always off (the engine
    is the only retry layer), and the SDK always sends through an httpx2 client of the provider's own:
    left alone, the SDK would pick aiohttp whenever it is installed, which no respx-based emulator sees.
    """

    name = "gemini"
    default_model = "gemini-2.5-flash"
    # Tier-1 limits of gemini-2.5-pro, the lowest of the paid text models: only where learning starts.
    # Gemini sends no rate-limit headers, so the engine learns the real limit from 429s.
    rpm = 150
    tpm = 2_000_000
    max_concurrency = 0
    prices = PRICES
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
            options = types.HttpOptions(
                **self.client_options,
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=httpx2.AsyncClient(
                    timeout=httpx2.Timeout(600.0, connect=10.0), verify=_TLS
                ),
            )
            client = genai.Client(api_key=key, vertexai=False, http_options=options)
            per_loop[(key, base_url)] = client
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
