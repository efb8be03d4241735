"""The concurrent path: AnthropicProvider.call_llm_async against the emulator, with the real SDK."""

import asyncio

import anthropic
import pytest

from pocketbatch import (
    ConfigError,
    LLMRequest,
    LLMResponse,
    RateLimitError,
    RequestError,
    TransientError,
    Usage,
)
from pocketbatch_anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider

MODEL = "claude-haiku-4-5"


def ask(prompt="Say hi", **fields):
    return LLMRequest.from_prompt(prompt, MODEL, **fields)


async def test_reply_text_usage_and_metadata(provider, anthropic_emulator):
    reply = await provider.call_llm_async(ask("name three colours", system="Be brief."))
    assert isinstance(reply, LLMResponse)
    assert reply == "reply to: name three colours"
    assert reply.usage == Usage(input_tokens=5, output_tokens=5)  # words: 2 system + 3 prompt; 5 reply
    assert (reply.model, reply.provider, reply.via, reply.cost_usd) == (
        MODEL,
        "anthropic",
        "concurrent",
        None,
    )
    assert isinstance(reply.raw, anthropic.types.Message)
    assert reply.raw.id.startswith("msg_emu_")


async def test_params_sent(provider, anthropic_emulator):
    await provider.call_llm_async(
        ask(
            "hello",
            system="sys",
            temperature=0.2,
            max_tokens=50,
            options={"top_k": 5, "metadata": {"user_id": "u1"}},
        )
    )
    (body,) = anthropic_emulator.bodies("messages")
    assert body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "system": "sys",
        "max_tokens": 50,
        "temperature": 0.2,
        "top_k": 5,
        "metadata": {"user_id": "u1"},
    }


async def test_temperature_none_is_omitted_and_system_messages_become_system(provider, anthropic_emulator):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    reply = await provider.call_llm_async(LLMRequest.from_prompt(messages, MODEL))
    (body,) = anthropic_emulator.bodies("messages")
    assert "temperature" not in body
    assert body["system"] == "You are terse."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert reply == "reply to: again"


async def test_text_is_every_text_block_joined(provider, anthropic_emulator):
    anthropic_emulator.reply = lambda params: "one two"
    reply = await provider.call_llm_async(ask())
    assert reply.raw.content[0].text == "one two"
    assert reply == "one two"


async def test_cache_tokens_count_as_input_and_are_told_apart(provider, anthropic_emulator):
    anthropic_emulator.usage_extra = {"cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000}
    reply = await provider.call_llm_async(ask("a b c"))
    assert reply.raw.usage.input_tokens == 3
    assert reply.usage == Usage(
        input_tokens=1103, output_tokens=5, cache_read_tokens=1000, cache_write_tokens=100
    )


# --- max_tokens ---------------------------------------------------------------------------------------


async def test_default_max_tokens(provider, anthropic_emulator):
    await provider.call_llm_async(ask())
    assert anthropic_emulator.bodies("messages")[0]["max_tokens"] == DEFAULT_MAX_TOKENS == 4096


async def test_max_tokens_env_override_and_explicit_value_wins(provider, anthropic_emulator, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_ANTHROPIC_MAX_TOKENS", " 300 ")
    await provider.call_llm_async(ask())
    await provider.call_llm_async(ask(max_tokens=7))
    assert [b["max_tokens"] for b in anthropic_emulator.bodies("messages")] == [300, 7]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
async def test_bad_max_tokens_env_is_a_config_error(provider, anthropic_emulator, monkeypatch, value):
    monkeypatch.setenv("POCKETBATCH_ANTHROPIC_MAX_TOKENS", value)
    with pytest.raises(ConfigError, match="POCKETBATCH_ANTHROPIC_MAX_TOKENS") as info:
        await provider.call_llm_async(ask())
    assert repr(value) in str(info.value)
    assert anthropic_emulator.calls["messages"] == 0


async def test_max_tokens_cuts_the_reply(provider, anthropic_emulator):
    reply = await provider.call_llm_async(ask("a b c d e f", max_tokens=3))
    assert reply == "reply to: a"
    assert reply.raw.stop_reason == "max_tokens"


# --- requests refused before sending ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (LLMRequest(messages=[], model=MODEL), "messages is empty"),
        (LLMRequest(messages=[{"role": "system", "content": "only"}], model=MODEL), "messages is empty"),
        (ask(max_tokens=0), "max_tokens"),
        (ask(options={"stream": True}), "'stream'"),
        (ask(options={"model": "claude-opus-4-6"}), "'model'"),
        (ask(system="a", options={"system": "b"}), "system"),
        (ask(max_tokens=5, options={"max_tokens": 6}), "max_tokens"),
    ],
)
async def test_invalid_request_is_a_request_error_without_a_call(
    provider, anthropic_emulator, request_, problem
):
    with pytest.raises(RequestError, match=problem) as info:
        await provider.call_llm_async(request_)
    assert info.value.retryable is False
    assert anthropic_emulator.calls["messages"] == 0


async def test_missing_key_is_a_config_error_naming_the_variable(provider, anthropic_emulator, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        await provider.call_llm_async(ask())
    assert anthropic_emulator.calls["messages"] == 0


# --- errors -------------------------------------------------------------------------------------------


async def raises(provider, cls):
    with pytest.raises(cls) as info:
        await provider.call_llm_async(ask())
    return info.value


async def test_429_is_a_rate_limit_error_with_retry_after_and_limits(provider, anthropic_emulator):
    anthropic_emulator.fail_next(1, status=429, retry_after=3)
    err = await raises(provider, RateLimitError)
    assert (err.status, err.retry_after, err.retryable) == (429, 3.0, True)
    assert "rate_limit_error" in str(err)
    assert err.rate_limits.limit_requests == 50
    assert err.rate_limits.remaining_requests == 0
    assert 0 < err.rate_limits.reset_requests <= 3
    assert isinstance(err.__cause__, anthropic.RateLimitError)


async def test_retry_after_ms_wins_over_retry_after(provider, anthropic_emulator):
    anthropic_emulator.fail_next(1, status=429, retry_after=30, headers={"retry-after-ms": "1500"})
    err = await raises(provider, RateLimitError)
    assert err.retry_after == 1.5


async def test_529_is_transient(provider, anthropic_emulator):
    anthropic_emulator.fail_next(1, status=529)
    err = await raises(provider, TransientError)
    assert (err.status, err.retryable) == (529, True)
    assert "overloaded_error" in str(err)
    assert err.rate_limits is not None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
async def test_5xx_408_409_are_transient(provider, anthropic_emulator, status):
    anthropic_emulator.fail_next(1, status=status)
    err = await raises(provider, TransientError)
    assert (err.status, err.retryable) == (status, True)


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_overloaded_error_body_is_transient_whatever_the_status(provider, anthropic_emulator, status):
    anthropic_emulator.fail_next(1, status=status, error_type="overloaded_error")
    err = await raises(provider, TransientError)
    assert (err.status, err.retryable) == (status, True)


@pytest.mark.parametrize("status", [400, 403, 404, 413, 422])
async def test_other_4xx_are_request_errors(provider, anthropic_emulator, status):
    anthropic_emulator.fail_next(1, status=status)
    err = await raises(provider, RequestError)
    assert (err.status, err.retryable) == (status, False)


async def test_401_names_the_key_variable(provider, anthropic_emulator):
    anthropic_emulator.fail_next(1, status=401, message="invalid x-api-key")
    err = await raises(provider, RequestError)
    assert err.status == 401
    assert "ANTHROPIC_API_KEY" in str(err) and "invalid x-api-key" in str(err)


@pytest.mark.parametrize(
    ("status", "header", "cls", "retryable"),
    [
        (500, "false", TransientError, False),
        (529, "false", TransientError, False),
        (429, "false", RateLimitError, False),
        (400, "true", RequestError, True),
        (500, "TRUE", TransientError, True),
        (400, "maybe", RequestError, False),
    ],
)
async def test_x_should_retry_wins_over_the_status(
    provider, anthropic_emulator, status, header, cls, retryable
):
    anthropic_emulator.fail_next(1, status=status, headers={"x-should-retry": header})
    err = await raises(provider, cls)
    assert err.retryable is retryable


@pytest.mark.parametrize(("kind", "text"), [("timeout", "timed out"), ("connection", "could not reach")])
async def test_timeouts_and_connection_errors_are_transient(provider, anthropic_emulator, kind, text):
    anthropic_emulator.fail_next(1, status=kind)
    err = await raises(provider, TransientError)
    assert err.retryable is True and err.status is None
    assert text in str(err)


async def test_faults_are_used_up_in_order(provider, anthropic_emulator):
    anthropic_emulator.fail_next(2, status=429)
    anthropic_emulator.fail_next(1, status=500)
    await raises(provider, RateLimitError)
    await raises(provider, RateLimitError)
    await raises(provider, TransientError)
    assert await provider.call_llm_async(ask()) == "reply to: Say hi"
    assert anthropic_emulator.calls["messages"] == 4


async def test_a_reply_the_sdk_cannot_validate_is_not_retryable(provider, anthropic_emulator, monkeypatch):
    from pocketbatch import LLMError

    incomplete = {"type": "message", "id": "msg_x", "usage": {"input_tokens": 1, "output_tokens": 1}}
    monkeypatch.setattr(anthropic_emulator, "_message", lambda params: incomplete)
    with pytest.raises(LLMError) as info:
        await provider.call_llm_async(ask())
    assert type(info.value) is LLMError and info.value.retryable is False
    assert "cannot read" in str(info.value)


# --- clients ------------------------------------------------------------------------------------------


def test_client_is_cached_per_loop_key_and_base_url(monkeypatch):
    provider = AnthropicProvider()

    async def clients():
        first, again = provider.client(), provider.client()
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-other")
        other_key = provider.client()
        monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://proxy.example/anthropic")
        other_url = provider.client()
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
        monkeypatch.delenv("ANTHROPIC_BASE_URL")
        return first, again, other_key, other_url

    first, again, other_key, other_url = asyncio.run(clients())
    assert first is again
    assert len({id(first), id(other_key), id(other_url)}) == 3
    assert other_key.api_key == "sk-ant-other"
    assert str(other_url.base_url).startswith("https://proxy.example/anthropic")
    second_run = asyncio.run(clients())[0]
    assert second_run is not first, "a client must not be shared across asyncio.run calls"


def test_clients_of_finished_loops_are_dropped():
    provider = AnthropicProvider()

    async def client():
        return provider.client()

    kept = [asyncio.new_event_loop() for _ in range(2)]
    try:
        for loop in kept:
            loop.run_until_complete(client())
        kept[0].close()
        asyncio.run(client())
        assert kept[0] not in provider._clients
        assert kept[1] in provider._clients
    finally:
        kept[1].close()


async def test_clients_never_retry_and_take_options(monkeypatch):
    provider = AnthropicProvider(
        client_options={"_strict_response_validation": True, "max_retries": 5, "timeout": 9}
    )
    client = provider.client()
    assert client.max_retries == 0
    assert client._strict_response_validation is True
    assert client.timeout == 9
    assert str(client.base_url).rstrip("/") == "https://api.anthropic.com"


async def test_requests_follow_anthropic_base_url(monkeypatch):
    from pocketbatch_anthropic.testing import emulate_anthropic

    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://gateway.example/anthropic/")
    provider = AnthropicProvider(client_options={"_strict_response_validation": True})
    with emulate_anthropic() as emulator:
        assert await provider.call_llm_async(ask()) == "reply to: Say hi"
    assert emulator.requests[0].url == "https://gateway.example/anthropic/v1/messages"


def test_clients_are_closed_when_their_event_loop_ends(anthropic_emulator):
    provider = AnthropicProvider(client_options={"_strict_response_validation": True})
    seen = []

    async def call():
        await provider.call_llm_async(LLMRequest.from_prompt("hi", "claude-haiku-4-5"))
        seen.append(provider.client())
        assert not seen[-1].is_closed()

    asyncio.run(call())
    asyncio.run(call())
    assert seen[0] is not seen[1] and [c.is_closed() for c in seen] == [True, True]
