"""Batch Mode: GeminiBatch against the emulator, through the real SDK, inline and through a file."""

import json

import pytest

from pocketbatch import BatchError, LLMResponse, RateLimitError, RequestError, TransientError, Usage
from pocketbatch_gemini import GeminiProvider


def items_for(make_request, ids, model="gemini-2.5-flash", **fields):
    return [(custom_id, make_request(f"prompt {custom_id}", model=model, **fields)) for custom_id in ids]


async def run_to_end(batch, job_id, limit=20):
    states = []
    for _ in range(limit):
        status = await batch.status(job_id)
        states.append((status.state, status.raw.state.value))
        if status.state == "ended":
            return states, status
    raise AssertionError(f"the job never ended: {states}")


async def collect(batch, job_id):
    return [pair async for pair in batch.results(job_id)]


def test_limits_and_price_factor():
    batch = GeminiProvider().batch
    assert (batch.max_requests, batch.max_bytes, batch.price_factor) == (100_000, 2_000_000_000, 0.5)
    assert batch.inline_limit < 20 * 1024 * 1024


@pytest.mark.parametrize("through", ["inline", "file"])
async def test_round_trip_keyed_out_of_order_with_every_line_fate(
    provider, gemini_emulator, make_request, through
):
    batch = provider.batch
    if through == "file":
        batch.inline_limit = 0
    ids = [f"item-{i}" for i in range(8)]
    gemini_emulator.error_keys = {"item-2"}
    gemini_emulator.server_error_keys = {"item-5"}
    gemini_emulator.expire_keys = {"item-6", "item-7"}

    job_id = await batch.submit(items_for(make_request, ids, max_tokens=100))
    states, final = await run_to_end(batch, job_id)

    assert states == [("running", "JOB_STATE_RUNNING"), ("ended", "JOB_STATE_EXPIRED")]
    pairs = await collect(batch, job_id)
    got = dict(pairs)
    # The expired lines never ran and have no result: the engine runs them again.
    assert sorted(got) == ids[:6] and len(pairs) == 6
    assert [custom_id for custom_id, _ in pairs] != ids[:6]  # the API's order, mapped back by key
    for custom_id in ("item-0", "item-1", "item-3", "item-4"):
        response = got[custom_id]
        assert isinstance(response, LLMResponse) and response == f"Echo: prompt {custom_id}"
        assert (response.via, response.provider, response.model) == ("batch", "gemini", "gemini-2.5-flash")
        assert response.usage == Usage(2, 3)
    assert isinstance(got["item-2"], RequestError) and not got["item-2"].retryable
    assert got["item-2"].status == 400 and "item-2" in got["item-2"].message
    assert (
        isinstance(got["item-5"], TransientError) and got["item-5"].retryable and got["item-5"].status == 500
    )
    (create,) = gemini_emulator.bodies("batches.create")
    source = create["batch"]["inputConfig"]
    if through == "inline":
        assert final.counts == {"succeeded": 4, "errored": 2}
        requests = source["requests"]["requests"]
        assert [r["metadata"]["key"] for r in requests] == ids
        assert requests[0]["request"]["generationConfig"] == {"maxOutputTokens": 100}
        assert gemini_emulator.calls["files.upload"] == 0
    else:
        (input_name,) = [n for n in gemini_emulator.deleted_files]
        assert source == {"fileName": input_name}
        assert gemini_emulator.calls["files.upload"] == 2  # resumable: start, then upload and finalize


async def test_a_file_line_is_the_request_the_sdk_sends_inline(provider, gemini_emulator, make_request):
    items = items_for(make_request, ["a", "b"], system="be brief", temperature=0.5, options={"top_k": 3})
    provider.batch.inline_limit = 0
    await provider.batch.submit(items)
    provider.batch.inline_limit = 10**9
    await provider.batch.submit(items)

    file_create, inline_create = gemini_emulator.bodies("batches.create")
    content = gemini_emulator.files[file_create["batch"]["inputConfig"]["fileName"]]["content"]
    lines = [json.loads(line) for line in content.decode().splitlines()]
    inline = inline_create["batch"]["inputConfig"]["requests"]["requests"]
    assert [line["key"] for line in lines] == ["a", "b"]
    assert [line["request"] for line in lines] == [r["request"] for r in inline]
    assert lines[0]["request"] == {
        "contents": [{"role": "user", "parts": [{"text": "prompt a"}]}],
        "systemInstruction": {"role": "user", "parts": [{"text": "be brief"}]},
        "generationConfig": {"temperature": 0.5, "topK": 3},
    }


async def test_the_input_file_is_deleted_after_results_and_the_output_kept(
    provider, gemini_emulator, make_request
):
    provider.batch.inline_limit = 0
    job_id = await provider.batch.submit(items_for(make_request, ["a", "b"]))
    (input_name,) = gemini_emulator.files
    await run_to_end(provider.batch, job_id)
    pairs = await collect(provider.batch, job_id)
    assert sorted(dict(pairs)) == ["a", "b"]
    assert gemini_emulator.deleted_files == [input_name] and len(gemini_emulator.files) == 1


@pytest.mark.parametrize(
    "ids, message",
    [
        (["ok", "bad id!"], "does not match"),
        (["x" * 65], "does not match"),
        (["same", "same"], "appears twice"),
    ],
)
async def test_invalid_items_are_refused_before_sending(
    provider, gemini_emulator, make_request, ids, message
):
    with pytest.raises(BatchError, match=message) as caught:
        await provider.batch.submit(items_for(make_request, ids))
    assert caught.value.status == 400 and not gemini_emulator.requests


async def test_one_model_per_job_and_mappable_requests_only(provider, gemini_emulator, make_request):
    mixed = items_for(make_request, ["a"]) + items_for(make_request, ["b"], model="gemini-2.5-pro")
    with pytest.raises(BatchError, match="one model") as caught:
        await provider.batch.submit(mixed)
    assert caught.value.status == 400
    bad = items_for(make_request, ["a"], options={"model": "x"})
    with pytest.raises(BatchError, match="custom_id 'a' cannot go in a Gemini batch") as caught:
        await provider.batch.submit(bad)
    assert caught.value.status == 400 and not gemini_emulator.requests


async def test_an_empty_batch_is_refused(provider, gemini_emulator):
    with pytest.raises(BatchError, match="at least one") as caught:
        await provider.batch.submit([])
    assert caught.value.status == 400


async def test_too_many_requests_is_413(provider, gemini_emulator, make_request):
    provider.batch.max_requests = 2
    with pytest.raises(BatchError) as caught:
        await provider.batch.submit(items_for(make_request, ["a", "b", "c"]))
    assert caught.value.status == 413 and not gemini_emulator.requests


async def test_the_exact_size_limit_is_413(provider, gemini_emulator, make_request):
    items = items_for(make_request, ["a", "b"])
    exact = len(provider.batch.jsonl(items))
    provider.batch.max_bytes = exact - 1
    with pytest.raises(BatchError, match="over Gemini") as caught:
        await provider.batch.submit(items)
    assert caught.value.status == 413
    provider.batch.max_bytes = exact
    assert await provider.batch.submit(items)


async def test_cancel_keeps_partial_results(provider, gemini_emulator, make_request):
    ids = [f"c{i}" for i in range(4)]
    job_id = await provider.batch.submit(items_for(make_request, ids))
    await provider.batch.cancel(job_id)
    status = await provider.batch.status(job_id)
    assert status.state == "ended" and status.raw.state.value == "JOB_STATE_CANCELLED"
    got = dict(await collect(provider.batch, job_id))
    assert sorted(got) == ["c0", "c1"] and all(isinstance(r, LLMResponse) for r in got.values())


async def test_a_cancelled_job_runs_until_the_cancel_takes_effect(provider, gemini_emulator, make_request):
    gemini_emulator.cancel_polls = 3  # the REST API has no cancelling state
    job_id = await provider.batch.submit(items_for(make_request, ["a", "b"]))
    await provider.batch.cancel(job_id)
    assert [(await provider.batch.status(job_id)).state for _ in range(3)] == ["running", "running", "ended"]
    await provider.batch.cancel(job_id)  # after the end: nothing changes, no error


async def test_a_failed_job_raises_and_deletes_its_input_file(provider, gemini_emulator, make_request):
    gemini_emulator.fail_batch("quota for batch jobs exceeded")
    provider.batch.inline_limit = 0
    job_id = await provider.batch.submit(items_for(make_request, ["a"]))
    with pytest.raises(BatchError, match=f"Gemini batch {job_id} failed"):
        await provider.batch.status(job_id)
    assert len(gemini_emulator.deleted_files) == 1


async def test_a_failed_poll_is_a_retryable_error(provider, gemini_emulator, make_request):
    job_id = await provider.batch.submit(items_for(make_request, ["a"]))
    gemini_emulator.fail_next(1, status=503, route="batches.get")
    with pytest.raises(TransientError) as caught:
        await provider.batch.status(job_id)
    assert caught.value.retryable
    gemini_emulator.fail_next(1, status=429, route="batches.get", retry_delay=2)
    with pytest.raises(RateLimitError) as caught:
        await provider.batch.status(job_id)
    assert caught.value.retry_after == 2
    assert (await provider.batch.status(job_id)).state == "running"


async def test_a_failed_download_is_a_retryable_error(provider, gemini_emulator, make_request):
    provider.batch.inline_limit = 0
    job_id = await provider.batch.submit(items_for(make_request, ["a"]))
    await run_to_end(provider.batch, job_id)
    gemini_emulator.fail_next(1, route="files.download", disconnect=True)
    with pytest.raises(TransientError):
        await collect(provider.batch, job_id)
    assert [k for k, _ in await collect(provider.batch, job_id)] == ["a"]


async def test_unknown_job_is_a_request_error(provider, gemini_emulator):
    with pytest.raises(RequestError) as caught:
        await provider.batch.status("batches/nope")
    assert caught.value.status == 404


async def test_upload_failure_is_a_batch_error_and_creates_nothing(provider, gemini_emulator, make_request):
    provider.batch.inline_limit = 0
    gemini_emulator.fail_next(1, status=503, route="files.upload")
    with pytest.raises(BatchError, match="uploading the batch file") as caught:
        await provider.batch.submit(items_for(make_request, ["a"]))
    assert caught.value.status == 503 and caught.value.retryable and gemini_emulator.batches_created == 0


async def test_create_failure_deletes_the_uploaded_file(provider, gemini_emulator, make_request):
    provider.batch.inline_limit = 0
    gemini_emulator.fail_next(1, status=400, route="batches.create")
    with pytest.raises(BatchError, match="creating the batch") as caught:
        await provider.batch.submit(items_for(make_request, ["a"]))
    assert caught.value.status == 400 and not caught.value.retryable
    assert len(gemini_emulator.deleted_files) == 1 and not gemini_emulator.files


async def test_inline_requests_over_the_body_limit_go_as_a_file(provider, gemini_emulator, make_request):
    # The emulator refuses a create body over 20 MiB as the API does: the default inline limit keeps
    # a request that large out of it.
    big = items_for(make_request, ["a"])
    big[0][1].messages[0]["content"] = "word " * 4_300_000
    job_id = await provider.batch.submit(big)
    (create,) = gemini_emulator.bodies("batches.create")
    assert "fileName" in create["batch"]["inputConfig"] and job_id
    provider.batch.inline_limit = 10**9
    with pytest.raises(BatchError, match="payload size exceeds") as caught:
        await provider.batch.submit(big)
    assert caught.value.status == 400


async def test_a_line_error_without_a_status_still_reads(provider):
    error = provider.batch._line_error("batches/1", "k", {"code": 500, "message": "boom"})
    assert (
        isinstance(error, TransientError)
        and error.message == "request k in Gemini batch batches/1 failed (500): boom"
    )


async def test_an_unreadable_result_line_is_skipped_with_a_warning(provider, caplog):
    assert provider.batch._file_line("batches/1", "not json") is None
    assert provider.batch._file_line("batches/1", '{"no": "key"}') is None
    assert "skipped an unreadable result line" in caplog.text


async def test_a_tagged_job_carries_its_tag_in_its_display_name_and_find_finds_it(
    provider, gemini_emulator, make_request
):
    import time

    batch = provider.batch
    since = time.time()
    gemini_emulator.list_page_size = 2  # the tagged job is on the second page of three
    other = await batch.submit_tagged(items_for(make_request, ["x0", "x1"]), "r1-c0-other")
    wanted = await batch.submit_tagged(items_for(make_request, ["a0", "a1"]), "r1-c0-wanted")
    for n in range(4):
        await batch.submit(items_for(make_request, [f"u{n}"]))
    names = [b["metadata"]["displayName"] for b in gemini_emulator.batches.values()]
    assert names[:2] == ["pocketbatch r1-c0-other", "pocketbatch r1-c0-wanted"]
    assert set(names[2:]) == {"pocketbatch"}

    assert await batch.find("r1-c0-wanted", items_for(make_request, ["a0", "a1"]), since) == wanted
    assert await batch.find("r1-c0-other", items_for(make_request, ["x0", "x1"]), since) == other
    assert gemini_emulator.calls["batches.list"] == 6  # three pages, walked to the end each time
    assert await batch.find("r1-c0-missing", items_for(make_request, ["m0"]), since) is None
    # A job created long before `since` (past the clock margin) is not the one looked for.
    assert await batch.find("r1-c0-wanted", items_for(make_request, ["a0", "a1"]), since + 3600) is None
