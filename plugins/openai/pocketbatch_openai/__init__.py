"""OpenAI for pocketbatch: chat completions through the official SDK, and the OpenAI batch API.

Also serves OpenAI-compatible servers (Azure, Groq, vLLM, a local server) through OPENAI_BASE_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import openai
from openai.resources.chat.completions import AsyncCompletions

from pocketbatch import ConfigError, LLMRequest, LLMResponse, Provider, RateLimits, Usage, hookimpl
from pocketbatch.errors import LLMError, RateLimitError, error_for_status
from pocketbatch.providers import close_with_loop
from pocketbatch.schema import refuse

from .batch import OpenAIBatch

__all__ = [
    "MODELS",
    "PRICES",
    "SCHEMA_FORMATS",
    "SCHEMA_REFUSES",
    "OpenAIBatch",
    "OpenAIProvider",
    "chat_body",
    "finish_reason",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "translate_error",
]

# Chat models that api.openai.com serves; their bare names are aliases ("gpt-4o-mini" -> openai).
MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
)


def usage_of(usage: dict[str, Any] | None) -> Usage:
    """Usage from a chat completion's `usage`: prompt_tokens counts the cached ones too, which
    prompt_tokens_details.cached_tokens gives (billed at CACHE_PRICES)."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        usage.get("prompt_tokens") or 0,
        usage.get("completion_tokens") or 0,
        cache_read_tokens=details.get("cached_tokens") or 0,
    )


# USD per million (input, output) tokens at standard (non-batch) rates. Dated snapshots match their
# model's key; a snapshot priced differently gets its own key (the longest matching key wins).
#
# Sources, read 2026-12-02 with the search tool (stored copies; no copy of OpenAI's own pricing page,
# developers.openai.com/api/docs/pricing, was found, so nothing here is read from it directly):
# - github.com/simonw/llm-prices, data/openai.json (commit 0838d1a): input, output and cached input of
#   every model below but gpt-4-turbo and gpt-3.5-turbo, taken from OpenAI's page; its o3 input and
#   output (10 / 40) predate OpenAI's June 2025 cut to 2 / 8, which deploybase.ai/articles/openai-pricing
#   (March 2026) and nicolalazzari.ai's 2026 table both show;
# - hex.pm/packages/openai_responses/0.4.1, lib/responses/pricing.ex, a transcription of
#   platform.openai.com/docs/pricing dated 2025-06-03: the gpt-4.1 and gpt-4o families, including that
#   gpt-4o-2024-05-13 has no cached-input rate.
# gpt-4-turbo and gpt-3.5-turbo are as first written (2025-08, from memory of openai.com/api/pricing) and
# unverified: neither source lists them. Check the page before trusting a bill to these numbers.
PRICES_DATE = "2026-12-02"  # the day PRICES and CACHE_PRICES were checked against the sources above
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o1": (15.00, 60.00),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}
# USD per million (cached input read, cache write) tokens, from the same sources: every rate below was
# found as written (2025-08) in simonw/llm-prices, and the gpt-4.1 and gpt-4o ones in openai_responses
# too. OpenAI bills no cache writes (they cost the input price). Models without a key here (gpt-4-turbo,
# gpt-3.5-turbo) and gpt-4o-2024-05-13, which has no cached-input rate, bill cached tokens at the input
# price.
CACHE_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (1.25, 2.50),
    "gpt-4o-2024-05-13": (5.00, 5.00),
    "gpt-4o-mini": (0.075, 0.15),
    "gpt-4.1": (0.50, 2.00),
    "gpt-4.1-mini": (0.10, 0.40),
    "gpt-4.1-nano": (0.025, 0.10),
    "gpt-5": (0.125, 1.25),
    "gpt-5-mini": (0.025, 0.25),
    "gpt-5-nano": (0.005, 0.05),
    "o1": (7.50, 15.00),
    "o3": (0.50, 2.00),
    "o3-mini": (0.55, 1.10),
    "o4-mini": (0.275, 1.10),
}

# One TLS context for every client: making one reads the CA bundle (~25 ms), which on a flow's first call
# would hold its event loop while requests the limiter already let out wait to be sent. For the same
# reason, the SDK's HTTP stack imports its asyncio backend now rather than on the first request.
_TLS = httpx2.create_ssl_context()
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio  # noqa: F401

# Reasoning models refuse `max_tokens` and want `max_completion_tokens` instead.
_REASONING = re.compile(r"^(o\d|gpt-5)")

# What strict structured outputs refuse (platform.openai.com/docs/guides/structured-outputs, "Supported
# schemas"): keyword -> the pydantic feature that usually emits it. Checked before any call.
SCHEMA_REFUSES: dict[str, str] = {
    "minLength": "Field(min_length=...) on a str",
    "maxLength": "Field(max_length=...) on a str",
    "uniqueItems": "a set",
    "prefixItems": "a tuple",
    "contains": "array 'contains'",
    "minContains": "array 'minContains'",
    "maxContains": "array 'maxContains'",
    "unevaluatedItems": "array 'unevaluatedItems'",
    "patternProperties": "object 'patternProperties'",
    "unevaluatedProperties": "object 'unevaluatedProperties'",
    "propertyNames": "object 'propertyNames'",
    "minProperties": "object 'minProperties'",
    "maxProperties": "object 'maxProperties'",
    "allOf": "composition other than anyOf",
    "not": "'not'",
    "if": "'if'/'then'/'else'",
    "dependentRequired": "'dependentRequired'",
    "dependentSchemas": "'dependentSchemas'",
}
SCHEMA_FORMATS = frozenset(
    ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid")
)
_SCHEMA_NAME = re.compile(r"[^a-zA-Z0-9_-]")

# Keyword arguments of the SDK call that are not part of the request body.
_TRANSPORT_OPTIONS = ("extra_headers", "extra_query", "timeout")
_CREATE_PARAMS = frozenset(inspect.signature(AsyncCompletions.create).parameters) - {"self"}


class OpenAIProvider(Provider):
    """The `openai` provider: `openai/gpt-4o-mini`, or any model an OPENAI_BASE_URL server serves.

    Model names: against api.openai.com only the names in MODELS are accepted (so a typo fails before
    any call). With OPENAI_BASE_URL set, `models` is empty, which means any name is accepted, because
    compatible servers (Azure deployments, Groq, vLLM, local servers) serve names of their own. To use
    a model missing from MODELS (a fine-tune, a newer model), set OPENAI_BASE_URL=https://api.openai.com/v1.

    `client_options` go to every `AsyncOpenAI(...)` this provider builds, e.g.
    `{"_strict_response_validation": True}` in tests or `{"timeout": 30}`. `max_retries` is always 0:
    the engine is the only retry layer.
    """

    name = "openai"
    key_env_var = "OPENAI_API_KEY"
    base_url_env_var = "OPENAI_BASE_URL"  # the SDK's own name for the endpoint
    default_base_url: str | None = None  # None: the SDK's default, api.openai.com
    host = "api.openai.com"  # how error messages name the server when no base URL is set
    known_models: tuple[str, ...] = MODELS
    default_model = "gpt-4o-mini"
    # Tier-1 limits of gpt-4o-mini: only where the engine's learning starts; every response's
    # x-ratelimit-* headers then tell it the real ones.
    rpm = 500
    tpm = 200_000
    max_concurrency = 0
    prices = PRICES
    cache_prices = CACHE_PRICES
    prices_date = PRICES_DATE
    supports_schema = True  # response_format json_schema, strict, on both paths
    batch_class: type[OpenAIBatch] = OpenAIBatch  # a host with a batch API of its own shape overrides it

    def __init__(self, *, client_options: Mapping[str, Any] | None = None) -> None:
        self.client_options: dict[str, Any] = dict(client_options or {})
        self.client_options.pop("max_retries", None)
        # loop -> {(key, base_url): client}: a client's pooled connections belong to the loop that
        # opened them, so every asyncio.run (and the sync call_llm loop) gets clients of its own.
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str, str | None], openai.AsyncOpenAI]
        ] = weakref.WeakKeyDictionary()
        self.batch: OpenAIBatch = self.batch_class(self)

    # Both paths build bodies and read errors through these, so a subclass for a server with its own
    # habits (an Azure deployment, a proxy, Groq, Together) changes them in one place.
    @staticmethod
    def chat_body(request: LLMRequest) -> dict[str, Any]:
        """The request body for `request`, on the concurrent path and in a batch line alike."""
        return chat_body(request)

    def translate_error(self, e: openai.OpenAIError) -> LLMError:
        """The pocketbatch error for an SDK exception, naming this provider's key variable on a 401."""
        where = self.base_url_override() or self.host
        return translate_error(
            e, key_env_var=self.key_env_var or "", where=where, rate_limits=self.parse_rate_limits
        )

    def parse_rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """What this server's rate-limit headers say (OpenAI's `x-ratelimit-*` names)."""
        return parse_rate_limits(headers)

    def base_url_override(self) -> str | None:
        """The endpoint the user set in `base_url_env_var`, or None."""
        return os.environ.get(self.base_url_env_var, "").strip() or None

    def base_url(self) -> str | None:
        """The URL the SDK client is built with: the override, else this host's default (None: the SDK's)."""
        return self.base_url_override() or self.default_base_url

    def check_schema(self, schema: dict) -> None:
        """ConfigError naming the field that strict structured outputs would refuse."""
        refuse(schema, "openai", SCHEMA_REFUSES, _format_refused)

    @property
    def models(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.base_url_override() else self.known_models

    def client(self) -> openai.AsyncOpenAI:
        """The SDK client for the running event loop, the current key and base URL."""
        key = self.api_key()
        assert key is not None
        base_url = self.base_url()
        per_loop = self._clients.setdefault(asyncio.get_running_loop(), {})
        client = per_loop.get((key, base_url))
        if client is None:
            options = {"http_client": openai.DefaultAsyncHttpxClient(verify=_TLS), **self.client_options}
            client = openai.AsyncOpenAI(api_key=key, base_url=base_url, **options, max_retries=0)
            per_loop[(key, base_url)] = client
            close_with_loop(client)  # closed when its loop ends, not dropped with open connections
        return client

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        client = self.client()
        body = self.chat_body(request)
        kwargs = {k: request.options[k] for k in _TRANSPORT_OPTIONS if k in request.options}
        extra = {k: body.pop(k) for k in list(body) if k not in _CREATE_PARAMS}
        if extra:  # parameters this SDK version does not know (or a compatible server's own)
            kwargs["extra_body"] = extra
        try:
            raw = await client.chat.completions.with_raw_response.create(**body, **kwargs)
            completion = raw.parse()
        except openai.OpenAIError as e:
            raise self.translate_error(e) from e
        choice = completion.choices[0] if completion.choices else None
        message = choice.message if choice else None
        return LLMResponse(
            _text(message),
            finish_reason=finish_reason(choice.finish_reason if choice else None, message),
            usage=usage_of(completion.usage.model_dump() if completion.usage else None),
            model=completion.model,
            provider=self.name,
            via="concurrent",
            raw=completion,
            rate_limits=self.parse_rate_limits(raw.headers),
        )


def _format_refused(node: dict) -> str | None:
    fmt = node.get("format")
    if fmt is not None and fmt not in SCHEMA_FORMATS:
        return f"format {fmt!r} (strict mode takes {', '.join(sorted(SCHEMA_FORMATS))})"
    return None


def finish_reason(reason: str | None, message: Any) -> str | None:
    """pocketbatch's finish reason: "refusal" when the message carries one (structured outputs), else
    OpenAI's own ("stop", "length", "content_filter", "tool_calls")."""
    refusal = message.get("refusal") if isinstance(message, dict) else getattr(message, "refusal", None)
    return "refusal" if refusal else reason


def _text(message: Any) -> str:
    if message is None:
        return ""
    return message.content or getattr(message, "refusal", None) or ""


def chat_body(request: LLMRequest) -> dict[str, Any]:
    """The chat completions request body, the same for a concurrent call and a batch line.

    `request.options` are merged in (after max_tokens and temperature, so an explicit option wins);
    `extra_body` is flattened into the body; `extra_headers`, `extra_query` and `timeout` are left out
    (they only apply to a concurrent call). max_tokens goes out as `max_completion_tokens` for
    reasoning models (o1, o3, o4-mini, gpt-5), which refuse `max_tokens`.
    """
    options = dict(request.options)
    for reserved in ("model", "messages", "stream"):
        if reserved in options:
            raise ConfigError(f"the openai provider sets {reserved!r} itself; remove it from the options")
    messages = list(request.messages)
    if request.system is not None:
        messages.insert(0, {"role": "system", "content": request.system})
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_tokens is not None:
        param = "max_completion_tokens" if _REASONING.match(request.model) else "max_tokens"
        body[param] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.schema is not None:
        if "response_format" in options:
            raise ConfigError("give either schema= or a response_format option, not both")
        title = str(request.schema.get("title") or "response")
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": _SCHEMA_NAME.sub("_", title)[:64] or "response",
                "strict": True,
                "schema": request.schema,
            },
        }
    body.update(options.pop("extra_body", None) or {})
    for k in _TRANSPORT_OPTIONS:
        options.pop(k, None)
    body.update(options)
    return body


def translate_error(
    e: openai.OpenAIError,
    *,
    key_env_var: str = "OPENAI_API_KEY",
    where: str | None = None,
    rate_limits: Callable[[Mapping[str, str]], RateLimits | None] | None = None,
) -> LLMError:
    """The pocketbatch error for an SDK exception, with retry_after, retryable and rate_limits filled in.

    `key_env_var` and `where` (the server) name what a 401 refused; `rate_limits` reads the headers
    (parse_rate_limits by default)."""
    where = where or os.environ.get("OPENAI_BASE_URL", "").strip() or "api.openai.com"
    if isinstance(e, openai.APITimeoutError):
        return error_for_status(None, f"request to {where} timed out: {e}")
    if isinstance(e, openai.APIConnectionError):
        return error_for_status(None, f"could not reach {where}: {e}")
    if isinstance(e, openai.APIStatusError):
        headers = e.response.headers
        rate_limits = (rate_limits or parse_rate_limits)(headers)
        should_retry = _should_retry(headers)
        message = e.message
        if e.status_code == 401:
            message = f"{message} (check the {key_env_var} environment variable: {where} refused it)"
        if e.status_code == 429 and e.code == "insufficient_quota":
            # No amount of waiting brings quota back: check the plan and billing instead.
            return RateLimitError(
                f"{message} (OpenAI quota exhausted: not retried)",
                status=429,
                retryable=False,
                rate_limits=rate_limits,
            )
        return error_for_status(
            e.status_code,
            message,
            retry_after=parse_retry_after(headers),
            should_retry=should_retry,
            rate_limits=rate_limits,
        )
    if isinstance(e, openai.APIResponseValidationError):
        return LLMError(f"{where} sent a response this SDK cannot read: {e}", status=e.status_code)
    return LLMError(f"{type(e).__name__}: {e}")


def _should_retry(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: `retry-after-ms`, else `retry-after` as seconds or as an HTTP date."""
    ms = _float(headers.get("retry-after-ms"))
    if ms is not None and ms >= 0:
        return ms / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _float(value)
    if seconds is not None:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """A Go duration (`1s`, `6m0s`, `12ms`, `1m30.5s`) or a bare number of seconds, as seconds."""
    if value is None:
        return None
    value = value.strip()
    number = _float(value)
    if number is not None:
        return number if number >= 0 else None
    if not value or _DURATION_PART.sub("", value):
        return None
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def parse_rate_limits(headers: Mapping[str, str]) -> RateLimits | None:
    """What `x-ratelimit-*` headers say; None when they say nothing. Missing or `-1` values are None."""
    h = "x-ratelimit-"
    limits = RateLimits(
        limit_requests=_count(headers.get(h + "limit-requests")),
        remaining_requests=_count(headers.get(h + "remaining-requests")),
        reset_requests=parse_duration(headers.get(h + "reset-requests")),
        limit_tokens=_count(headers.get(h + "limit-tokens")),
        remaining_tokens=_count(headers.get(h + "remaining-tokens")),
        reset_tokens=parse_duration(headers.get(h + "reset-tokens")),
    )
    return None if limits == RateLimits() else limits


def _float(value: str | None) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _count(value: str | None) -> int | None:
    number = _float(value)
    if number is None or number < 0:
        return None
    return int(number)


@hookimpl
def register_providers(register) -> None:
    from .hosts import GroqProvider, TogetherProvider  # here: hosts.py subclasses OpenAIProvider

    register(OpenAIProvider(), aliases=MODELS)
    # Their model names carry a maker (`openai/gpt-oss-20b`), so they are written after the provider
    # (`groq/openai/gpt-oss-20b`) and registered without bare aliases, which would clash with OpenAI's.
    register(GroqProvider())
    register(TogetherProvider())
