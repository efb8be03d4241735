"""call_llm_async and call_llm: what a node's code calls; the engine decides how the call runs."""

from __future__ import annotations

import asyncio
import atexit
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Union

from . import structured
from .engine import collector, concurrent
from .providers import LLMRequest, LLMResponse, Provider
from .registry import resolve
from .schema import compile_schema

if TYPE_CHECKING:
    from pydantic import BaseModel

# What `schema=` takes: a pydantic v2 model class, or a JSON-schema dict.
SchemaLike = Union["type[BaseModel]", Mapping[str, Any]]


def build_request(
    prompt: str | list[dict],
    *,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    schema: SchemaLike | None = None,
    options: dict[str, Any] | None = None,
):
    """The provider and request a call stands for; an unknown model, a missing key or a schema that is
    not usable with the provider is a ConfigError here. The request keeps `options` itself, not a copy
    (call_llm_async's own `**options` dict, made for this call)."""
    provider, name = resolve(model)
    provider.api_key()  # a missing key fails before any call, naming its variable
    request = LLMRequest.from_prompt(
        prompt,
        name,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        options={} if options is None else options,
    )
    if schema is not None:
        request = structured.with_schema(provider, request, compile_schema(schema))
    return provider, request


def call_llm_async(
    prompt: str | list[dict],
    *,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    schema: SchemaLike | None = None,
    **options: Any,
) -> Coroutine[Any, Any, LLMResponse]:
    """Ask a model; `model` is "provider/model", a bare name or alias, or None for POCKETBATCH_MODEL.

    Inside a parallel node the call joins its round, which goes concurrent or to the batch API as a whole.
    `schema` (a pydantic model class or a JSON-schema dict) asks for JSON: the response's `.parsed` is
    the validated object, and an answer that stays invalid is a SchemaError (docs/structured-output.md).

    Await what it returns, or hand it to create_task or gather. It is not an `async def`: inside a
    parallel node the call joins its round when made and what comes back is the round's future for it,
    so a waiting item holds no coroutine of pocketbatch's (a third of a KiB each, docs/parallel.md).
    """
    provider, request = build_request(
        prompt,
        model=model,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        schema=schema,
        options=options,
    )
    here = collector.current()
    if here is None:
        answer = concurrent.call(provider, request)
    else:
        answer = here[0].submit(here[1], provider, request)
    if schema is None:
        return answer
    return _structured(provider, request, schema, here, answer)


# What asyncio.iscoroutinefunction looks for, and on Python 3.12+ inspect.iscoroutinefunction too: code
# that decides from it whether to await a callable awaits call_llm_async.
if hasattr(asyncio.coroutines, "_is_coroutine"):  # gone with asyncio.iscoroutinefunction, in time
    call_llm_async._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
    inspect.markcoroutinefunction(call_llm_async)


async def _structured(
    provider: Provider,
    request: LLMRequest,
    schema: SchemaLike,
    here: tuple[collector.Round, int] | None,
    answer: Awaitable[LLMResponse],
) -> LLMResponse:
    response = await answer
    return await structured.settle(
        provider, request, compile_schema(schema), response, _reasker(here, provider)
    )


def _reasker(
    here: tuple[collector.Round, int] | None, provider: Provider
) -> Callable[[LLMRequest], Awaitable[LLMResponse]]:
    """How a schema re-ask is sent: never as a batch job, since one item is waiting on it."""

    async def reask(again: LLMRequest) -> LLMResponse:
        if here is None:
            return await concurrent.call(provider, again)
        return await here[0].submit(here[1], provider, again, mode="concurrent")

    return reask


def call_llm(
    prompt: str | list[dict],
    *,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    schema: SchemaLike | None = None,
    **options: Any,
) -> LLMResponse:
    """The sync twin of call_llm_async, for sync nodes (also inside an AsyncFlow's running loop)."""
    # Made and run in this context less its round: a sync node in a parallel flow's branch runs in the
    # branch's task, whose round belongs to another loop than the one that sends this call.
    here = collector.outside_rounds()
    coro = here.run(
        call_llm_async,
        prompt,
        model=model,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        schema=schema,
        **options,
    )
    return here.run(asyncio.run_coroutine_threadsafe, coro, _sync_loop()).result()


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _sync_loop() -> asyncio.AbstractEventLoop:
    # One long-lived loop in a daemon thread: SDK clients and limiters stay warm across sync calls, and a
    # sync node inside an AsyncFlow (whose loop is busy running it) can still wait for its answer.
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="pocketbatch-sync", daemon=True).start()
            atexit.register(_end_sync_loop, _loop)
    return _loop


def _end_sync_loop(loop: asyncio.AbstractEventLoop) -> None:
    """At exit, end the sync loop as asyncio.run ends its own: its async generators are finalized, which
    closes the SDK clients made in it (providers.close_with_loop)."""
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=10)
        except Exception:  # a loop stuck in a call: leave it, the process is ending
            pass
