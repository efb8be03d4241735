"""The batch path: OpenAIBatch against the emulator, through the real SDK with strict validation."""

import json
import math

import pytest

from pocketbatch import BatchError, LLMResponse, RateLimitError, RequestError, TransientError, Usage
from pocketbatch_openai import OpenAIProvider


def items_for(make_request, ids, model="gpt-4o-mini", **fields):
    return [(custom_id, make_request(f"prompt {custom_id}", model=model, **fields)) for custom_id in ids]


async def run_to_end(batch, job_id, limit=20):
    states = []
    for _ in range(limit):
        status = await batch.status(job_id)
        states.append((status.state, status.raw.status))
        if status.state == "ended":
            return states, status
    raise AssertionError(f"the job never ended: {states}")


async def collect(batch, job_id):
    return [pair async for pair in batch.results(job_id)]


async def test_round_trip_out_of_order_with_error_and_expired_lines(
    openai_provider, openai_emulator, make_request
):
    batch = openai_provider.batch
    ids = [f"item-{i}" for i in range(8)]
    openai_emulator.error_ids = {"item-2"}
    openai_emulator.server_error_ids = {"item-5"}
    openai_emulator.expire_ids = {"item-6", "item-7"}

    job_id = await batch.submit(items_for(make_request, ids, max_tokens=100))
    states, final = await run_to_end(batch, job_id)

    assert states == [
        ("running", "in_progress"),
        ("running", "finalizing"),
        ("ended", "expired"),
    ]
    assert final.counts == {"total": 8, "completed": 4, "failed": 4}
    pairs = await collect(batch, job_id)
    got = dict(pairs)
    assert sorted(got) == ids and len(pairs) == 8
    assert [custom_id for custom_id, _ in pairs] != ids  # the API's order, not ours
    for custom_id in ("item-0", "item-1", "item-3", "item-4"):
        response = got[custom_id]
        assert isinstance(response, LLMResponse) and response == f"Echo: prompt {custom_id}"
        assert (response.via, response.provider, response.model) == (
            "batch",
            "openai",
            "gpt-4o-mini-2024-07-18",
        )
        assert response.usage == Usage(2, 3) and response.raw["object"] == "chat.completion"
    assert isinstance(got["item-2"], RequestError) and not got["item-2"].retryable
    assert got["item-2"].status == 400 and "item-2" in got["item-2"].message
    assert (
        isinstance(got["item-5"], TransientError) and got["item-5"].retryable and got["item-5"].status == 500
    )
    for custom_id in ("item-6", "item-7"):
        assert isinstance(got[custom_id], TransientError) and got[custom_id].retryable
        assert "expired" in got[custom_id].message


async def test_the_uploaded_file_holds_one_chat_request_per_line(
    openai_provider, openai_emulator, make_request
):
    items = items_for(make_request, ["a", "b"], system="be brief", temperature=0.5, options={"seed": 3})
    job_id = await openai_provider.batch.submit(items)

    (create,) = openai_emulator.bodies("batches.create")
    assert create["endpoint"] == "/v1/chat/completions" and create["completion_window"] == "24h"
    input_file = openai_emulator.files[create["input_file_id"]]
    assert input_file["object"]["purpose"] == "batch" and input_file["object"]["filename"] == "batch.jsonl"
    lines = [json.loads(line) for line in input_file["content"].decode().splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines)
    # the body is exactly what the concurrent path sends
    await openai_provider.call_llm_async(items[0][1])
    assert lines[0]["body"] == openai_emulator.bodies("chat")[0]
    assert lines[0]["body"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert job_id in openai_emulator.batches


async def test_completed_batch_with_everything_in_the_error_file(
    openai_provider, openai_emulator, make_request
):
    openai_emulator.error_ids = {"a", "b"}
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a", "b"]))
    _, final = await run_to_end(openai_provider.batch, job_id)
    assert final.raw.status == "completed" and final.raw.output_file_id is None
    got = dict(await collect(openai_provider.batch, job_id))
    assert set(got) == {"a", "b"} and all(isinstance(e, RequestError) for e in got.values())


async def test_input_file_is_deleted_after_results_and_outputs_are_kept(
    openai_provider, openai_emulator, make_request
):
    openai_emulator.error_ids = {"b"}
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a", "b"]))
    await run_to_end(openai_provider.batch, job_id)
    batch = openai_emulator.batches[job_id]
    assert openai_emulator.deleted_files == []
    await collect(openai_provider.batch, job_id)
    assert openai_emulator.deleted_files == [batch["input_file_id"]]
    assert (
        batch["output_file_id"] in openai_emulator.files and batch["error_file_id"] in openai_emulator.files
    )
    # reading again still works (the output files are kept); deleting the input again (404) is ignored
    assert len(await collect(openai_provider.batch, job_id)) == 2
    assert openai_emulator.deleted_files == [batch["input_file_id"]]


async def test_results_of_a_running_job_keep_its_input_file(openai_provider, openai_emulator, make_request):
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a"]))
    assert await collect(openai_provider.batch, job_id) == []
    assert openai_emulator.deleted_files == []


async def test_a_new_process_finds_the_input_file_from_the_job(
    openai_provider, openai_emulator, make_request
):
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a"]))
    after_crash = OpenAIProvider(client_options={"_strict_response_validation": True})
    await run_to_end(after_crash.batch, job_id)
    assert len(await collect(after_crash.batch, job_id)) == 1
    assert openai_emulator.deleted_files == [openai_emulator.batches[job_id]["input_file_id"]]


@pytest.mark.parametrize(
    ("ids", "change", "problem"),
    [
        (["ok", "has space"], None, "'has space' does not match"),
        (["ok", "x" * 65], None, "does not match"),
        (["dup", "dup"], None, "'dup' appears twice"),
        (["a", "b"], {"model": "gpt-4o"}, "'b' asks for 'gpt-4o'"),
        (["a", "b"], {"messages": []}, "'b' has no chat messages"),
        (["a", "b"], {"options": {"metadata": object()}}, "'b' cannot be sent as JSON"),
        (["a", "b"], {"temperature": math.nan}, "'b' cannot be sent as JSON"),
    ],
)
async def test_invalid_lines_are_rejected_before_upload(
    openai_provider, openai_emulator, make_request, ids, change, problem
):
    items = items_for(make_request, ids)
    if change:
        for name, value in change.items():
            setattr(items[1][1], name, value)
    with pytest.raises(BatchError, match=problem) as caught:
        await openai_provider.batch.submit(items)
    assert caught.value.status == 400
    assert openai_emulator.requests == []  # nothing uploaded, nothing paid


async def test_an_empty_batch_is_refused(openai_provider, openai_emulator):
    with pytest.raises(BatchError) as caught:
        await openai_provider.batch.submit([])
    assert caught.value.status == 400 and openai_emulator.requests == []


async def test_too_many_requests_is_413(openai_provider, openai_emulator, make_request):
    openai_provider.batch.max_requests = 3
    with pytest.raises(BatchError, match="4 requests") as caught:
        await openai_provider.batch.submit(items_for(make_request, "abcd"))
    assert caught.value.status == 413 and openai_emulator.requests == []
    assert await openai_provider.batch.submit(items_for(make_request, "abc"))


async def test_the_exact_size_limit_is_413(openai_provider, openai_emulator, make_request):
    items = items_for(make_request, ["a", "b", "c"])
    size = len(openai_provider.batch.jsonl(items))
    openai_provider.batch.max_bytes = size - 1
    with pytest.raises(BatchError, match=f"{size:,} bytes") as caught:
        await openai_provider.batch.submit(items)
    assert caught.value.status == 413 and openai_emulator.calls["files.create"] == 0
    openai_provider.batch.max_bytes = size  # exactly at the limit is fine
    await openai_provider.batch.submit(items)
    assert openai_emulator.calls["files.create"] == 1
    (create,) = openai_emulator.bodies("batches.create")
    assert openai_emulator.files[create["input_file_id"]]["object"]["bytes"] == size


def test_batch_limits():
    batch = OpenAIProvider().batch
    assert (batch.max_requests, batch.max_bytes, batch.price_factor) == (50_000, 200_000_000, 0.5)


async def test_cancel_keeps_partial_output(openai_provider, openai_emulator, make_request):
    batch = openai_provider.batch
    ids = ["a", "b", "c", "d"]
    job_id = await batch.submit(items_for(make_request, ids))
    assert (await batch.status(job_id)).state == "running"
    await batch.cancel(job_id)
    assert openai_emulator.calls["batches.cancel"] == 1
    assert openai_emulator.deleted_files == [openai_emulator.batches[job_id]["input_file_id"]]
    assert openai_emulator.batches[job_id]["status"] == "cancelling"
    states, final = await run_to_end(batch, job_id)
    assert states == [("ended", "cancelled")]
    got = dict(await collect(batch, job_id))
    assert sorted(got) == ids
    done = [c for c in ids if isinstance(got[c], LLMResponse)]
    cancelled = [c for c in ids if isinstance(got[c], TransientError)]
    assert done == ["a", "b"] and cancelled == ["c", "d"]
    assert all(got[c].retryable and "cancelled" in got[c].message for c in cancelled)
    assert final.counts == {"total": 4, "completed": 2, "failed": 2}


async def test_a_cancelling_job_reports_cancelling(openai_provider, openai_emulator, make_request):
    openai_emulator.polls_per_state = 2  # every state, cancelling included, lasts two polls
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a", "b"]))
    await openai_provider.batch.cancel(job_id)
    states, _ = await run_to_end(openai_provider.batch, job_id)
    assert states == [("cancelling", "cancelling"), ("ended", "cancelled")]


async def test_a_failed_job_raises_with_the_providers_reasons(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_batch(
        errors=[
            {"code": "token_limit_exceeded", "message": "Enqueued token limit reached for gpt-4o-mini."},
            {"code": "invalid_request", "line": 2, "message": "Bad line."},
        ]
    )
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a", "b"]))
    with pytest.raises(BatchError) as caught:
        await openai_provider.batch.status(job_id)
    message = caught.value.message
    assert job_id in message and "token_limit_exceeded: Enqueued token limit" in message
    assert "line 2: invalid_request: Bad line." in message
    assert openai_emulator.deleted_files == [openai_emulator.batches[job_id]["input_file_id"]]


async def test_a_failed_poll_is_a_retryable_error(openai_provider, openai_emulator, make_request):
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a"]))
    openai_emulator.fail_next(1, status=429, route="batches.retrieve", retry_after=2)
    with pytest.raises(RateLimitError) as caught:
        await openai_provider.batch.status(job_id)
    assert caught.value.retryable and caught.value.retry_after == 2.0
    _, final = await run_to_end(openai_provider.batch, job_id)
    assert final.state == "ended"


async def test_a_failed_download_is_a_retryable_error(openai_provider, openai_emulator, make_request):
    job_id = await openai_provider.batch.submit(items_for(make_request, ["a"]))
    await run_to_end(openai_provider.batch, job_id)
    openai_emulator.fail_next(1, status=500, route="files.content")
    with pytest.raises(TransientError):
        await collect(openai_provider.batch, job_id)
    assert openai_emulator.deleted_files == []  # not read yet: keep the job whole
    assert len(await collect(openai_provider.batch, job_id)) == 1


async def test_unknown_job_is_a_request_error(openai_provider, openai_emulator):
    with pytest.raises(RequestError) as caught:
        await openai_provider.batch.status("batch_nope")
    assert caught.value.status == 404


async def test_upload_failure_is_a_batch_error_and_creates_nothing(
    openai_provider, openai_emulator, make_request
):
    openai_emulator.fail_next(1, status=503, route="files.create")
    with pytest.raises(BatchError, match="uploading") as caught:
        await openai_provider.batch.submit(items_for(make_request, ["a"]))
    assert caught.value.status == 503 and caught.value.retryable
    assert openai_emulator.batches_created == 0


async def test_create_failure_deletes_the_uploaded_file(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=400, route="batches.create", message="Batch API not enabled.")
    with pytest.raises(BatchError, match="Batch API not enabled") as caught:
        await openai_provider.batch.submit(items_for(make_request, ["a"]))
    assert caught.value.status == 400 and not caught.value.retryable
    assert openai_emulator.files == {} and len(openai_emulator.deleted_files) == 1


async def test_a_server_without_batches_gives_404(openai_provider, openai_emulator, make_request):
    openai_emulator.fail_next(1, status=404, route="files.create", message="Not Found")
    with pytest.raises(BatchError) as caught:
        await openai_provider.batch.submit(items_for(make_request, ["a"]))
    assert caught.value.status == 404


def _line(custom_id, status=None, body=None, error=None):
    response = None if status is None else {"status_code": status, "request_id": "req_1", "body": body}
    return json.dumps({"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": error})


@pytest.mark.parametrize(
    ("line", "kind", "retryable", "status"),
    [
        (
            _line("a", 429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}),
            RateLimitError,
            True,
            429,
        ),
        (
            _line("a", 429, {"error": {"message": "no money", "code": "insufficient_quota"}}),
            RateLimitError,
            False,
            429,
        ),
        (
            _line("a", 404, {"error": {"message": "no such model", "code": "model_not_found"}}),
            RequestError,
            False,
            404,
        ),
        (_line("a", 408, {"error": {"message": "slow"}}), TransientError, True, 408),
        (_line("a", 503, {"error": {"message": "busy"}}), TransientError, True, 503),
        (_line("a", error={"code": "batch_cancelled", "message": "cancelled"}), TransientError, True, None),
        (_line("a", error={"code": "batch_expired", "message": "expired"}), TransientError, True, None),
    ],
)
def test_error_lines_are_classified(line, kind, retryable, status):
    custom_id, err = OpenAIProvider().batch._line("batch_1", line)
    assert custom_id == "a" and type(err) is kind
    assert (err.retryable, err.status) == (retryable, status)


def test_an_unreadable_line_is_skipped_with_a_warning(caplog):
    assert OpenAIProvider().batch._line("batch_1", "{not json") is None
    assert "unreadable result line" in caplog.text
