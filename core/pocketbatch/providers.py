"""What a provider plugin implements (Provider, BatchAPI) and the values that cross that line."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import BatchError, ConfigError, LLMError

VIA = ("concurrent", "batch")


@dataclass(frozen=True)
class Usage:
    """Tokens one reply used. `input_tokens` counts every input token, cached or not (as OpenAI's
    prompt_tokens does); `cache_read_tokens` and `cache_write_tokens` say how many of them were read
    from or written to the provider's prompt cache, which it bills at their own rates.
    `cache_write_1h_tokens` says how many of the writes went to a longer-lived cache (Anthropic's
    1-hour cache), which costs more to write than the default one (its 5 minutes)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # Added later, after the fields above (a Usage is built positionally from journal rows): a part
    # of cache_write_tokens, never more.
    cache_write_1h_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
        )


@dataclass
class LLMRequest:
    messages: list[dict]
    model: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    options: dict = field(default_factory=dict)
    # The strict JSON schema the core derived from `schema=` (docs/structured-output.md); None for text.
    # A provider with supports_schema sends it as its structured-output parameter; others may ignore it,
    # because the core then also puts it in the prompt.
    schema: dict | None = None

    @classmethod
    def from_prompt(cls, prompt: str | list[dict], model: str, **fields: Any) -> LLMRequest:
        """A str prompt becomes one user message; a list of chat messages is taken as it is."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = list(prompt)
        else:
            raise TypeError(
                "prompt must be a str or a list of chat messages like "
                f'[{{"role": "user", "content": "..."}}], not {type(prompt).__name__}'
            )
        return cls(messages, model, **fields)  # positionally: keywords made this call twice as slow


@dataclass(frozen=True)
class RateLimits:
    """What the provider said about its limits on one response; None where it said nothing."""

    limit_requests: int | None = None  # per minute
    remaining_requests: int | None = None
    reset_requests: float | None = None  # seconds until the request window is full again
    limit_tokens: int | None = None  # per minute
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


_RESPONSE_FIELDS = (
    "usage",
    "model",
    "provider",
    "via",
    "cost_usd",
    "raw",
    "rate_limits",
    "finish_reason",
    "parsed",
)


class LLMResponse(str):
    """The text of a reply, so it joins and prints like the str the seed expects, plus what came with it."""

    # The fields in slots: a dict of them was 0.3 KiB of every response kept (a million results are
    # kept until a node's post). "__dict__" still takes any other attribute someone sets.
    __slots__ = (*_RESPONSE_FIELDS, "__dict__")

    usage: Usage
    model: str | None
    provider: str | None
    via: str
    cost_usd: float | None
    raw: Any
    rate_limits: RateLimits | None
    finish_reason: str | None  # "stop", "length" (max_tokens reached), "refusal"; None when not said
    parsed: Any  # the validated object of a `schema=` call; None without a schema

    def __new__(
        cls,
        text: str,
        *,
        usage: Usage | None = None,
        model: str | None = None,
        provider: str | None = None,
        via: str = "concurrent",
        cost_usd: float | None = None,
        raw: Any = None,
        rate_limits: RateLimits | None = None,
        finish_reason: str | None = None,
        parsed: Any = None,
    ) -> LLMResponse:
        self = super().__new__(cls, text)
        self.usage = usage or Usage()
        self.model, self.provider, self.via = model, provider, via
        self.cost_usd, self.raw, self.rate_limits = cost_usd, raw, rate_limits
        self.finish_reason, self.parsed = finish_reason, parsed
        return self

    def replace(self, **changes: Any) -> LLMResponse:
        """A copy with some fields changed (the text included, as `text=`)."""
        text = changes.pop("text", self)
        if not changes.keys() <= _FIELD_SET:
            unknown = ", ".join(sorted(changes.keys() - _FIELD_SET))
            raise TypeError(f"LLMResponse has no field {unknown}")
        # The fields copied as they are (the changes were checked above), not passed through __new__ again.
        copy = str.__new__(LLMResponse, text)
        for name in _RESPONSE_FIELDS:
            setattr(copy, name, changes[name] if name in changes else getattr(self, name))
        if copy.usage is None:  # as __new__ does
            copy.usage = Usage()
        if self.__dict__:  # attributes someone added
            copy.__dict__.update(self.__dict__)
        return copy

    def __reduce__(self):
        return _rebuild_response, (str(self), {k: getattr(self, k) for k in _RESPONSE_FIELDS})


_FIELD_SET = frozenset(_RESPONSE_FIELDS)


def _rebuild_response(text: str, fields: dict) -> LLMResponse:
    return LLMResponse(text, **fields)


@dataclass
class BatchStatus:
    state: str  # "running" | "cancelling" | "ended"
    counts: dict[str, int] = field(default_factory=dict)
    raw: Any = None


CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # Anthropic's rule; the engine's ids always match it


class BatchAPI:
    """A provider's batch endpoint: one job for many requests, usually at half the price."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    price_factor: float = 0.5

    @staticmethod
    def check_line(custom_id: Any, request: LLMRequest, seen: set[str], model: str, one_model: str) -> None:
        """What every batch API refuses of a line, as a BatchError (400) naming it: a custom_id outside
        ^[a-zA-Z0-9_-]{1,64}$, one seen before in this job (`seen` grows), or a model other than the
        job's; `one_model` says why a job holds one model."""
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise BatchError(f"custom_id {custom_id!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$", status=400)
        if custom_id in seen:
            raise BatchError(f"custom_id {custom_id!r} appears twice in one batch", status=400)
        seen.add(custom_id)
        if request.model != model:
            raise BatchError(
                f"custom_id {custom_id!r} asks for {request.model!r} but this batch is for {model!r}: "
                f"{one_model}",
                status=400,
            )

    def price_factor_for(self, model: str) -> float:
        """The price factor of `model`'s batch lines: `price_factor` unless the provider discounts only
        some models (Groq); 1.0 or more means no discount, and auto mode then runs the model concurrently."""
        return self.price_factor

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        """Start one job for (custom_id, request) pairs; return its id. BatchError if over the size limits."""
        raise NotImplementedError

    async def status(self, job_id: str) -> BatchStatus:
        raise NotImplementedError

    def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        """(custom_id, response or error) for every line the job produced, in any order."""
        raise NotImplementedError

    async def cancel(self, job_id: str) -> None:
        raise NotImplementedError

    # Added to the contract later; the defaults keep older plugins working (untagged, never found).

    async def submit_tagged(self, items: list[tuple[str, LLMRequest]], tag: str) -> str:
        """`submit`, keeping `tag` (at most 64 of `[a-zA-Z0-9_-]`) on the job where the API allows it
        (OpenAI: `metadata`), so that `find` can tell the job later. The default submits untagged."""
        return await self.submit(items)

    async def find(self, tag: str, items: list[tuple[str, LLMRequest]], since: float) -> str | None:
        """The id of a job created for exactly these items at or after `since` (epoch seconds, this
        machine's clock) whose id never reached the journal: the answer to the create call was lost, or
        the process died before writing it down. None when there is none, or when the API cannot tell.
        The engine asks before it submits the same items again. The default finds nothing.

        Raise BatchError when several jobs could be this one and nothing tells them apart, saying what
        the user should check: the engine then neither follows one nor submits again (either could pay
        twice); the items' calls fail with that error and the chunk's "submitting" row stays."""
        return None


# -- closing SDK clients with their event loop ----------------------------------------------------------

_closing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[list[Any], Any]] = (
    weakref.WeakKeyDictionary()
)
_closing_lock = threading.Lock()


def close_with_loop(client: Any) -> None:
    """Close `client` (anything with an async `close()` or `aclose()`: an SDK client) when the running
    event loop ends, instead of dropping it with its connections open ("unclosed" warnings).

    asyncio.run (and pytest-asyncio, and the sync call_llm loop at exit) finalizes the loop's async
    generators before closing it; one such generator per loop, left waiting, closes the loop's clients
    then, while the loop still runs."""
    loop = asyncio.get_running_loop()
    with _closing_lock:
        entry = _closing.get(loop)
        if entry is None:
            # A loop closed without finalizing its async generators never ran its closer: forget it
            # (the closer refers to its loop, so the entry would keep that loop alive).
            for old in [old for old in _closing if old.is_closed()]:
                del _closing[old]
            clients: list[Any] = []
            closer = _close_at_end(clients)
            # The first step registers it with the running loop (its async generator hooks) and stops
            # at the yield without awaiting anything, so it is taken here, synchronously.
            step = closer.asend(None)
            try:
                step.send(None)
            except StopIteration:
                pass
            entry = _closing[loop] = (clients, closer)
        entry[0].append(client)


async def _close_at_end(clients: list[Any]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for client in clients:
            close = getattr(client, "aclose", None) or getattr(client, "close", None)
            try:
                await close()
            except Exception:  # closing is best effort: the loop is ending either way
                pass
        clients.clear()
        with _closing_lock:  # the generator refers to its loop: let the loop go
            _closing.pop(asyncio.get_running_loop(), None)


_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)")


def same_model(name: str, base: str) -> bool:
    """True for the model itself and its dated snapshots or "-latest" (gpt-4o-mini-2024-07-18, ...)."""
    return name == base or (name.startswith(base) and _SNAPSHOT.fullmatch(name[len(base) :]) is not None)


# USD per million (cache read, cache write) tokens, or (cache read, cache write, 1-hour cache write) for
# a provider whose longer-lived cache costs more to write (Anthropic); a pair prices every write alike.
CachePrice = tuple[float, float] | tuple[float, float, float]


def usd(
    usage: Usage,
    price: tuple[float, float] | None,
    factor: float = 1.0,
    cache: CachePrice | None = None,
) -> float | None:
    """What usage costs at a price in USD per million (input, output) tokens, and `cache` per million
    (cache read, cache write[, 1-hour cache write]) tokens; None without a price. Without a cache
    price, cached tokens cost what other input tokens do (what the bill said before providers priced
    caching); without a 1-hour write price, 1-hour writes cost what other writes do."""
    if price is None:
        return None
    total = usage.input_tokens * price[0] + usage.output_tokens * price[1]
    if cache is not None and (usage.cache_read_tokens or usage.cache_write_tokens):
        write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        write_1h_price = cache[2] if len(cache) > 2 else cache[1]
        total += usage.cache_read_tokens * (cache[0] - price[0])
        total += (usage.cache_write_tokens - write_1h) * (cache[1] - price[0])
        total += write_1h * (write_1h_price - price[0])
    return total * factor / 1_000_000


_Price = TypeVar("_Price")


def _match(table: dict[str, _Price], model: str) -> _Price | None:
    if model in table:  # the longest match, as no longer key is a prefix of it: the case of nearly every call
        return table[model]
    matches = [k for k in table if same_model(model, k)]
    return table[max(matches, key=len)] if matches else None


class Provider:
    """Subclass it, set the class attributes, implement call_llm_async, and register an instance."""

    name: ClassVar[str]
    key_env_var: ClassVar[str | None] = None
    default_model: ClassVar[str]
    models: ClassVar[tuple[str, ...]] = ()
    rpm: ClassVar[float] = 0
    tpm: ClassVar[float] = 0
    max_concurrency: ClassVar[int] = 0
    prices: ClassVar[dict[str, tuple[float, float]]] = {}
    # Added later (the defaults keep older plugins working): USD per million (cache read, cache write)
    # tokens by model, matched as `prices` is, with a third number where 1-hour cache writes cost more
    # (CachePrice); and the day the price tables were checked ("2026-11-25"), shown by `pocketbatch
    # providers`.
    cache_prices: ClassVar[dict[str, CachePrice]] = {}
    prices_date: ClassVar[str | None] = None
    batch: BatchAPI | None = None
    # True: the provider sends LLMRequest.schema as its own structured-output parameter. False (any
    # plugin written before schemas): the core puts the schema in the prompt, and validates either way.
    supports_schema: ClassVar[bool] = False

    def check_schema(self, schema: dict) -> None:
        """Raise ConfigError naming the field when this provider cannot take a (strict) JSON schema;
        called once per call before anything is sent. The default takes any schema."""

    def api_key(self) -> str | None:
        """The key from key_env_var; a ConfigError naming the variable when it is unset."""
        if self.key_env_var is None:
            return None
        key = os.environ.get(self.key_env_var, "").strip()
        if not key:
            raise ConfigError(
                f"{self.name} needs an API key: set the {self.key_env_var} environment variable"
            )
        return key

    def has_key(self) -> bool:
        return self.key_env_var is None or bool(os.environ.get(self.key_env_var, "").strip())

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        raise NotImplementedError

    def accepts(self, model: str) -> bool:
        """Whether the provider serves this model name: any name when `models` is empty, else a listed
        model or a dated snapshot of one. Override it for other rules (a prefix, a server's own list)."""
        return not self.models or any(same_model(model, m) for m in self.models)

    def price(self, model: str) -> tuple[float, float] | None:
        """USD per million (input, output) tokens; a key matches the model or a dated snapshot of it."""
        return _match(self.prices, model)

    def cache_price(self, model: str) -> CachePrice | None:
        """USD per million (cache read, cache write[, 1-hour cache write]) tokens, matched as `price`
        is; None if unknown."""
        return _match(self.cache_prices, model)

    def cost(self, model: str, usage: Usage, factor: float = 1.0) -> float | None:
        """USD for usage at this provider's prices, times factor (the batch discount); None if unpriced."""
        return usd(usage, self.price(model), factor, self.cache_price(model))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
