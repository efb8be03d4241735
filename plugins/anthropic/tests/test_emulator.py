"""The anthropic_emulator fixture on its own, driven by the bare SDK (sync and async, strict validation)."""

import json

import anthropic
import pytest
import respx

from pocketbatch_anthropic.testing import RESULT_TYPES, AnthropicEmulator, emulate_anthropic

MODEL = "claude-haiku-4-5"


@pytest.fixture
def client():
    return anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, _strict_response_validation=True)


def params(text="hi", **more):
    return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": text}], **more}


def test_messages_with_a_sync_client(client, anthropic_emulator):
    raw = client.messages.with_raw_response.create(**params("hello world"))
    message = raw.parse()
    assert message.content[0].text == "reply to: hello world"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 4)
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert raw.headers["anthropic-ratelimit-input-tokens-reset"].endswith("Z")
    assert raw.headers["request-id"].startswith("req_emu_")
    assert anthropic_emulator.calls == {"messages": 1}
    (recorded,) = anthropic_emulator.requests
    assert (recorded.route, recorded.method) == ("messages", "POST")
    assert recorded.url == "https://api.anthropic.com/v1/messages"
    assert recorded.body["messages"] == [{"role": "user", "content": "hello world"}]


def test_messages_without_max_tokens_are_refused_as_the_api_does(anthropic_emulator):
    # The SDK insists on max_tokens, so send a body the way a hand-rolled client would.
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(**params(), extra_body={"max_tokens": None})


def test_fault_shapes(client, anthropic_emulator):
    anthropic_emulator.fail_next(1, status=429)
    anthropic_emulator.fail_next(1, status=529)
    anthropic_emulator.fail_next(1, status=418, error_type="permission_error", message="nope")
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(**params())
    headers = limited.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        client.messages.create(**params())
    assert overloaded.value.response.headers["x-should-retry"] == "true"
    with pytest.raises(anthropic.APIStatusError) as teapot:
        client.messages.create(**params())
    assert (teapot.value.status_code, teapot.value.type, teapot.value.api_message) == (
        418,
        "permission_error",
        "nope",
    )
    assert client.messages.create(**params()).content[0].text == "reply to: hi"
    assert anthropic_emulator.calls["messages"] == 4


def test_fail_next_checks_its_arguments(anthropic_emulator):
    with pytest.raises(ValueError, match="route"):
        anthropic_emulator.fail_next(1, route="completions")
    with pytest.raises(ValueError, match="status"):
        anthropic_emulator.fail_next(1, status="slow")
    with pytest.raises(ValueError, match="results_for"):
        anthropic_emulator.results_for = {"a": "exploded"}


async def test_batch_lifecycle_with_an_async_client(anthropic_emulator):
    client = anthropic.AsyncAnthropic(api_key="sk-ant-test", max_retries=0, _strict_response_validation=True)
    anthropic_emulator.polls_until_ended = 1
    anthropic_emulator.results_for = {"b": "expired"}
    requests = [{"custom_id": c, "params": params(c)} for c in "abcd"]
    created = await client.messages.batches.create(requests=requests)
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 4
    assert (await client.messages.batches.retrieve(created.id)).processing_status == "in_progress"
    ended = await client.messages.batches.retrieve(created.id)
    assert ended.processing_status == "ended"
    assert ended.results_url == f"https://api.anthropic.com/v1/messages/batches/{created.id}/results"
    assert ended.ended_at is not None and ended.expires_at > ended.created_at
    lines = [line async for line in await client.messages.batches.results(created.id)]
    assert {line.custom_id: line.result.type for line in lines} == {
        "a": "succeeded",
        "b": "expired",
        "c": "succeeded",
        "d": "succeeded",
    }
    assert [line.custom_id for line in lines] != list("abcd")
    listed = await client.messages.batches.list()
    assert [b.id for b in listed.data] == [created.id]
    assert anthropic_emulator.batches[created.id].result_types()["b"] == "expired"


def test_results_are_jsonl_lines_with_newlines(client, anthropic_emulator):
    import httpx

    anthropic_emulator.polls_until_ended = 0
    batch = client.messages.batches.create(requests=[{"custom_id": c, "params": params(c)} for c in "xyz"])
    client.messages.batches.retrieve(batch.id)
    response = anthropic_emulator._results(None, batch_id=batch.id)
    assert isinstance(response, httpx.Response)
    assert response.headers["content-type"] == "application/x-jsonl"
    text = response.text
    assert text.endswith("\n") and text.count("\n") == 3
    assert sorted(json.loads(line)["custom_id"] for line in text.splitlines()) == ["x", "y", "z"]


def test_a_line_with_bad_params_errors_like_the_api(client, anthropic_emulator):
    anthropic_emulator.polls_until_ended = 0
    bad = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}  # no max_tokens
    batch = client.messages.batches.create(requests=[{"custom_id": "bad", "params": bad}])
    client.messages.batches.retrieve(batch.id)
    (line,) = list(client.messages.batches.results(batch.id))
    assert line.result.type == "errored"
    assert line.result.error.error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("requests", "status"),
    [
        ([{"custom_id": "a b", "params": params()}], 400),
        ([{"custom_id": "a", "params": params()}, {"custom_id": "a", "params": params()}], 400),
        ([], 400),
    ],
)
def test_create_refuses_what_the_api_refuses(client, anthropic_emulator, requests, status):
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.batches.create(requests=requests)
    assert info.value.status_code == status
    assert anthropic_emulator.batches_created == 0


def test_create_over_the_request_limit_is_413(client, anthropic_emulator):
    anthropic_emulator.max_batch_requests = 1
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.batches.create(requests=[{"custom_id": c, "params": params()} for c in "ab"])
    assert info.value.status_code == 413 and info.value.type == "request_too_large"


def test_unknown_endpoints_never_reach_the_network(client, anthropic_emulator):
    with pytest.raises((respx.models.AllMockedAssertionError, anthropic.APIConnectionError)) as info:
        client.models.list()
    assert "AllMockedAssertionError" in repr(info.value) + repr(info.value.__cause__)


def test_result_types_cover_the_documented_error_types():
    assert {
        "succeeded",
        "expired",
        "canceled",
        "invalid_request_error",
        "overloaded_error",
        "api_error",
    } <= set(RESULT_TYPES)


def test_emulate_anthropic_outside_pytest_fixtures(client):
    with emulate_anthropic(base_url="https://proxy.example") as emulator:
        assert isinstance(emulator, AnthropicEmulator)
        proxied = anthropic.Anthropic(
            api_key="k", base_url="https://proxy.example", max_retries=0, _strict_response_validation=True
        )
        assert proxied.messages.create(**params("via proxy")).content[0].text == "reply to: via proxy"
    assert emulator.requests[0].url == "https://proxy.example/v1/messages"


def test_the_emulator_class_is_a_context_manager():
    with AnthropicEmulator("https://gateway.example/anthropic") as emulator:
        proxied = anthropic.Anthropic(
            api_key="k", base_url="https://gateway.example/anthropic", max_retries=0
        )
        assert proxied.messages.create(**params()).content[0].text == "reply to: hi"
    assert emulator.calls == {"messages": 1}


@pytest.fixture
def shell_env(monkeypatch):
    """A developer shell with a real-looking key and a proxy, set before the emulator fixture runs."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://corporate-proxy.example")


def test_the_fixture_sets_a_test_key_and_drops_the_base_url(shell_env, anthropic_emulator):
    import os

    assert os.environ["ANTHROPIC_API_KEY"] == "sk-ant-emulator"
    assert "ANTHROPIC_BASE_URL" not in os.environ
    assert anthropic_emulator.base_url == "https://api.anthropic.com"
    anthropic.Anthropic(max_retries=0).messages.create(**params())
    assert anthropic_emulator.calls["messages"] == 1
