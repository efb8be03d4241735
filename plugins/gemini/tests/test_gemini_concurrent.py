"""The concurrent path: GeminiProvider.call_llm_async through the real google-genai SDK and the emulator."""

import asyncio

import pytest

from pocketbatch import ConfigError, LLMRequest, RateLimitError, RequestError, TransientError, Usage
from pocketbatch_gemini import GeminiProvider, generate_config, parse_retry_delay, to_contents


async def test_reply_text_usage_and_metadata(provider, gemini_emulator, make_request):
    reply = await provider.call_llm_async(make_request("Summarise: the cat sat"))

    assert reply == "Echo: Summarise: the cat sat"
    assert (reply.provider, reply.model, reply.via) == ("gemini", "gemini-2.5-flash", "concurrent")
    assert reply.usage == Usage(4, 5) and reply.raw.candidates[0].finish_reason.value == "STOP"
    assert gemini_emulator.calls["generate"] == 1
    (request,) = gemini_emulator.requests
    assert request.url.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert request.headers["x-goog-api-key"] == "gemini-test-emulator-key"


async def test_thinking_tokens_count_as_output(provider, gemini_emulator, make_request):
    gemini_emulator.thoughts_tokens = 40
    reply = await provider.call_llm_async(make_request("think about it"))
    assert reply.usage == Usage(3, 4 + 40)


async def test_thought_summaries_are_not_part_of_the_text(provider, gemini_emulator, make_request):
    gemini_emulator.thought_summary = "Let me think about the cat."
    reply = await provider.call_llm_async(
        make_request("the cat", options={"thinking_config": {"include_thoughts": True}})
    )
    assert reply == "Echo: the cat"
    assert [p.thought for p in reply.raw.candidates[0].content.parts] == [True, None]


async def test_system_roles_limits_and_options_are_mapped(provider, gemini_emulator):
    request = LLMRequest(
        messages=[
            {"role": "system", "content": "answer in French"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bonjour"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
        ],
        model="gemini-2.5-flash",
        system="be brief",
        max_tokens=2,
        temperature=0.25,
        options={"top_p": 0.5, "stop_sequences": ["END"], "seed": 7},
    )
    reply = await provider.call_llm_async(request)

    (body,) = gemini_emulator.bodies("generate")
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"text": "bonjour"}]},
        {"role": "user", "parts": [{"text": "and now?"}]},
    ]
    assert body["systemInstruction"]["parts"] == [{"text": "be brief\n\nanswer in French"}]
    assert body["generationConfig"] == {
        "maxOutputTokens": 2,
        "temperature": 0.25,
        "topP": 0.5,
        "stopSequences": ["END"],
        "seed": 7,
    }
    assert reply == "Echo: and" and reply.raw.candidates[0].finish_reason.value == "MAX_TOKENS"


async def test_none_fields_are_left_out(provider, gemini_emulator, make_request):
    await provider.call_llm_async(make_request("hi"))
    (body,) = gemini_emulator.bodies("generate")
    assert set(body) == {"contents"}


def test_mapping_refuses_what_gemini_cannot_take(make_request):
    with pytest.raises(ConfigError, match="sets 'model' itself"):
        generate_config(make_request(options={"model": "x"}))
    with pytest.raises(ConfigError, match="no 'tool' role"):
        to_contents(LLMRequest(messages=[{"role": "tool", "content": "x"}], model="m"))
    with pytest.raises(ConfigError, match="at least one user or assistant"):
        to_contents(LLMRequest(messages=[{"role": "system", "content": "x"}], model="m"))


async def test_429_with_a_retry_delay_is_a_rate_limit_error(provider, gemini_emulator, make_request):
    gemini_emulator.fail_next(1, status=429, retry_delay=31)
    with pytest.raises(RateLimitError) as caught:
        await provider.call_llm_async(make_request())
    err = caught.value
    assert err.status == 429 and err.retryable and err.retry_after == 31.0
    assert "RESOURCE_EXHAUSTED" in err.message and err.rate_limits is None  # Gemini reports no limits


async def test_429_without_a_delay_leaves_the_wait_to_the_engine(provider, gemini_emulator, make_request):
    gemini_emulator.fail_next(1, status=429)
    with pytest.raises(RateLimitError) as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [500, 503, 504])
async def test_server_errors_are_transient(provider, gemini_emulator, make_request, status):
    gemini_emulator.fail_next(1, status=status)
    with pytest.raises(TransientError) as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.status == status and caught.value.retryable
    assert gemini_emulator.calls["generate"] == 1  # the SDK's own retries are off


async def test_400_is_a_final_request_error(provider, gemini_emulator, make_request):
    gemini_emulator.fail_next(1, status=400, message="Invalid value at 'generation_config.temperature'")
    with pytest.raises(RequestError) as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.status == 400 and not caught.value.retryable
    assert "INVALID_ARGUMENT: Invalid value" in caught.value.message


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_name_the_key_variables(provider, gemini_emulator, make_request, status):
    gemini_emulator.fail_next(1, status=status)
    with pytest.raises(RequestError) as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.status == status and not caught.value.retryable
    assert "GEMINI_API_KEY or GOOGLE_API_KEY" in caught.value.message


async def test_an_invalid_key_answered_with_400_names_the_variables(
    provider, gemini_emulator, make_request, monkeypatch
):
    monkeypatch.setenv("GEMINI_API_KEY", "not-a-key")
    gemini_emulator.invalid_keys = {"not-a-key"}
    with pytest.raises(RequestError, match="GEMINI_API_KEY or GOOGLE_API_KEY") as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.status == 400


@pytest.mark.parametrize("fault", [{"timeout": True}, {"disconnect": True}])
async def test_timeouts_and_dropped_connections_are_transient(provider, gemini_emulator, make_request, fault):
    gemini_emulator.fail_next(1, **fault)
    with pytest.raises(TransientError) as caught:
        await provider.call_llm_async(make_request())
    assert caught.value.status is None and caught.value.retryable


async def test_missing_key_is_a_config_error_before_any_request(gemini_emulator, monkeypatch, make_request):
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        await GeminiProvider().call_llm_async(make_request())
    assert not gemini_emulator.requests


async def test_google_api_key_wins_as_in_the_sdk(provider, gemini_emulator, make_request, monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", "the-google-key")
    assert provider.has_key() and provider.api_key() == "the-google-key"
    await provider.call_llm_async(make_request())
    assert gemini_emulator.requests[0].headers["x-goog-api-key"] == "the-google-key"


async def test_requests_follow_google_gemini_base_url(monkeypatch, make_request):
    from pocketbatch_gemini.testing import GeminiEmulator

    monkeypatch.setenv("GEMINI_API_KEY", "k")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://localhost:8765")
    provider = GeminiProvider()
    assert provider.models == () and provider.accepts("my-own-model")
    with GeminiEmulator("http://localhost:8765") as local:
        reply = await provider.call_llm_async(make_request(model="my-own-model"))
    assert reply == "Echo: hello there" and local.calls["generate"] == 1


async def test_client_is_cached_per_loop_key_and_base_url(provider, monkeypatch):
    first = provider.client()
    assert provider.client() is first
    monkeypatch.setenv("GEMINI_API_KEY", "another")
    assert provider.client() is not first
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://localhost:1")
    assert len({id(provider.client()), id(first)}) == 2


def test_clients_do_not_cross_asyncio_run(gemini_emulator, make_request):
    provider = GeminiProvider()

    async def one():
        await provider.call_llm_async(make_request())
        return provider.client()

    first, second = asyncio.run(one()), asyncio.run(one())
    assert first is not second and gemini_emulator.calls["generate"] == 2


def test_client_options_cannot_turn_sdk_retries_on():
    provider = GeminiProvider(client_options={"retry_options": {"attempts": 5}, "timeout": 30_000})
    assert provider.client_options == {"timeout": 30_000}


@pytest.mark.parametrize(
    "details, seconds",
    [
        (
            {
                "error": {
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}]
                }
            },
            31,
        ),
        (
            {
                "error": {
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}]
                }
            },
            0.5,
        ),
        ({"error": {"details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure"}]}}, None),
        (
            {
                "error": {
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}]
                }
            },
            None,
        ),
        ({"error": {}}, None),
        ("not json", None),
    ],
)
def test_parse_retry_delay(details, seconds):
    assert parse_retry_delay(details) == seconds
