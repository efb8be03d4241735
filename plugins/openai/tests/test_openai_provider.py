"""The concurrent path: the real openai SDK (strict validation, no SDK retries) against the emulator."""

import asyncio
import gc
from importlib import metadata

import openai
import pytest

from pocketbatch import (
    ConfigError,
    LLMRequest,
    LLMResponse,
    Provider,
    RateLimitError,
    RateLimits,
    RequestError,
    TransientError,
    Usage,
)
from pocketbatch_openai import (
    MODELS,
    OpenAIProvider,
    chat_body,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
    register_providers,
)
from pocketbatch_openai.testing import OpenAIEmulator


async def test_chat_completion_round_trip(openai_provider, openai_emulator, make_request):
    response = await openai_provider.call_llm_async(make_request("hello there"))

    assert isinstance(response, LLMResponse)
    assert response == "Echo: hello there"
    assert response.usage == Usage(input_tokens=2, output_tokens=3)
    assert response.model == "gpt-4o-mini-2024-07-18"  # as the API reports it
    assert (response.provider, response.via, response.cost_usd) == ("openai", "concurrent", None)
    assert isinstance(response.raw, openai.types.chat.ChatCompletion)
    assert response.rate_limits == RateLimits(
        limit_requests=500,
        remaining_requests=499,
        reset_requests=0.12,
        limit_tokens=200_000,
        remaining_tokens=200_000 - 5,
        reset_tokens=360.0,
    )
    assert openai_emulator.calls["chat"] == 1


async def test_request_body_system_first_options_through_none_omitted(
    openai_provider, openai_emulator, make_request
):
    await openai_provider.call_llm_async(make_request("a"))
    await openai_provider.call_llm_async(
        make_request(
            "b",
            system="be brief",
            max_tokens=50,
            temperature=0.0,
            options={"seed": 7, "top_p": 0.5, "guided_choice": ["x", "y"]},
        )
    )
    plain, full = openai_emulator.bodies("chat")
    assert plain == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}]}
    assert full == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "b"}],
        "max_tokens": 50,
        "temperature": 0.0,
        "seed": 7,
        "top_p": 0.5,
        "guided_choice": ["x", "y"],  # unknown to the SDK: goes through extra_body
    }


@pytest.mark.parametrize("model", ["o3-mini", "o4-mini", "gpt-5-nano", "o1"])
async def test_reasoning_models_get_max_completion_tokens(
    openai_provider, openai_emulator, make_request, model
):
    await openai_provider.call_llm_async(make_request("x", model=model, max_tokens=20))
    (body,) = openai_emulator.bodies("chat")
    assert body["max_completion_tokens"] == 20 and "max_tokens" not in body


def test_chat_body_rules(make_request):
    body = chat_body(
        make_request(options={"extra_body": {"a": 1}, "extra_headers": {"h": "v"}, "timeout": 3})
    )
    assert body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "a": 1}
    with pytest.raises(ConfigError, match="'model'"):
        chat_body(make_request(options={"model": "other"}))
    with pytest.raises(ConfigError, match="'stream'"):
        chat_body(make_request(options={"stream": True}))
    # an explicit option wins over the mapping of max_tokens
    assert chat_body(make_request(max_tokens=5, options={"max_tokens": 9}))["max_tokens"] == 9


async def test_429_with_retry_after_ms(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=429, retry_after_ms=200)
    with pytest.raises(RateLimitError) as caught:
        await openai_provider.call_llm_async(make_request())
    err = caught.value
    assert (err.status, err.retryable, err.retry_after) == (429, True, 0.2)
    assert err.rate_limits.remaining_requests == 0 and err.rate_limits.limit_requests == 500
    # the fault is used up: the next call succeeds
    assert await openai_provider.call_llm_async(make_request()) == "Echo: hello there"
    assert openai_emulator.calls["chat"] == 2


async def test_retry_after_ms_wins_over_retry_after(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=429, retry_after=3)
    openai_emulator.fail_next(1, status=429, retry_after=3, retry_after_ms=1500)
    for expected in (3.0, 1.5):
        with pytest.raises(RateLimitError) as caught:
            await openai_provider.call_llm_async(make_request())
        assert caught.value.retry_after == expected


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
async def test_server_errors_are_transient(openai_provider, openai_emulator, make_request, status):
    openai_emulator.fail_next(1, status=status)
    with pytest.raises(TransientError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.status == status and caught.value.retryable
    assert caught.value.rate_limits is not None


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_client_errors_are_final(openai_provider, openai_emulator, make_request, status):
    openai_emulator.fail_next(1, status=status)
    with pytest.raises(RequestError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.status == status and not caught.value.retryable


async def test_401_names_the_key_variable(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=401)
    with pytest.raises(RequestError, match="OPENAI_API_KEY") as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.status == 401 and not caught.value.retryable


async def test_x_should_retry_wins_over_the_status(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=500, should_retry=False)
    openai_emulator.fail_next(1, status=400, should_retry=True)
    openai_emulator.fail_next(1, status=429, should_retry=False, retry_after_ms=100)
    with pytest.raises(TransientError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert not caught.value.retryable
    with pytest.raises(RequestError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.retryable
    with pytest.raises(RateLimitError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert not caught.value.retryable


async def test_insufficient_quota_is_not_retryable(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=429, code="insufficient_quota")
    with pytest.raises(RateLimitError, match="quota") as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.status == 429 and not caught.value.retryable


@pytest.mark.parametrize("fault", [{"timeout": True}, {"disconnect": True}])
async def test_timeouts_and_dropped_connections_are_transient(
    openai_provider, openai_emulator, make_request, fault
):
    openai_emulator.fail_next(1, **fault)
    with pytest.raises(TransientError) as caught:
        await openai_provider.call_llm_async(make_request())
    assert caught.value.retryable and caught.value.status is None


async def test_missing_key_is_a_config_error_before_any_request(openai_emulator, monkeypatch, make_request):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        await OpenAIProvider().call_llm_async(make_request())
    assert openai_emulator.requests == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1m30.5s", 90.5),
        ("1h2m3s", 3723.0),
        ("250us", 0.00025),
        ("0s", 0.0),
        ("20", 20.0),
        ("-1", None),
        ("", None),
        ("soon", None),
        ("5x", None),
        (None, None),
    ],
)
def test_parse_duration(value, seconds):
    if seconds is None:
        assert parse_duration(value) is None
    else:
        assert parse_duration(value) == pytest.approx(seconds)


def test_parse_rate_limits_missing_and_minus_one_are_none():
    headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "-1",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "-1",
        "x-ratelimit-reset-tokens": "1m30.5s",
    }
    assert parse_rate_limits(headers) == RateLimits(
        limit_requests=10000,
        remaining_requests=None,
        reset_requests=0.006,
        limit_tokens=None,
        remaining_tokens=None,
        reset_tokens=90.5,
    )
    assert parse_rate_limits({"x-request-id": "req_1"}) is None
    assert parse_rate_limits({"x-ratelimit-limit-requests": "-1"}) is None


def test_parse_retry_after():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({"retry-after": "whenever"}) is None
    assert parse_retry_after({}) is None


async def test_rate_limits_headers_from_the_server_reach_the_response(
    openai_provider, openai_emulator, make_request
):
    openai_emulator.rate_limits = {
        "x-ratelimit-limit-requests": "30",
        "x-ratelimit-remaining-requests": "29",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "-1",
        "x-ratelimit-remaining-tokens": "-1",
    }
    response = await openai_provider.call_llm_async(make_request())
    assert response.rate_limits == RateLimits(limit_requests=30, remaining_requests=29, reset_requests=2.0)


async def test_client_is_cached_within_a_loop(openai_provider, monkeypatch):
    first = openai_provider.client()
    assert openai_provider.client() is first
    assert first.max_retries == 0 and first._strict_response_validation
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another")
    assert openai_provider.client() is not first  # another key, another client
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")
    local = openai_provider.client()
    assert str(local.base_url) == "http://localhost:8000/v1/"


def test_clients_do_not_cross_asyncio_run(openai_emulator, make_request):
    provider = OpenAIProvider(client_options={"_strict_response_validation": True, "max_retries": 5})

    async def call():
        client = provider.client()
        assert client.max_retries == 0  # the engine is the only retry layer
        await provider.call_llm_async(make_request())
        return client

    first, second = asyncio.run(call()), asyncio.run(call())
    assert first is not second
    assert openai_emulator.calls["chat"] == 2
    del first, second
    gc.collect()
    assert len(provider._clients) == 0  # a finished loop's clients go with it


async def test_openai_base_url_serves_any_model_name(monkeypatch, make_request):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")
    provider = OpenAIProvider(client_options={"_strict_response_validation": True})
    assert provider.models == ()  # any name is accepted
    with OpenAIEmulator(base_url="http://localhost:8000/v1") as local:
        response = await provider.call_llm_async(make_request("hi", model="meta-llama/Llama-3.1-8B"))
    assert response.model == "meta-llama/Llama-3.1-8B" and local.calls["chat"] == 1
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert "gpt-4o-mini" in provider.models and "meta-llama/Llama-3.1-8B" not in provider.models


def test_provider_declaration():
    provider = OpenAIProvider()
    assert isinstance(provider, Provider)
    assert (provider.name, provider.key_env_var, provider.default_model) == (
        "openai",
        "OPENAI_API_KEY",
        "gpt-4o-mini",
    )
    assert provider.default_model in MODELS and provider.rpm > 0 and provider.tpm > 0
    assert provider.batch is not None and provider.batch.price_factor == 0.5
    # a dated snapshot costs what its model costs; gpt-4o's first snapshot has a price of its own
    assert provider.cost("gpt-4o-mini-2024-07-18", Usage(1_000_000, 1_000_000)) == pytest.approx(0.75)
    assert provider.price("gpt-4o-2024-05-13") == (5.0, 15.0)
    assert provider.price("gpt-4o-2024-08-06") == (2.5, 10.0)
    assert all(model in provider.prices for model in MODELS)


def test_hook_registers_the_provider_with_bare_aliases():
    registered = []
    register_providers(lambda provider, aliases=(): registered.append((provider, aliases)))
    (provider, aliases), (groq, groq_aliases), (together, together_aliases) = registered
    assert isinstance(provider, OpenAIProvider) and "gpt-4o-mini" in aliases and "o4-mini" in aliases
    # Groq and Together share the code; their names carry a maker, so they get no bare aliases.
    assert (groq.name, together.name) == ("groq", "together") and groq_aliases == together_aliases == ()
    assert isinstance(groq, OpenAIProvider) and isinstance(together, OpenAIProvider)


def test_entry_points():
    dist = metadata.distribution("pocketbatch-openai")
    points = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert points[("pocketbatch", "openai")] == "pocketbatch_openai"
    assert points[("pytest11", "pocketbatch_openai")] == "pocketbatch_openai.testing"


@pytest.fixture
def installed():
    """The plugin module registered with pocketbatch's plugin manager, as its entry point would."""
    import pocketbatch_openai
    from pocketbatch import registry
    from pocketbatch.plugins import pm

    pm.register(pocketbatch_openai, name="openai-under-test")
    registry.reset()
    yield registry
    pm.unregister(name="openai-under-test")
    registry.reset()


def test_model_names_resolve_through_the_registry(installed, monkeypatch):
    from pocketbatch.plugins import pm

    pm.check_pending()  # the hookimpl matches the published hookspec
    provider, name = installed.resolve("gpt-4o-mini")
    assert isinstance(provider, OpenAIProvider) and name == "gpt-4o-mini"
    assert installed.resolve("openai/gpt-4o-mini-2024-07-18")[1] == "gpt-4o-mini-2024-07-18"
    with pytest.raises(ConfigError, match="gpt-4o-typo"):
        installed.resolve("openai/gpt-4o-typo")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")
    assert installed.resolve("openai/llama3.1:8b") == (provider, "llama3.1:8b")


def test_clients_are_closed_when_their_event_loop_ends(openai_emulator, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    provider = OpenAIProvider(client_options={"_strict_response_validation": True})
    seen = []

    async def call():
        await provider.call_llm_async(LLMRequest.from_prompt("hi", "gpt-4o-mini"))
        seen.append(provider.client())
        assert not seen[-1].is_closed()

    asyncio.run(call())
    asyncio.run(call())
    assert seen[0] is not seen[1] and [c.is_closed() for c in seen] == [True, True]
