"""pocketbatch-anthropic: Claude through the official `anthropic` SDK, per call or as Message Batches."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

# The SDK is imported with the plugin, which pocketbatch loads at import: importing it on the first call
# would hold a running flow's event loop for about a second.
import anthropic
import httpx2
from anthropic import AsyncAnthropic

from pocketbatch import LLMRequest, LLMResponse, Provider, hookimpl
from pocketbatch.providers import CachePrice, close_with_loop

from .api import (
    DEFAULT_MAX_TOKENS,
    KEY_ENV_VAR,
    MAX_TOKENS_ENV_VAR,
    InvalidRequest,
    build_params,
    check_schema,
    default_max_tokens,
    invalid_request_error,
    parse_rate_limits,
    to_response,
    translate_error,
)
from .batch import AnthropicBatch

# One TLS context for every client: making one reads the CA bundle (~25 ms), which on a flow's first call
# would hold its event loop while requests the limiter already let out wait to be sent. For the same
# reason, the SDK's HTTP stack imports its asyncio backend now rather than on the first request.
_TLS = httpx2.create_ssl_context()
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio  # noqa: F401

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_TOKENS_ENV_VAR",
    "AnthropicBatch",
    "AnthropicProvider",
    "default_max_tokens",
    "register_providers",
]


class AnthropicProvider(Provider):
    """Anthropic's Messages API; `batch` is the Message Batches API (50% of the price, results within 24 h).

    `client_options` go to `anthropic.AsyncAnthropic` (e.g. `{"_strict_response_validation": True}` or
    `{"timeout": 30}`); `max_retries` is always 0, since the pocketbatch engine is the only retry layer.
    """

    name: ClassVar[str] = "anthropic"
    key_env_var: ClassVar[str | None] = KEY_ENV_VAR
    default_model: ClassVar[str] = "claude-haiku-4-5"
    # Current models: the names in anthropic 2.14's ModelParam, less claude-mythos-preview (past its
    # end of life, 2026-06-30). The Claude 3.x models and Opus/Sonnet 4.0-4.1 are retired and the SDK no
    # longer lists them. The core also accepts a dated snapshot or "-latest" of a listed name
    # (claude-haiku-4-5-20251001, claude-sonnet-4-5-20250929); any other name is a ConfigError before a
    # call, so a new model needs this list (and a release) to be usable.
    models: ClassVar[tuple[str, ...]] = (
        "claude-haiku-4-5",
        "claude-haiku-5-5",
        "claude-sonnet-5-5",
        "claude-sonnet-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",  # end of life 2026-11-30 (anthropic._data.deprecated_models)
        "claude-opus-5-5",
        "claude-opus-5",
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-opus-4-5",  # end of life 2027-01-22
        "claude-fable-5-2",
        "claude-fable-5-1",
        "claude-fable-5",
        "claude-mythos-5-2",
        "claude-mythos-5-1",
        "claude-mythos-5",
    )
    # Where the engine's learning starts: Anthropic's tier-1 limits (50 RPM, 50k input tokens a minute).
    # The anthropic-ratelimit-* headers on the first reply replace them with the account's real limits.
    # Structured outputs (output_config.format json_schema), on both paths.
    supports_schema: ClassVar[bool] = True
    rpm: ClassVar[float] = 50
    tpm: ClassVar[float] = 50_000
    # USD per million (input, output) tokens, as of 2026-11-25. Haiku 4.5, Sonnet 4.5/4.6 and Opus
    # 4.5/4.6 from Anthropic's pricing page (platform.claude.com/docs/about-claude/pricing); Opus 4.7/4.8
    # and Fable 5/Mythos 5 from their launch coverage (June 2026), not yet on the stored copy of that page.
    # A key also prices its dated snapshots (Provider.price). The models left out have no published price
    # found here: their cost_usd is None rather than a guess.
    prices: ClassVar[dict[str, tuple[float, float]]] = {
        "claude-haiku-4-5": (1.0, 5.0),
        "claude-sonnet-4-6": (3.0, 15.0),
        "claude-sonnet-4-5": (3.0, 15.0),
        "claude-opus-4-8": (5.0, 25.0),
        "claude-opus-4-7": (5.0, 25.0),
        "claude-opus-4-6": (5.0, 25.0),
        "claude-opus-4-5": (5.0, 25.0),
        "claude-fable-5": (10.0, 50.0),
        "claude-mythos-5": (10.0, 50.0),
    }
    # Prompt caching, per million tokens (read, 5-minute write, 1-hour write): a cache read costs 0.1
    # times the model's input price, a write to the 5-minute cache 1.25 times and a write to the 1-hour
    # cache 2 times (platform.claude.com/docs/about-claude/pricing, "Prompt caching"; the same
    # multipliers in its copies at docs.electronhub.ai/guides/prompt-caching and
    # claudecodeguides.com, read 2026-12-02 with the search tool). The usage of each reply splits its
    # writes by TTL (usage.cache_creation). The batch discount applies on top, as the multipliers stack.
    cache_prices: ClassVar[dict[str, CachePrice]] = {
        model: (round(inp * 0.1, 6), round(inp * 1.25, 6), round(inp * 2.0, 6))
        for model, (inp, _) in prices.items()
    }
    prices_date: ClassVar[str | None] = "2026-11-25"

    def __init__(self, *, client_options: Mapping[str, Any] | None = None) -> None:
        self.client_options = dict(client_options or {})
        self.batch = AnthropicBatch(self)
        # A client's pooled connections belong to the loop that opened them, so each event loop gets its
        # own clients; the weak key lets a finished asyncio.run's loop, and its clients, be collected.
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str | None, str | None], AsyncAnthropic]
        ] = weakref.WeakKeyDictionary()
        # The sync call_llm runs its own loop in another thread, so two threads may build clients at once.
        self._clients_lock = threading.Lock()

    def check_schema(self, schema: dict) -> None:
        check_schema(schema)

    def client(self) -> AsyncAnthropic:
        """The SDK client for the running event loop, key and base URL (ConfigError without a key)."""
        key = self.api_key()
        base_url = os.environ.get("ANTHROPIC_BASE_URL", "").strip() or None
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            per_loop = self._clients.get(loop)
            if per_loop is None:
                # A closed loop can outlive asyncio.run while something still references it; its
                # clients are useless, so drop them rather than keep their connections around.
                for old in [old for old in self._clients if old.is_closed()]:
                    del self._clients[old]
                per_loop = self._clients[loop] = {}
            client = per_loop.get((key, base_url))
            if client is None:
                options = {
                    "base_url": base_url,
                    "http_client": anthropic.DefaultAsyncHttpxClient(verify=_TLS),
                    **self.client_options,
                    "api_key": key,
                    "max_retries": 0,
                }
                client = per_loop[(key, base_url)] = AsyncAnthropic(**options)
                close_with_loop(client)  # closed when its loop ends, not dropped with open connections
        return client

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        try:
            params = build_params(request)
        except InvalidRequest as e:
            raise invalid_request_error(e) from None
        client = self.client()
        try:
            raw = await client.messages.with_raw_response.create(**_sdk_arguments(params))
            message = await raw.parse()
        except anthropic.AnthropicError as e:
            raise translate_error(e) from e
        return to_response(message, via="concurrent", rate_limits=parse_rate_limits(raw.headers))


@functools.cache
def _create_parameters() -> frozenset[str]:
    signature = inspect.signature(anthropic.resources.messages.AsyncMessages.create)
    return frozenset(signature.parameters) - {"self", "extra_headers", "extra_query", "extra_body", "timeout"}


def _sdk_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for messages.create that send exactly `params` as the body.

    anthropic 1.0 dropped temperature, top_p and top_k from create()'s signature although the API still
    takes them on the models that allow sampling; params the signature lacks travel in `extra_body`.
    """
    known = _create_parameters()
    arguments = {k: v for k, v in params.items() if k in known}
    extra = {k: v for k, v in params.items() if k not in known}
    if extra:
        arguments["extra_body"] = extra
    return arguments


@hookimpl
def register_providers(register) -> None:
    register(AnthropicProvider(), aliases=tuple(AnthropicProvider.models))
