"""Asking with a schema: the prompt fallback for providers without structured output, and the rule that
turns an answer into `.parsed` or into that item's own error.

An answer is checked against the schema. A refusal and a truncated answer end the call at once
(RefusalError, TruncationError): asking again would be refused again or cut again. An answer that does not
validate is asked again, with its validation errors, up to POCKETBATCH_SCHEMA_RETRIES times, through the
concurrent path; then the call ends with a SchemaError. The response returned carries the usage and cost of
every attempt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable

from .config import settings
from .engine import events
from .errors import RefusalError, SchemaError, TruncationError
from .providers import LLMRequest, LLMResponse, Provider
from .schema import Invalid, Schema

Ask = Callable[[LLMRequest], Awaitable[LLMResponse]]


def prompt_instructions(schema: Schema) -> str:
    """What a provider without structured output gets in its system prompt instead."""
    return (
        "Answer with only a JSON value that matches this JSON schema: no prose, no Markdown fence. "
        "Every property is required; use null where the schema allows it and you have no value.\n"
        + json.dumps(schema.json, separators=(",", ":"))
    )


def with_schema(provider: Provider, request: LLMRequest, schema: Schema) -> LLMRequest:
    """The request carrying the schema: as LLMRequest.schema always, and in the system prompt as well
    for a provider that does not send schemas itself (a plugin written before schemas existed)."""
    provider.check_schema(schema.json)  # ConfigError naming the field, before anything is sent
    system = request.system
    if not provider.supports_schema:
        system = f"{system}\n\n{prompt_instructions(schema)}" if system else prompt_instructions(schema)
    return dataclasses.replace(request, schema=schema.json, system=system)


def reask_request(request: LLMRequest, text: str, errors: list[str]) -> LLMRequest:
    """The original request, the answer that failed, and what is wrong with it (instructor's re-ask)."""
    feedback = (
        "That answer does not match the JSON schema:\n"
        + "\n".join(f"- {e}" for e in errors[:20])
        + "\nAnswer again with only the corrected JSON."
    )
    messages = [*request.messages, {"role": "assistant", "content": text or "(empty)"}]
    messages.append({"role": "user", "content": feedback})
    return dataclasses.replace(request, messages=messages)


async def settle(
    provider: Provider, request: LLMRequest, schema: Schema, response: LLMResponse, ask: Ask
) -> LLMResponse:
    """`response` with `.parsed` set, after as many re-asks as it takes and is allowed; or the error."""
    retries = settings().schema_retries
    usage, cost, attempts = response.usage, response.cost_usd, 1
    name, model = provider.name, request.model
    while True:
        text = str(response)
        spent = {"usage": usage, "cost_usd": cost}
        if response.finish_reason == "refusal":
            err: Exception = RefusalError(
                f"{name}/{model} refused to answer the schema request: {text[:300]}", text=text, **spent
            )
        elif response.finish_reason == "length":
            err = TruncationError(
                f"{name}/{model} stopped at max_tokens before finishing the JSON answer "
                f"({response.usage.output_tokens} output tokens); raise max_tokens",
                text=text,
                **spent,
            )
        else:
            try:
                parsed = schema.validate(text)
            except Invalid as invalid:
                if attempts > retries:
                    err = SchemaError(
                        f"the answer of {name}/{model} still does not match the schema after {attempts} "
                        f"attempt{'s' if attempts != 1 else ''}: " + "; ".join(invalid.errors[:5]),
                        text=text,
                        errors=invalid.errors,
                        attempts=attempts,
                        **spent,
                    )
                else:
                    events.emit(
                        events.REASKED, name, model, attempt=attempts, error=invalid, via=response.via
                    )
                    response = await ask(reask_request(request, text, invalid.errors))
                    attempts += 1
                    usage = usage + response.usage
                    cost = _add(cost, response.cost_usd)
                    continue
            else:
                return response.replace(parsed=parsed, usage=usage, cost_usd=cost)
        events.emit(events.REJECTED, name, model, attempt=attempts, error=err, via=response.via)
        raise err


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)
