"""pytest plugin for pocketbatch users: a fake provider and a fixture that registers providers for one test.

def test_summaries(register_provider):
    fake = register_provider(FakeProvider(replies=["short"]))
    assert asyncio.run(call_llm_async("hi", model="fake/any")) == "short"
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import pytest

from . import config, registry
from .errors import LLMError
from .hookspecs import hookimpl
from .plugins import pm
from .providers import BatchAPI, BatchStatus, LLMRequest, LLMResponse, Provider, Usage

Outcome = str | LLMResponse | BaseException


class FakeProvider(Provider):
    """A provider that answers from a script: queued outcomes first, then `reply(request)`.

    Every request it receives is kept in `.requests`; `batch=True` gives it an in-memory batch API.
    """

    default_model = "fake-model"

    def __init__(
        self,
        name: str = "fake",
        *,
        replies: Iterable[Outcome] = (),
        reply: Callable[[LLMRequest], Outcome] | None = None,
        latency: float = 0.0,
        models: tuple[str, ...] = (),
        key_env_var: str | None = None,
        batch: bool = False,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.name = name
        self.models, self.key_env_var = models, key_env_var
        self.prices = prices or {}
        self.latency = latency
        self.script = list(replies)
        self.reply = reply or (lambda request: f"reply to {request.messages[-1]['content']}")
        self.requests: list[LLMRequest] = []
        self.batch = FakeBatch(self) if batch else None

    def queue(self, *outcomes: Outcome) -> None:
        self.script.extend(outcomes)

    def answer(self, request: LLMRequest, via: str = "concurrent") -> LLMResponse | BaseException:
        outcome = self.script.pop(0) if self.script else self.reply(request)
        if isinstance(outcome, BaseException):
            return outcome
        if isinstance(outcome, LLMResponse):
            return outcome.replace(via=via)
        usage = Usage(sum(len(str(m.get("content", ""))) for m in request.messages), len(outcome))
        return LLMResponse(outcome, usage=usage, model=request.model, provider=self.name, via=via)

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        self.requests.append(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        outcome = self.answer(request)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class FakeBatch(BatchAPI):
    """An in-memory batch API: a job ends after `polls` status calls and returns its lines in reverse."""

    def __init__(self, provider: FakeProvider, polls: int = 1) -> None:
        self.provider, self.polls = provider, polls
        self.jobs: dict[str, dict] = {}
        self._ids = itertools.count(1)

    async def submit(self, items: list[tuple[str, LLMRequest]]) -> str:
        job_id = f"fake-batch-{next(self._ids)}"
        self.jobs[job_id] = {"items": list(items), "polls": 0, "cancelled": False}
        return job_id

    async def status(self, job_id: str) -> BatchStatus:
        job = self.jobs[job_id]
        job["polls"] += 1
        ended = job["cancelled"] or job["polls"] >= self.polls
        return BatchStatus("ended" if ended else "running", {"total": len(job["items"])})

    async def results(self, job_id: str) -> AsyncIterator[tuple[str, LLMResponse | LLMError]]:
        for custom_id, request in reversed(self.jobs[job_id]["items"]):
            self.provider.requests.append(request)
            yield custom_id, self.provider.answer(request, via="batch")

    async def cancel(self, job_id: str) -> None:
        self.jobs[job_id]["cancelled"] = True


def respx_mocker() -> str:
    """The name of a respx mocker that intercepts httpx2, the transport of the openai and anthropic SDKs
    (plain respx patches httpcore, so it sees nothing): pytest-httpx2's when it is installed, else an
    equivalent one registered here. Use it as `respx.mock(using=respx_mocker())`."""
    try:
        import pytest_httpx2  # noqa: F401  (importing it registers the "httpcore2" mocker)

        return "httpcore2"
    except ImportError:
        pass
    from respx.mocks import HTTPCoreMocker, Mocker

    name = "httpcore2-pocketbatch"
    if name not in Mocker.registry:

        class _HTTPCore2Mocker(HTTPCoreMocker):  # registers itself with respx under its name
            name = "httpcore2-pocketbatch"
            targets = [
                "httpcore2._sync.connection.HTTPConnection",
                "httpcore2._sync.connection_pool.ConnectionPool",
                "httpcore2._sync.http_proxy.HTTPProxy",
                "httpcore2._async.connection.AsyncHTTPConnection",
                "httpcore2._async.connection_pool.AsyncConnectionPool",
                "httpcore2._async.http_proxy.AsyncHTTPProxy",
            ]

    return name


async def ask_each(
    prompts: list,
    *,
    model: str | None = None,
    schema: Any = None,
    call_options: dict | None = None,
    **node_options,
) -> list:
    """Run one AsyncParallelBatchNode with one call_llm_async per prompt; each item's final error is
    its result, so a test can check every item: `await ask_each(["a", "b"], model="fake/x", mode="batch")`.
    `schema` and `call_options` (max_tokens, ...) go to every call."""
    from .flow import AsyncFlow, AsyncParallelBatchNode
    from .llm import call_llm_async

    class Ask(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return shared["prompts"]

        async def exec_async(self, prompt):
            return await call_llm_async(prompt, model=model, schema=schema, **(call_options or {}))

        async def exec_fallback_async(self, prompt, exc):
            return exc

        async def post_async(self, shared, prep_res, exec_res):
            shared["replies"] = exec_res

    shared = {"prompts": list(prompts)}
    await AsyncFlow(start=Ask(**node_options)).run_async(shared)
    return shared["replies"]


class MountedEmulator:
    """The running part of an API emulator: every request to `self.base_url` goes to `self._handle`
    (an httpx request in, an httpx response out) through respx, from `start()` to `stop()`, or for a
    `with` block. The OpenAI and Gemini plugins' emulators are built on it."""

    base_url: str
    _mock: Any = None

    def _handle(self, request: Any) -> Any:
        raise NotImplementedError

    def start(self: _E) -> _E:
        import respx

        self._mock = respx.mock(
            using=respx_mocker(), base_url=self.base_url, assert_all_called=False, assert_all_mocked=True
        )
        router = self._mock.__enter__()
        router.route().mock(side_effect=self._handle)
        return self

    def stop(self) -> None:
        if self._mock is not None:
            self._mock.__exit__(None, None, None)
            self._mock = None

    def __enter__(self: _E) -> _E:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_E = TypeVar("_E", bound=MountedEmulator)


@pytest.fixture(autouse=True)
def _pocketbatch_isolation(monkeypatch, tmp_path_factory, request):
    """Every test gets its own journal and offline batch folder, never the user's cache: a second run of
    a test would otherwise reuse the first run's journaled results. A test's own settings still win."""
    base = tmp_path_factory.getbasetemp() / f"pocketbatch-{request.node.nodeid.__hash__() & 0xFFFFFFFF:08x}"
    if "POCKETBATCH_JOURNAL" not in os.environ:
        monkeypatch.setenv("POCKETBATCH_JOURNAL", str(base / "journal.sqlite3"))
    if "POCKETBATCH_OFFLINE_DIR" not in os.environ:
        monkeypatch.setenv("POCKETBATCH_OFFLINE_DIR", str(base / "offline"))
    config.reload()
    yield
    monkeypatch.undo()
    config.reload()


@pytest.fixture
def register_provider():
    """register_provider(provider, aliases=()) registers a provider for this test only and returns it."""
    names = []

    def register(provider: Provider, aliases: tuple[str, ...] = ()) -> Provider:
        class Plugin:
            __name__ = f"test-provider-{provider.name}"

            @hookimpl
            def register_providers(self, register):
                register(provider, aliases=aliases)

        name = f"undo-test-provider-{provider.name}-{len(names)}"
        pm.register(Plugin(), name=name)
        names.append(name)
        registry.reset()
        return provider

    yield register
    for name in names:
        pm.unregister(name=name)
    registry.reset()


@pytest.fixture
def pocketbatch_env(monkeypatch):
    """pocketbatch_env(POCKETBATCH_MODE="batch", ...) sets variables for this test and re-reads settings."""

    def setenv(**variables: str) -> config.Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
        return config.reload()

    yield setenv
    monkeypatch.undo()
    config.reload()
