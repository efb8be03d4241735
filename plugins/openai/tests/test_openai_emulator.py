"""The emulator itself, driven with the raw openai SDK (strict validation), sync and async."""

import io
import json
import os
import sys

import openai
import pytest
import respx

from pocketbatch_openai.testing import OpenAIEmulator


def client(**options):
    return openai.OpenAI(api_key="sk-test", max_retries=0, _strict_response_validation=True, **options)


def upload(oa, lines):
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return oa.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")


def line(custom_id, prompt="hi", model="gpt-4o-mini"):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": prompt}]},
    }


def test_the_fixture_sets_a_key_and_removes_the_base_url(monkeypatch, request):
    monkeypatch.setenv("OPENAI_BASE_URL", "https://elsewhere.example/v1")
    emulator = request.getfixturevalue("openai_emulator")
    assert os.environ["OPENAI_API_KEY"] and "OPENAI_BASE_URL" not in os.environ
    reply = openai.OpenAI(max_retries=0, _strict_response_validation=True).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "Echo: hi" and emulator.calls["chat"] == 1


def test_chat_follows_max_tokens_and_counts_rate_limits(openai_emulator):
    oa = client()
    raw = oa.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "one two three four"}], max_tokens=2
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: one"
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "gpt-4.1"  # no snapshot configured for it
    assert raw.headers["x-ratelimit-remaining-requests"] == "499"
    oa.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "again"}])
    assert openai_emulator.calls["chat"] == 2 and len(openai_emulator.requests) == 2


def test_chat_rejects_a_body_without_messages(openai_emulator):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client().chat.completions.create(model="gpt-4o-mini", messages=[])


def test_custom_reply(openai_emulator):
    openai_emulator.reply = lambda body: f"{body['model']} answers"
    reply = client().chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "q"}])
    assert reply.choices[0].message.content == "o4-mini answers"


def test_faults_on_any_route(openai_emulator):
    oa = client()
    openai_emulator.fail_next(2, status=503, route="files.create")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            upload(oa, [line("a")])
    assert upload(oa, [line("a")]).purpose == "batch"
    openai_emulator.fail_next(1, timeout=True)
    with pytest.raises(openai.APITimeoutError):
        oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    openai_emulator.fail_next(1, status=429, code="insufficient_quota", headers={"x-custom": "1"})
    with pytest.raises(openai.RateLimitError) as caught:
        oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "insufficient_quota" and caught.value.response.headers["x-custom"] == "1"
    assert openai_emulator.calls["files.create"] == 3


def test_batch_lifecycle_with_the_sync_client(openai_emulator):
    oa = client()
    openai_emulator.error_ids = {"c"}
    file = upload(oa, [line(c, f"prompt {c}") for c in "abcd"])
    batch = oa.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    statuses = [batch.status]
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        batch = oa.batches.retrieve(batch.id)
        statuses.append(batch.status)
    assert statuses == ["validating", "in_progress", "finalizing", "completed"]
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        4,
        3,
        1,
    )
    out = [json.loads(x) for x in oa.files.content(batch.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in oa.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["a", "b", "d"]
    assert [x["custom_id"] for x in out] != ["a", "b", "d"]  # shuffled
    assert {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in out} == {
        "a": "Echo: prompt a",
        "b": "Echo: prompt b",
        "d": "Echo: prompt d",
    }
    assert err[0]["custom_id"] == "c" and err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert [b.id for b in oa.batches.list()] == [batch.id]
    assert oa.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert oa.files.delete(file.id).deleted and file.id in openai_emulator.deleted_files
    assert openai_emulator.batches_created == 1
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        oa.batches.cancel(batch.id)


async def test_batch_expiry_and_cancel_with_the_async_client(openai_emulator):
    oa = openai.AsyncOpenAI(api_key="sk-test", max_retries=0, _strict_response_validation=True)
    openai_emulator.expire_ids = {"b"}
    data = "".join(json.dumps(line(c)) + "\n" for c in "abc").encode()
    file = await oa.files.create(file=("in.jsonl", data), purpose="batch")
    expiring = await oa.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for _ in range(3):
        expiring = await oa.batches.retrieve(expiring.id)
    assert expiring.status == "expired"
    errors = (await oa.files.content(expiring.error_file_id)).text.splitlines()
    assert [json.loads(x)["error"]["code"] for x in errors] == ["batch_expired"]
    assert json.loads(errors[0])["response"] is None

    cancelled = await oa.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (await oa.batches.cancel(cancelled.id)).status == "cancelling"
    cancelled = await oa.batches.retrieve(cancelled.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.completed == 1
    assert [b.id async for b in oa.batches.list()] == [cancelled.id, expiring.id]


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([line("a"), line("a")], "duplicate_custom_id"),
        ([line("a"), line("b", model="gpt-4o")], "model_mismatch"),
        ([{**line("a"), "url": "/v1/embeddings"}], "url_mismatch"),
        ([], "empty_file"),
    ],
)
def test_the_emulator_fails_batches_the_real_api_would_fail(openai_emulator, lines, code):
    oa = client()
    file = oa.files.create(
        file=("in.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))),
        purpose="batch",
    )
    batch = oa.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = oa.batches.retrieve(batch.id)
    assert batch.status == "failed" and code in [e.code for e in batch.errors.data]


def test_fail_batch_and_unknown_ids(openai_emulator):
    oa = client()
    openai_emulator.fail_batch(errors=[{"code": "token_limit_exceeded", "message": "Too many tokens."}])
    file = upload(oa, [line("a")])
    batch = oa.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = oa.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.code, e.line, e.message) for e in batch.errors.data] == [
        ("token_limit_exceeded", None, "Too many tokens.")
    ]
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        oa.files.content("file-missing")
    with pytest.raises(openai.NotFoundError):
        oa.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError, match="Unknown request URL"):
        oa.models.list()


def test_other_hosts_are_never_reached(openai_emulator):
    with pytest.raises(respx.models.AllMockedAssertionError):
        client(base_url="https://api.example.com/v1").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )


def test_runs_without_pytest_httpx2(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_httpx2", None)  # import pytest_httpx2 now fails
    with OpenAIEmulator(base_url="https://gateway.example/openai/v1") as emulator:
        reply = client(base_url="https://gateway.example/openai/v1").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content == "Echo: hi" and emulator.calls["chat"] == 1
    assert emulator._mock is None
    assert "httpcore2-pocketbatch" in respx.mocks.Mocker.registry  # pocketbatch.testing.respx_mocker
