"""How pocketbatch requests, replies and errors map to the Gemini API: shared by both paths."""

from __future__ import annotations

import os
import re
from typing import Any

import httpx2
from google.genai import errors as genai_errors

from pocketbatch import ConfigError, LLMRequest, Usage
from pocketbatch.errors import LLMError, error_for_status
from pocketbatch.schema import nodes

KEY_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's order: GOOGLE_API_KEY wins
BASE_URL_ENV_VAR = "GOOGLE_GEMINI_BASE_URL"
SDK_ERRORS = (
    genai_errors.APIError,
    httpx2.HTTPError,
)  # what an SDK call raises (transport errors pass through)
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
_RESERVED = ("model", "contents", "system_instruction")
_SCHEMA_OPTIONS = ("response_mime_type", "response_schema", "response_json_schema")

# Structured output is `response_json_schema` (JSON Schema) with `response_mime_type="application/json"`.
# What Gemini takes, from the field's own documentation in google-genai 3.6.1 (types.GenerateContentConfig.
# response_json_schema, the API's generationConfig.responseJsonSchema), checked 2026-12-02: only `$id`,
# `$defs`, `$ref`, `$anchor`, `type`, `format`, `title`, `description`, `enum` (strings and numbers),
# `items`, `prefixItems`, `minItems`, `maxItems`, `minimum`, `maximum`, `anyOf`, `oneOf`, `properties`,
# `additionalProperties`, `required` (and `propertyOrdering`) are supported; "cyclic references are
# unrolled to a limited degree and, as such, may only be used within non-required properties" (also
# discuss.ai.google.dev/t/recursive-schema-definition/68607). Other keywords are sent and not enforced
# by Gemini's decoding (pocketbatch still validates every answer and re-asks); `const` goes as a
# one-value `enum`, which Gemini does enforce.
SCHEMA_UNENFORCED = (
    "minLength", "maxLength", "pattern", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "uniqueItems", "allOf", "not", "if",
)  # fmt: skip

# Gemini's finish reasons (types.FinishReason) as pocketbatch's: "length" is a cut answer, "refusal" an
# answer withheld by a safety, policy or recitation filter. Others are passed on in lower case.
FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "refusal",
    "RECITATION": "refusal",
    "BLOCKLIST": "refusal",
    "PROHIBITED_CONTENT": "refusal",
    "SPII": "refusal",
    "IMAGE_SAFETY": "refusal",
    "IMAGE_PROHIBITED_CONTENT": "refusal",
    "IMAGE_RECITATION": "refusal",
    "MODEL_ARMOR": "refusal",
}


def to_contents(request: LLMRequest) -> list[dict[str, Any]]:
    """Chat messages as Gemini contents: assistant turns are `model` turns, system messages are left out
    (they join the system instruction). A content that is already a list of parts is kept as it is,
    except OpenAI-style `{"type": "text", "text": ...}` parts, which become `{"text": ...}`."""
    contents = []
    for message in request.messages:
        role = message.get("role")
        if role == "system":
            continue
        if role not in _ROLES:
            raise ConfigError(f"gemini has no {role!r} role: use user, assistant (or model) and system")
        contents.append({"role": _ROLES[role], "parts": _parts(message.get("content"))})
    if not contents:
        raise ConfigError("a gemini request needs at least one user or assistant message")
    return contents


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return [
            {"text": p.get("text", "")} if isinstance(p, dict) and p.get("type") == "text" else p
            for p in content
        ]
    return [{"text": "" if content is None else str(content)}]


def generate_config(request: LLMRequest) -> dict[str, Any]:
    """The GenerateContentConfig (snake_case, as the SDK takes it), the same for a concurrent call and a
    batch line: system instruction (with the text of any system messages), max_output_tokens,
    temperature, then `request.options` (its keys are GenerateContentConfig fields and win)."""
    options = dict(request.options)
    for reserved in _RESERVED:
        if reserved in options:
            raise ConfigError(f"the gemini provider sets {reserved!r} itself; remove it from the options")
    config: dict[str, Any] = {}
    system = [request.system] if request.system is not None else []
    system += [str(m.get("content", "")) for m in request.messages if m.get("role") == "system"]
    if system:
        config["system_instruction"] = "\n\n".join(system)
    if request.max_tokens is not None:
        config["max_output_tokens"] = request.max_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.schema is not None:
        given = [k for k in _SCHEMA_OPTIONS if k in options]
        if given:
            raise ConfigError(f"give either schema= or a {given[0]} option, not both")
        config["response_mime_type"] = "application/json"
        config["response_json_schema"] = gemini_schema(request.schema)
    config.update(options)
    return config


def gemini_schema(schema: Any) -> Any:
    """The strict schema as Gemini is sent it: every `const` becomes a one-value `enum` (Gemini enforces
    `enum` and ignores `const`); nothing else changes."""
    if isinstance(schema, list):
        return [gemini_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: gemini_schema(v) if k not in ("const", "enum") else v for k, v in schema.items()}
    if "const" in out and "enum" not in out:
        out["enum"] = [out.pop("const")]
    return out


def check_schema(schema: dict) -> None:
    """ConfigError, before any call, for what Gemini cannot take: a recursive schema (it unrolls cycles
    only through non-required properties, and a strict schema requires every property)."""
    defs = schema.get("$defs") or {}
    for name in defs:
        if _reaches(defs, name, name, set()):
            raise ConfigError(
                f"gemini cannot take this schema: {name!r} refers back to itself, and Gemini follows a "
                "recursive $ref only through optional properties (strict schemas make every property "
                "required)"
            )


def _reaches(defs: dict, start: str, target: str, seen: set[str]) -> bool:
    for _, node in nodes(defs[start]):
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            continue
        name = ref[len("#/$defs/") :]
        if name == target:
            return True
        if name in defs and name not in seen and _reaches(defs, name, target, seen | {name}):
            return True
    return False


def finish_reason(response: Any) -> str | None:
    """pocketbatch's finish reason for a GenerateContentResponse: the first candidate's, through
    FINISH_REASONS; "refusal" when the prompt itself was blocked (no candidate, a block_reason)."""
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        feedback = getattr(response, "prompt_feedback", None)
        return "refusal" if feedback is not None and feedback.block_reason else None
    reason = candidates[0].finish_reason
    if reason is None:
        return None
    name = str(getattr(reason, "value", reason))
    return FINISH_REASONS.get(name, name.lower())


def response_text(response: Any) -> str:
    """The text parts of the first candidate, thought summaries left out ("" when it has none)."""
    candidates = getattr(response, "candidates", None) or []
    content = candidates[0].content if candidates else None
    parts = (content.parts if content else None) or []
    return "".join(p.text for p in parts if p.text and not p.thought)


def usage_of(metadata: Any) -> Usage:
    """usage_metadata as Usage: thinking tokens are billed as output, so they count as output here."""
    if metadata is None:
        return Usage()
    output = (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)
    return Usage(metadata.prompt_token_count or 0, output)


_DELAY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)s\s*$")


def parse_retry_delay(details: Any) -> float | None:
    """Seconds from the `google.rpc.RetryInfo` detail of an error body (`"retryDelay": "31s"`)."""
    error = details.get("error", details) if isinstance(details, dict) else None
    for detail in (error or {}).get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DELAY.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _error_reasons(details: Any) -> set[str]:
    error = details.get("error", details) if isinstance(details, dict) else None
    return {
        str(d.get("reason"))
        for d in (error or {}).get("details") or []
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.rpc.ErrorInfo")
    }


def translate_error(e: Exception) -> LLMError:
    """The pocketbatch error for an SDK exception (or an httpx2 transport error the SDK let through)."""
    if isinstance(e, httpx2.TimeoutException):
        return error_for_status(None, f"Gemini request timed out: {e!r}")
    if isinstance(e, httpx2.HTTPError):
        return error_for_status(None, f"could not reach Gemini: {e!r}")
    if isinstance(e, genai_errors.APIError):
        message = f"{e.status or 'error'}: {e.message or e.details}"
        # Gemini answers a bad key with 400 API_KEY_INVALID, a missing permission with 401 or 403.
        if e.code in (401, 403) or "API_KEY_INVALID" in _error_reasons(e.details):
            where = os.environ.get(BASE_URL_ENV_VAR, "").strip() or "generativelanguage.googleapis.com"
            message += (
                f" (check the GEMINI_API_KEY or GOOGLE_API_KEY environment variable: {where} refused it)"
            )
        retry_after = parse_retry_delay(e.details) if e.code == 429 else None
        return error_for_status(e.code, message, retry_after=retry_after)
    return LLMError(f"{type(e).__name__}: {e}")
