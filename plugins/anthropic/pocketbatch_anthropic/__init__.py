"""pocketbatch-anthropic: Claude through the official `anthropic` SDK, per call or as Message Batches."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pocketbatch import LLMRequest, LLMResponse, Provider, hookimpl

from .api import (
    DEFAULT_MAX_TOKENS,
    KEY_ENV_VAR,
    MAX_TOKENS_ENV_VAR,
    InvalidRequest,
    build_params,
    default_max_tokens,
    invalid_request_error,
    parse_rate_limits,
    to_response,
    translate_error,
)
from .batch import AnthropicBatch

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_TOKENS_ENV_VAR",
    "AnthropicBatch",
    "AnthropicProvider",
    "ClaudeModels",
    "default_max_tokens",
    "register_providers",
]


class ClaudeModels(tuple):
    """The known Claude model names, for listing; `in` also accepts any other name starting "claude-".

    Anthropic publishes dated snapshots (claude-sonnet-4-5-20250929) and new models faster than this
    list can follow, so a "claude-" name is passed to the API, which answers an unknown one with a 404
    (a RequestError). A name that cannot be a Claude model, such as "gpt-4o", is refused before any call.
    """

    __slots__ = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (tuple.__contains__(self, name) or name.startswith("claude-"))


class AnthropicProvider(Provider):
    """Anthropic's Messages API; `batch` is the Message Batches API (50% of the price, results within 24 h).

    `client_options` go to `anthropic.AsyncAnthropic` (e.g. `{"_strict_response_validation": True}` or
    `{"timeout": 30}`); `max_retries` is always 0, since the pocketbatch engine is the only retry layer.
    """

    name: ClassVar[str] = "anthropic"
    key_env_var: ClassVar[str | None] = KEY_ENV_VAR
    default_model: ClassVar[str] = "claude-haiku-4-5"
    models: ClassVar[tuple[str, ...]] = ClaudeModels(
        (
            "claude-opus-4-8",
            "claude-opus-4-7",
            "claude-opus-4-6",
            "claude-opus-4-5",
            "claude-opus-4-5-20251101",
            "claude-opus-4-1",
            "claude-opus-4-1-20250805",
            "claude-opus-4-0",
            "claude-opus-4-20250514",
            "claude-sonnet-4-6",
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-0",
            "claude-sonnet-4-20250514",
            "claude-3-7-sonnet-latest",
            "claude-3-7-sonnet-20250219",
            "claude-haiku-4-5",
            "claude-haiku-4-5-20251001",
            "claude-3-5-haiku-latest",
            "claude-3-5-haiku-20241022",
            "claude-3-haiku-20240307",
        )
    )
    # Where the engine's learning starts: Anthropic's tier-1 limits (50 RPM, 50k input tokens a minute).
    # The anthropic-ratelimit-* headers on the first reply replace them with the account's real limits.
    rpm: ClassVar[float] = 50
    tpm: ClassVar[float] = 50_000
    # USD per million (input, output) tokens, from platform.claude.com/docs/about-claude/pricing as read on
    # 2026-11-25. A key also prices its dated snapshots and "-latest" (Provider.price). Models missing
    # from that page (claude-opus-4-7, claude-opus-4-8) stay unpriced: cost_usd None rather than a guess.
    prices: ClassVar[dict[str, tuple[float, float]]] = {
        "claude-opus-4-6": (5.0, 25.0),
        "claude-opus-4-5": (5.0, 25.0),
        "claude-opus-4-1": (15.0, 75.0),
        "claude-opus-4-0": (15.0, 75.0),
        "claude-opus-4": (15.0, 75.0),
        "claude-sonnet-4-6": (3.0, 15.0),
        "claude-sonnet-4-5": (3.0, 15.0),
        "claude-sonnet-4-0": (3.0, 15.0),
        "claude-sonnet-4": (3.0, 15.0),
        "claude-3-7-sonnet": (3.0, 15.0),
        "claude-haiku-4-5": (1.0, 5.0),
        "claude-3-5-haiku": (0.8, 4.0),
        "claude-3-haiku": (0.25, 1.25),
        "claude-3-opus": (15.0, 75.0),
    }

    def __init__(self, *, client_options: Mapping[str, Any] | None = None) -> None:
        self.client_options = dict(client_options or {})
        self.batch = AnthropicBatch(self)
        # A client's pooled connections belong to the loop that opened them, so each event loop gets its
        # own clients; the weak key lets a finished asyncio.run's loop, and its clients, be collected.
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str | None, str | None], AsyncAnthropic]
        ] = weakref.WeakKeyDictionary()

    def client(self) -> AsyncAnthropic:
        """The SDK client for the running event loop, key and base URL (ConfigError without a key)."""
        key = self.api_key()
        base_url = os.environ.get("ANTHROPIC_BASE_URL", "").strip() or None
        loop = asyncio.get_running_loop()
        per_loop = self._clients.get(loop)
        if per_loop is None:
            # A closed loop can outlive asyncio.run while something still references it; its clients
            # are useless, so drop them rather than keep their connections around.
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]
            per_loop = self._clients[loop] = {}
        client = per_loop.get((key, base_url))
        if client is None:
            import anthropic

            options = {"base_url": base_url, **self.client_options, "api_key": key, "max_retries": 0}
            client = per_loop[(key, base_url)] = anthropic.AsyncAnthropic(**options)
        return client

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        import anthropic

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
    import anthropic

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
