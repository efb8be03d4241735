"""Translation between pocketbatch's values and the Anthropic Messages API: params, replies, errors, limits.

Shared by the concurrent path (AnthropicProvider) and the batch path (AnthropicBatch), so a request is
the same params either way.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import anthropic

from pocketbatch import (
    ConfigError,
    LLMError,
    LLMRequest,
    LLMResponse,
    RateLimits,
    RequestError,
    TransientError,
    Usage,
)
from pocketbatch.errors import error_for_status
from pocketbatch.schema import is_recursive, refuse

PROVIDER = "anthropic"
KEY_ENV_VAR = "ANTHROPIC_API_KEY"
MAX_TOKENS_ENV_VAR = "POCKETBATCH_ANTHROPIC_MAX_TOKENS"
DEFAULT_MAX_TOKENS = 4096

# Options are body params, sent the same way per call and in a batch: pocketbatch reads whole replies
# (no stream), model and messages are LLMRequest fields, and SDK call settings have no place in a body.
_RESERVED_OPTIONS = ("model", "messages", "stream", "extra_headers", "extra_query", "extra_body", "timeout")


# What structured outputs refuse (platform.claude.com/docs/en/build-with-claude/structured-outputs,
# "JSON Schema limitations"): keyword -> the pydantic feature that usually emits it.
SCHEMA_REFUSES: dict[str, str] = {
    "minimum": "Field(ge=...) or a numeric constraint",
    "maximum": "Field(le=...) or a numeric constraint",
    "exclusiveMinimum": "Field(gt=...)",
    "exclusiveMaximum": "Field(lt=...)",
    "multipleOf": "Field(multiple_of=...)",
    "minLength": "Field(min_length=...) on a str",
    "maxLength": "Field(max_length=...) on a str",
    "maxItems": "Field(max_length=...) on a list",
    "uniqueItems": "a set",
    "prefixItems": "a tuple",
    "contains": "array 'contains'",
    "patternProperties": "object 'patternProperties'",
    "propertyNames": "object 'propertyNames'",
    "minProperties": "object 'minProperties'",
    "maxProperties": "object 'maxProperties'",
    "not": "'not'",
    "if": "'if'/'then'/'else'",
}
SCHEMA_FORMATS = frozenset(
    ("date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid")
)
# The API's stop reasons as pocketbatch's finish reasons ("length": the answer was cut short).
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "refusal",
}


def check_schema(schema: dict) -> None:
    """ConfigError naming the field that structured outputs would refuse, before any call."""
    if is_recursive(schema):
        raise ConfigError("anthropic cannot take this schema: structured outputs refuse recursive schemas")
    refuse(schema, "anthropic", SCHEMA_REFUSES, _schema_rule)


def _schema_rule(node: dict) -> str | None:
    if node.get("minItems", 0) not in (0, 1):
        return f"minItems {node['minItems']} (only 0 or 1 are supported; Field(min_length=...) on a list)"
    fmt = node.get("format")
    if fmt is not None and fmt not in SCHEMA_FORMATS:
        return f"format {fmt!r} (structured outputs take {', '.join(sorted(SCHEMA_FORMATS))})"
    return None


class InvalidRequest(ValueError):
    """A request the API would reject, found before sending it (the caller picks the error class)."""


def default_max_tokens() -> int:
    """POCKETBATCH_ANTHROPIC_MAX_TOKENS, else 4096: the API requires max_tokens on every request."""
    raw = os.environ.get(MAX_TOKENS_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_MAX_TOKENS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_TOKENS_ENV_VAR} must be a whole number of tokens >= 1, not {raw!r}")
    return value


def build_params(request: LLMRequest) -> dict[str, Any]:
    """The Messages API params for a request; InvalidRequest says what the API would reject."""
    options = dict(request.options)
    for key in _RESERVED_OPTIONS:
        if key in options:
            raise InvalidRequest(f"options may not set {key!r}")
    system_parts = [request.system] if request.system else []
    messages: list[dict] = []
    if not isinstance(request.messages, list):
        raise InvalidRequest("messages must be a list of chat messages")
    for i, message in enumerate(request.messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRequest(f"message {i} must be a dict with a 'role'")
        # Chat prompts written for other providers carry system messages; Anthropic takes them as `system`.
        if message["role"] == "system":
            if not isinstance(message.get("content"), str):
                raise InvalidRequest(f"system message {i} must have str content")
            system_parts.append(message["content"])
        else:
            messages.append(message)
    if not messages:
        raise InvalidRequest("messages is empty: the API needs at least one user message")
    params: dict[str, Any] = {"model": request.model, "messages": messages}
    if system_parts:
        if "system" in options:
            raise InvalidRequest("system is given both as a field and in options")
        params["system"] = "\n\n".join(system_parts)
    max_tokens = request.max_tokens if request.max_tokens is not None else default_max_tokens()
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be an int >= 1, not {max_tokens!r}")
    if "max_tokens" in options and request.max_tokens is not None:
        raise InvalidRequest("max_tokens is given both as a field and in options")
    params["max_tokens"] = max_tokens
    if request.temperature is not None:
        if "temperature" in options:
            raise InvalidRequest("temperature is given both as a field and in options")
        params["temperature"] = request.temperature
    if request.schema is not None:
        # Structured outputs' GA form, which the SDK's messages.create takes as `output_config`.
        config = dict(options.pop("output_config", None) or {})
        if config.get("format") is not None:
            raise InvalidRequest("give either schema= or output_config.format, not both")
        params["output_config"] = {**config, "format": {"type": "json_schema", "schema": request.schema}}
    params.update(options)
    return params


def dumps(value: Any) -> bytes:
    """JSON exactly as the SDK sends it (anthropic._utils._json.openapi_dumps) for plain values."""
    return _SDK_JSON.encode(value).encode()


# json.dumps with these options, its encoder made once (json.dumps makes one whenever it is given options)
_SDK_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_response(message: Any, *, via: str, rate_limits: RateLimits | None = None) -> LLMResponse:
    """An LLMResponse from an SDK Message: the text blocks joined. Anthropic's input_tokens leaves out
    the tokens read from and written to the prompt cache; pocketbatch's Usage counts all input tokens
    in input_tokens, and says how many were cache reads and writes, and how many of the writes went to
    the 1-hour cache (each priced at its own rate)."""
    text = "".join(block.text for block in (message.content or []) if getattr(block, "type", None) == "text")
    usage = message.usage
    # cache_creation_input_tokens counts every write; cache_creation splits them by the cache's TTL,
    # and a 1-hour write costs 2x the input price where a 5-minute one costs 1.25x.
    by_ttl = getattr(usage, "cache_creation", None)
    write_5m = getattr(by_ttl, "ephemeral_5m_input_tokens", None) or 0
    write_1h = getattr(by_ttl, "ephemeral_1h_input_tokens", None) or 0
    cache_write = getattr(usage, "cache_creation_input_tokens", None) or write_5m + write_1h
    cache_read = getattr(usage, "cache_read_input_tokens", None) or 0
    input_tokens = (usage.input_tokens or 0) + cache_write + cache_read
    stop = getattr(message, "stop_reason", None)
    return LLMResponse(
        text,
        finish_reason=FINISH_REASONS.get(stop, stop),
        usage=Usage(
            input_tokens=input_tokens,
            output_tokens=usage.output_tokens or 0,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            cache_write_1h_tokens=min(write_1h, cache_write),
        ),
        model=message.model,
        provider=PROVIDER,
        via=via,
        raw=message,
        rate_limits=rate_limits,
    )


# --- headers -----------------------------------------------------------------------------------------


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None and value.strip() else None
    except ValueError:
        return None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _seconds_until(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from now until an RFC 3339 timestamp (never negative); a bare number is taken as seconds."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    # Python 3.10's fromisoformat knows neither "Z" nor more than six fractional digits.
    text = _FRACTION.sub(r"\1", value.replace("z", "Z").replace("Z", "+00:00"))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _bucket(
    h: dict[str, str], name: str, now: datetime | None
) -> tuple[int | None, int | None, float | None]:
    prefix = f"anthropic-ratelimit-{name}-"
    return (
        _int(h.get(prefix + "limit")),
        _int(h.get(prefix + "remaining")),
        _seconds_until(h.get(prefix + "reset"), now),
    )


def _fraction_left(bucket: tuple[int | None, int | None, float | None]) -> float:
    limit, remaining = bucket[0], bucket[1]
    if not limit or remaining is None:
        return math.inf  # says nothing about how close it is, so it never outranks a bucket that does
    return remaining / limit


def parse_rate_limits(headers: Mapping[str, str], *, now: datetime | None = None) -> RateLimits | None:
    """RateLimits from anthropic-ratelimit-* headers; None when the response carried none.

    Anthropic reports a request bucket and up to three token buckets: tokens-* (the most restrictive
    combined limit, when sent), input-tokens-* and output-tokens-*. The engine has one token bucket, so
    it gets the one that binds: tokens-* when present, else whichever of input/output has the smaller
    remaining fraction (input on a tie, as input is most of what a typical request spends).
    """
    h = _lower(headers)
    requests = _bucket(h, "requests", now)
    combined = _bucket(h, "tokens", now)
    if any(v is not None for v in combined):
        tokens = combined
    else:
        input_tokens = _bucket(h, "input-tokens", now)
        output_tokens = _bucket(h, "output-tokens", now)
        present = [b for b in (input_tokens, output_tokens) if any(v is not None for v in b)]
        tokens = min(present, key=_fraction_left) if present else (None, None, None)
    limits = RateLimits(*requests, *tokens)
    return None if limits == RateLimits() else limits


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: retry-after-ms, then retry-after as seconds or an HTTP date (the SDK's order)."""
    h = _lower(headers)
    ms = h.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(value) and value >= 0:
                return value
    raw = h.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    return value if math.isfinite(value) and value >= 0 else None


def parse_should_retry(headers: Mapping[str, str]) -> bool | None:
    """The server's own verdict (x-should-retry: true/false); None when it gave none."""
    value = _lower(headers).get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


# --- errors ------------------------------------------------------------------------------------------

# The HTTP status each documented error type comes with, for errored batch lines (which carry no status).
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def error_for_type(error_type: str | None, message: str) -> LLMError:
    """The pocketbatch error for an Anthropic error type; an unknown type is retryable (TransientError)."""
    status = ERROR_TYPE_STATUS.get(error_type or "")
    return error_for_status(status, message)


def translate_error(exc: BaseException) -> LLMError:
    """Every anthropic SDK exception as a pocketbatch LLMError, with retry_after and rate limits."""
    if isinstance(exc, anthropic.APIStatusError):
        headers = exc.response.headers
        status = exc.status_code
        error_type = exc.type
        detail = exc.api_message or exc.message
        request_id = f" (request-id {exc.request_id})" if exc.request_id else ""
        kwargs: dict[str, Any] = {
            "retry_after": parse_retry_after(headers),
            "rate_limits": parse_rate_limits(headers),
        }
        should_retry = parse_should_retry(headers)
        if status == 401:
            message = (
                f"anthropic rejected the API key (401 {error_type or 'authentication_error'}: {detail}); "
                f"check the {KEY_ENV_VAR} environment variable{request_id}"
            )
        else:
            message = f"anthropic {status} {error_type or 'error'}: {detail}{request_id}"
        if error_type == "overloaded_error":
            # Overloaded is temporary whatever status carried it (proxies rewrite 529 to 500 or 503).
            return TransientError(message, status=status, retryable=should_retry, **kwargs)
        return error_for_status(status, message, should_retry=should_retry, **kwargs)
    if isinstance(exc, anthropic.APITimeoutError):
        return TransientError("anthropic request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        return TransientError(f"could not reach anthropic: {exc.message}" + (f" ({cause})" if cause else ""))
    if isinstance(exc, anthropic.APIResponseValidationError):
        return LLMError(f"anthropic sent a reply this SDK cannot read: {exc.message}", status=exc.status_code)
    return LLMError(f"anthropic: {exc}")


def invalid_request_error(exc: InvalidRequest) -> RequestError:
    return RequestError(f"invalid anthropic request: {exc}")
