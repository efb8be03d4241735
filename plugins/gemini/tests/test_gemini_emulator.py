"""The emulator itself, as a user's tests meet it: the fixture's environment, faults, and no network."""

import sys

import httpx2
import pytest
import respx
from google import genai
from google.genai import errors, types

from pocketbatch_gemini.testing import GeminiEmulator


def client(**options):
    http = types.HttpOptions(httpx_async_client=httpx2.AsyncClient(), **options)
    return genai.Client(api_key="k", vertexai=False, http_options=http)


def test_the_fixture_sets_a_key_and_removes_the_others(gemini_emulator):
    import os

    assert os.environ["GEMINI_API_KEY"] == "gemini-test-emulator-key"
    assert "GOOGLE_API_KEY" not in os.environ and "GOOGLE_GEMINI_BASE_URL" not in os.environ


async def test_generate_follows_max_output_tokens_and_counts_tokens(gemini_emulator):
    reply = await client().aio.models.generate_content(
        model="gemini-2.5-flash", contents="one two three four", config={"max_output_tokens": 2}
    )
    assert reply.text == "Echo: one" and reply.candidates[0].finish_reason.value == "MAX_TOKENS"
    assert (reply.usage_metadata.prompt_token_count, reply.usage_metadata.candidates_token_count) == (4, 2)


async def test_a_request_without_a_key_or_contents_is_refused(gemini_emulator):
    url = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    async with httpx2.AsyncClient() as http:
        no_key = await http.post(url, json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
        no_contents = await http.post(url, json={"contents": []}, headers={"x-goog-api-key": "k"})
    assert no_key.status_code == 403 and no_key.json()["error"]["status"] == "PERMISSION_DENIED"
    assert no_contents.status_code == 400 and no_contents.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_faults_carry_retry_info_and_are_used_up_in_order(gemini_emulator):
    gemini_emulator.fail_next(1, status=429, retry_delay=1.5)
    gemini_emulator.fail_next(1, status=503)
    with pytest.raises(errors.ClientError) as caught:
        await client().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"
    (retry_info,) = [d for d in caught.value.details["error"]["details"] if "RetryInfo" in d["@type"]]
    assert retry_info["retryDelay"] == "1.5s"
    with pytest.raises(errors.ServerError) as caught:
        await client().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 503
    reply = await client().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert reply.text == "Echo: hi" and gemini_emulator.calls["generate"] == 3


async def test_server_rpm_answers_429_with_a_delay_once_the_burst_is_spent(gemini_emulator):
    gemini_emulator.server_rpm = 60
    c = client()
    for _ in range(2):
        await c.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 429 and "RetryInfo" in str(caught.value.details)


async def test_other_hosts_are_never_reached(gemini_emulator):
    with pytest.raises(respx.models.AllMockedAssertionError):
        await client(base_url="https://api.example.com").aio.models.generate_content(
            model="gemini-2.5-flash", contents="hi"
        )


async def test_runs_without_pytest_httpx2(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_httpx2", None)  # import pytest_httpx2 now fails
    with GeminiEmulator(base_url="https://gateway.example") as emulator:
        reply = await client(base_url="https://gateway.example").aio.models.generate_content(
            model="gemini-2.5-flash", contents="hi"
        )
    assert reply.text == "Echo: hi" and emulator.calls["generate"] == 1
    assert emulator._mock is None
