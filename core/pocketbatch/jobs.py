"""`pocketbatch run`: JSONL prompts in, JSONL results out in input order; one bad item loses no other."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import ConfigError
from .flow import AsyncParallelBatchNode
from .llm import build_request, call_llm_async
from .providers import LLMResponse

FIELDS = ("id", "prompt", "model", "system", "max_tokens", "temperature", "schema")


@dataclass
class Item:
    id: Any
    prompt: str | list[dict]
    options: dict[str, Any] = field(default_factory=dict)  # model, system, max_tokens, temperature, schema
    model: str = ""  # resolved "provider/model", for the output line even when the call failed


def read_items(
    lines: IO[str], *, model: str | None, system: str | None, schema: dict | None = None
) -> list[Item]:
    """Every line parsed and checked (models resolved, keys set, schemas compiled) before any call: bad
    input costs nothing. `schema` is the JSON schema for lines that give none."""
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, str):
            data = {"prompt": data}
        if not isinstance(data, dict):
            raise ConfigError(f"line {number}: expected a JSON string or object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(f"line {number}: unknown field {unknown[0]!r}; fields are {', '.join(FIELDS)}")
        prompt = data.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ConfigError(f'line {number}: "prompt" must be a non-empty string or a list of messages')
        options = {"model": data.get("model") or model, "system": data.get("system", system)}
        for name in ("max_tokens", "temperature"):
            if data.get(name) is not None:
                options[name] = data[name]
        line_schema = data.get("schema", schema)
        if line_schema is not None:
            if not isinstance(line_schema, dict):
                raise ConfigError(f'line {number}: "schema" must be a JSON-schema object')
            options["schema"] = line_schema
        try:
            provider, request = build_request(prompt, **options)  # unknown model, missing key: now, not later
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"line {number}: {e}") from None
        items.append(Item(data.get("id", number), prompt, options, f"{provider.name}/{request.model}"))
    if not items:
        raise ConfigError("the input has no items")
    return items


def result_line(item: Item, outcome: LLMResponse | BaseException) -> dict[str, Any]:
    if isinstance(outcome, LLMResponse):
        usage = {"input_tokens": outcome.usage.input_tokens, "output_tokens": outcome.usage.output_tokens}
        return {
            "id": item.id,
            "text": str(outcome),
            "model": f"{outcome.provider}/{outcome.model}",
            "via": outcome.via,
            "usage": usage,
            "cost_usd": outcome.cost_usd,
            "parsed": outcome.parsed,  # the validated object of a line with a schema, else null
            "error": None,
        }
    return {
        "id": item.id,
        "text": None,
        "model": item.model,
        "via": None,
        "usage": None,
        "cost_usd": None,
        "parsed": None,
        "error": {"type": type(outcome).__name__, "message": str(outcome)},
    }


class OrderedWriter:
    """Writes each result as soon as every earlier one is written, so a stopped run keeps its prefix."""

    def __init__(self, out: IO[str], items: list[Item]) -> None:
        self.out, self.items = out, items
        self.done: dict[int, dict[str, Any]] = {}
        self.written = 0
        self.failed = 0

    def add(self, index: int, outcome: LLMResponse | BaseException) -> None:
        self.done[index] = result_line(self.items[index], outcome)
        self.failed += isinstance(outcome, BaseException)
        while self.written in self.done:
            self.out.write(json.dumps(self.done.pop(self.written), ensure_ascii=False) + "\n")
            self.written += 1
        self.out.flush()


class RunItems(AsyncParallelBatchNode):
    """The CLI's own parallel node: each item is one call; its error is its result, never the run's."""

    def __init__(self, writer: OrderedWriter, mode: str | None) -> None:
        super().__init__(mode=mode)
        self.writer = writer

    async def prep_async(self, shared):
        return list(range(len(self.writer.items)))

    async def exec_async(self, index):
        item = self.writer.items[index]
        response = await call_llm_async(item.prompt, **item.options)
        self.writer.add(index, response)
        return response

    async def exec_fallback_async(self, index, exc):
        self.writer.add(index, exc)
        return exc
