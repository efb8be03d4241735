"""Groq and Together through the OpenAI plugin's code, against the emulator taught each one's differences."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketbatch import (
    BatchError,
    ConfigError,
    LLMRequest,
    LLMResponse,
    RateLimits,
    RequestError,
    TransientError,
)
from pocketbatch.engine import events
from pocketbatch.testing import ask_each
from pocketbatch_openai import OpenAIProvider
from pocketbatch_openai.hosts import (
    GROQ_BATCH_DISCOUNTED,
    GROQ_MODELS,
    GroqProvider,
    TogetherProvider,
)
from pocketbatch_openai.testing import OpenAIEmulator


def request(prompt="hello there", model="openai/gpt-oss-20b", **fields):
    return LLMRequest(messages=[{"role": "user", "content": prompt}], model=model, **fields)


def strict(cls):
    return cls(client_options={"_strict_response_validation": True})


async def run_to_end(batch, job_id, limit=20):
    for _ in range(limit):
        status = await batch.status(job_id)
        if status.state == "ended":
            return status
    raise AssertionError("the job never ended")


async def ask(prompts, model, **node_options):
    with events.summarize() as summary:
        replies = await ask_each(prompts, model=model, **node_options)
    return replies, [d.reason for d in summary.decisions]


# -- Groq ---------------------------------------------------------------------------------------------


def test_groq_declaration():
    groq = GroqProvider()
    assert (groq.name, groq.key_env_var, groq.base_url()) == (
        "groq",
        "GROQ_API_KEY",
        "https://api.groq.com/openai/v1",
    )
    assert groq.models == GROQ_MODELS and set(groq.prices) <= set(GROQ_MODELS)
    assert groq.price("openai/gpt-oss-120b") == (0.15, 0.60) and groq.price("openai/gpt-oss-20b") is None
    assert (groq.batch.max_requests, groq.batch.max_bytes, groq.batch.completion_window) == (
        50_000,
        200_000_000,
        "24h",
    )
    assert groq.batch.price_factor_for("openai/gpt-oss-20b") == 0.5
    assert groq.batch.price_factor_for("openai/gpt-oss-safeguard-20b") == 1.0
    assert GROQ_BATCH_DISCOUNTED < set(GROQ_MODELS)


async def test_groq_chat_goes_to_openai_v1_with_its_key(groq_emulator):
    reply = await strict(GroqProvider).call_llm_async(request("Summarise: the cat sat"))
    assert reply == "Echo: Summarise: the cat sat" and reply.provider == "groq"
    (sent,) = groq_emulator.requests
    assert str(sent.url) == "https://api.groq.com/openai/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer gsk-test-groq-emulator"
    # Groq's request headers count per day: only its per-minute token figures reach the engine.
    assert reply.rate_limits == RateLimits(
        limit_tokens=250_000, remaining_tokens=250_000 - 9, reset_tokens=7.66
    )


async def test_groq_base_url_is_the_root_and_lifts_the_model_check(monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "k")
    monkeypatch.setenv("GROQ_BASE_URL", "http://localhost:9999/")
    groq = strict(GroqProvider)
    assert groq.base_url() == "http://localhost:9999/openai/v1" and groq.models == ()
    with OpenAIEmulator("http://localhost:9999/openai/v1", flavor="groq") as local:
        reply = await groq.call_llm_async(request(model="my-fine-tune"))
    assert reply == "Echo: hello there" and local.calls["chat"] == 1


async def test_groq_401_names_its_key_and_a_missing_key_is_a_config_error(groq_emulator, monkeypatch):
    groq_emulator.fail_next(1, status=401)
    with pytest.raises(RequestError, match=r"GROQ_API_KEY environment variable: api\.groq\.com refused it"):
        await strict(GroqProvider).call_llm_async(request())
    monkeypatch.delenv("GROQ_API_KEY")
    with pytest.raises(ConfigError, match="GROQ_API_KEY"):
        await strict(GroqProvider).call_llm_async(request())


async def test_groq_accepts_a_seven_day_window_that_openai_refuses(groq_emulator, monkeypatch):
    groq = strict(GroqProvider)
    groq.batch.completion_window = "7d"
    job_id = await groq.batch.submit([("a", request())])
    assert groq_emulator.batches[job_id]["completion_window"] == "7d"
    assert (await run_to_end(groq.batch, job_id)).raw.status == "completed"

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAIEmulator() as openai_api:
        openai_provider = strict(OpenAIProvider)
        openai_provider.batch.completion_window = "7d"
        with pytest.raises(BatchError, match="creating the batch") as caught:
            await openai_provider.batch.submit([("a", request(model="gpt-4o-mini"))])
    assert caught.value.status == 400 and openai_api.batches_created == 1


async def test_groq_batch_round_at_half_price_for_a_discounted_model(
    groq_emulator, register_provider, pocketbatch_env
):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    groq = register_provider(strict(GroqProvider))
    submit = groq.batch.submit_tagged

    async def mark_second_line_bad(items, tag):
        groq_emulator.error_ids.add(items[1][0])
        return await submit(items, tag)

    groq.batch.submit_tagged = mark_second_line_bad
    prompts = [f"Summarise: text {i}" for i in range(3)]
    replies, reasons = await ask(prompts, "groq/openai/gpt-oss-120b", mode="batch")

    assert isinstance(replies[1], RequestError) and "Groq batch" in replies[1].message
    assert [replies[0], replies[2]] == ["Echo: Summarise: text 0", "Echo: Summarise: text 2"]
    assert replies[0].via == "batch" and replies[0].cost_usd == pytest.approx((3 * 0.15 + 4 * 0.60) / 2e6)
    assert "using the batch API, 50% cheaper" in reasons[0]
    (create,) = groq_emulator.bodies("batches.create")
    assert (
        create["input_file_id"] in groq_emulator.deleted_files
    )  # uploaded with purpose "batch", then deleted


async def test_auto_mode_runs_a_model_without_a_batch_discount_concurrently(
    groq_emulator, register_provider, pocketbatch_env, caplog
):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_BATCH_MIN_ITEMS="3")
    groq = register_provider(strict(GroqProvider))
    # A price for the undiscounted model, so the full price can be checked (Groq's is not known).
    groq.prices = {**groq.prices, "openai/gpt-oss-safeguard-20b": (1.00, 3.00)}
    prompts = [f"Summarise: text {i}" for i in range(4)]

    with caplog.at_level(logging.INFO, logger="pocketbatch"):
        replies, reasons = await ask(prompts, "groq/openai/gpt-oss-safeguard-20b")
    assert {r.via for r in replies} == {"concurrent"} and groq_emulator.batches_created == 0
    assert "groq has no batch discount for openai/gpt-oss-safeguard-20b" in reasons[0]
    assert "groq has no batch discount" in caplog.text

    replies, reasons = await ask(prompts, "groq/openai/gpt-oss-120b")  # a discounted model batches
    assert {r.via for r in replies} == {"batch"} and groq_emulator.batches_created == 1

    replies, reasons = await ask(prompts[:1], "groq/openai/gpt-oss-safeguard-20b", mode="batch")
    assert replies[0].via == "batch" and "at no discount" in reasons[0]
    assert replies[0].cost_usd == pytest.approx((3 * 1.00 + 4 * 3.00) / 1e6)  # the full price


# -- Together -----------------------------------------------------------------------------------------


def test_together_declaration():
    together = TogetherProvider()
    assert (together.name, together.key_env_var, together.base_url()) == (
        "together",
        "TOGETHER_API_KEY",
        "https://api.together.xyz/v1",
    )
    assert together.accepts("any-org/any-model") and together.accepts(
        "meta-llama/Llama-3.3-70B-Instruct-Turbo"
    )
    assert (together.batch.max_requests, together.batch.max_bytes) == (50_000, 100_000_000)
    assert together.batch.price_factor_for("meta-llama/Llama-3.3-70B-Instruct-Turbo") == 0.5
    assert together.batch.price_factor_for("openai/gpt-oss-120b") == 1.0  # only Llama 3.3 is discounted
    assert together.price("meta-llama/Llama-3.3-70B-Instruct-Turbo") == (1.04, 1.04)
    assert together.price("openai/gpt-oss-20b") is None


async def test_together_chat_and_its_401(together_emulator):
    together = strict(TogetherProvider)
    reply = await together.call_llm_async(request(model="meta-llama/Llama-3.3-70B-Instruct-Turbo"))
    assert reply == "Echo: hello there" and reply.rate_limits is None  # headers of its own naming
    assert str(together_emulator.requests[0].url) == "https://api.together.xyz/v1/chat/completions"
    together_emulator.fail_next(1, status=401)
    with pytest.raises(RequestError, match=r"TOGETHER_API_KEY environment variable: api\.together\.xyz"):
        await together.call_llm_async(request())


async def test_together_batch_round_trip_with_its_own_shapes(together_emulator):
    together = strict(TogetherProvider)
    together_emulator.error_ids = {"b"}
    together_emulator.server_error_ids = {"c"}
    together_emulator.expire_ids = {"d"}
    items = [(k, request(f"prompt {k}", model="openai/gpt-oss-20b")) for k in "abcde"]

    job_id = await together.batch.submit(items)

    (upload,) = [r for r in together_emulator.requests if r.url.path.endswith("/files/upload")]
    assert b'name="purpose"\r\n\r\nbatch-api' in upload.content
    (create,) = together_emulator.bodies("batches.create")
    assert create["endpoint"] == "/v1/chat/completions" and create["completion_window"] == "24h"
    first = await together.batch.status(job_id)
    assert first.state == "running" and first.raw["status"] == "IN_PROGRESS"
    assert first.counts == {"progress": 0}
    final = await run_to_end(together.batch, job_id)
    assert final.raw["status"] == "EXPIRED" and final.counts == {"progress": 100}
    got = dict([pair async for pair in together.batch.results(job_id)])
    assert got["a"] == "Echo: prompt a" and got["e"] == "Echo: prompt e" and got["a"].via == "batch"
    assert isinstance(got["b"], RequestError) and "Together batch" in got["b"].message
    assert isinstance(got["c"], TransientError) and isinstance(got["d"], TransientError)
    assert create["input_file_id"] in together_emulator.deleted_files


async def test_together_cancel_and_a_failed_job(together_emulator):
    together = strict(TogetherProvider)
    items = [(k, request(f"prompt {k}")) for k in "abcd"]
    job_id = await together.batch.submit(items)
    together_emulator.polls_per_state = 2
    await together.batch.cancel(job_id)
    # Together documents no cancelling state: the job reads as in progress until the cancel is done.
    status = await together.batch.status(job_id)
    assert status.state == "running" and status.raw["status"] == "IN_PROGRESS"
    final = await run_to_end(together.batch, job_id)
    assert final.raw["status"] == "CANCELLED"
    got = dict([pair async for pair in together.batch.results(job_id)])
    assert sum(isinstance(r, LLMResponse) for r in got.values()) == 2

    together_emulator.polls_per_state = 1
    together_emulator.fail_batch([{"code": "invalid_request", "line": 1, "message": "Model not batchable."}])
    job_id = await together.batch.submit(items)
    with pytest.raises(BatchError, match=r"Together batch \S+ failed: Model not batchable\."):
        await together.batch.status(job_id)


async def test_openai_shaped_batch_code_fails_on_together_which_is_why_it_has_its_own(
    together_emulator, monkeypatch
):
    # The emulator serves Together's differences, not OpenAI's API: OpenAI's upload path is unknown there.
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.together.xyz/v1")
    with pytest.raises(BatchError, match="uploading the batch file") as caught:
        await strict(OpenAIProvider).batch.submit([("a", request())])
    assert caught.value.status == 404 and together_emulator.calls["unknown"] == 1


async def test_together_rounds_through_the_engine(together_emulator, register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    register_provider(strict(TogetherProvider))
    prompts = [f"Summarise: text {i}" for i in range(3)]
    replies, reasons = await ask(prompts, "together/meta-llama/Llama-3.3-70B-Instruct-Turbo", mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert replies[0].cost_usd == pytest.approx((3 * 1.04 + 4 * 1.04) / 2e6)
    assert together_emulator.batches_created == 1 and "50% cheaper" in reasons[0]


async def test_together_base_url_is_followed(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", "k")
    monkeypatch.setenv("TOGETHER_BASE_URL", "http://localhost:7777/v1")
    with OpenAIEmulator("http://localhost:7777/v1", flavor="together") as local:
        reply = await strict(TogetherProvider).call_llm_async(request())
    assert reply == "Echo: hello there" and local.calls["chat"] == 1


def test_pocketbatch_providers_lists_groq_and_together():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "GROQ_", "TOGETHER_"))}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "pocketbatch"), "providers", "--json"],
        env={**env, "GROQ_API_KEY": "k"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["groq"]["plugin"] == rows["together"]["plugin"] == "pocketbatch-openai"
    assert rows["groq"]["models"] == list(GROQ_MODELS) and rows["groq"]["key"] == "set"
    assert (rows["together"]["key_env_var"], rows["together"]["key"]) == ("TOGETHER_API_KEY", "not set")
    assert rows["groq"]["batch"] and rows["together"]["batch"]


async def test_a_together_reply_without_the_expected_fields_is_a_batch_error(together_emulator):
    from pocketbatch_openai.hosts import _field

    together = strict(TogetherProvider)

    async def no_job_wrapper(client, file_id):  # a server that answers without Together's {"job": ...}
        return _field({"id": "batch_1"}, "job")

    together.batch._create = no_job_wrapper
    with pytest.raises(BatchError, match=r"creating the batch failed: .*without 'job'") as caught:
        await together.batch.submit([("a", request())])
    assert not caught.value.retryable
    assert len(together_emulator.deleted_files) == 1  # the uploaded file is not left behind


async def test_groq_jobs_carry_no_metadata_tag(groq_emulator, register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    register_provider(strict(GroqProvider))
    replies, _ = await ask(["Summarise: a", "Summarise: b"], "groq/openai/gpt-oss-120b", mode="batch")
    assert {r.via for r in replies} == {"batch"}
    [body] = groq_emulator.bodies("batches.create")
    assert "metadata" not in body  # undocumented on Groq: the job is submitted untagged


# -- a lost answer to the create call, on hosts that keep no tag ---------------------------------------

HOSTS = {
    "groq": (GroqProvider, "groq/openai/gpt-oss-120b"),
    "together": (TogetherProvider, "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"),
}


def serve(host, request, register_provider, pocketbatch_env):
    """The host's emulator and provider, polled quickly; (the emulator, the model to ask)."""
    emulator = request.getfixturevalue(f"{host}_emulator")
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    cls, model = HOSTS[host]
    register_provider(strict(cls))
    return emulator, model


@pytest.mark.parametrize("host", HOSTS)
async def test_a_lost_answer_to_the_create_call_is_found_by_its_files_name_one_job_in_all(
    host, request, register_provider, pocketbatch_env
):
    from pocketbatch.journal import journal

    emulator, model = serve(host, request, register_provider, pocketbatch_env)
    emulator.fail_next(route="batches.create", lose_answer=True)
    prompts = [f"Summarise: text {i}" for i in range(4)]
    replies, _ = await ask(prompts, model, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert emulator.batches_created == 1 and len(emulator.batches) == 1
    assert emulator.calls["batches.list"] == 1  # looked up before creating again
    assert emulator.calls["chat"] == 0  # nothing ran concurrently
    [job] = journal().jobs()
    assert job.job_id in emulator.batches and journal().submissions(job.round) == []


@pytest.mark.parametrize("host", HOSTS)
async def test_find_tells_the_job_by_its_requests_not_by_time_alone(host, request):
    import time

    emulator = request.getfixturevalue(f"{host}_emulator")
    cls, model = HOSTS[host]
    batch = strict(cls).batch
    model = model.split("/", 1)[1]
    since = time.time()
    items = [(f"c{i}", request_for(f"prompt {i}", model)) for i in range(3)]
    other = await batch.submit([(f"c{i}", request_for(f"other prompt {i}", model)) for i in range(3)])
    fewer = await batch.submit(items[:2])
    wanted = await batch.submit(items)
    assert len({other, fewer, wanted}) == 3
    assert await batch.find("ignored", items, since) == wanted
    assert await batch.find("ignored", items[:2], since) == fewer
    assert await batch.find("ignored", [(f"c{i}", request_for("x", model)) for i in range(3)], since) is None
    # Jobs created long before `since` (past the clock margin) are not looked at.
    assert await batch.find("ignored", items, since + 3600) is None
    if host == "groq":  # once validated, a job's request count is checked as well as its file's size
        await batch.status(wanted)
        assert emulator.batches[wanted]["request_counts"]["total"] == 3
        assert await batch.find("ignored", items, since) == wanted


def request_for(prompt, model):
    return LLMRequest(messages=[{"role": "user", "content": prompt}], model=model)


@pytest.mark.parametrize("host", HOSTS)
async def test_two_rounds_of_the_same_size_close_together_are_told_apart_by_their_files_name(
    host, request, register_provider, pocketbatch_env
):
    from pocketbatch.journal import journal

    emulator, model = serve(host, request, register_provider, pocketbatch_env)
    first = [f"Summarise: text {i}" for i in range(4)]
    second = [f"Summarise: text {i}" for i in range(4, 8)]  # as many requests, the same bytes
    replies, _ = await ask(first, model, mode="batch")
    assert replies == [f"Echo: {p}" for p in first]
    emulator.fail_next(route="batches.create", lose_answer=True)  # the second round's job: no answer
    replies, _ = await ask(second, model, mode="batch")
    # Found by its file's name, not taken for the older job of the same size (the first round's).
    assert replies == [f"Echo: {p}" for p in second] and {r.via for r in replies} == {"batch"}
    assert emulator.batches_created == 2 and emulator.calls["chat"] == 0
    jobs = journal().jobs()
    assert len({job.job_id for job in jobs}) == 2 and all(journal().submissions(j.round) == [] for j in jobs)
    names = [
        emulator.files.get(b["input_file_id"], {}).get("object", {}).get("filename")
        for b in emulator.batches.values()
    ]
    assert all(name is None or name.startswith("pocketbatch-") for name in names)  # deleted once read


@pytest.mark.parametrize("host", HOSTS)
async def test_find_does_not_guess_between_untagged_jobs_of_the_same_size(host, request):
    import time

    request.getfixturevalue(f"{host}_emulator")
    cls, model = HOSTS[host]
    batch = strict(cls).batch
    model = model.split("/", 1)[1]
    since = time.time()
    items = [(f"c{i}", request_for(f"prompt {i}", model)) for i in range(3)]
    look_alike = [(f"c{i}", request_for(f"prompt {i + 3}", model)) for i in range(3)]  # same size
    older = await batch.submit(items)  # untagged: named batch.jsonl, as earlier versions named them
    assert await batch.find("round-0", items, since) == older  # the only one: taken
    other = await batch.submit(look_alike)
    with pytest.raises(BatchError, match=r"cannot tell which .* holds custom_id c0") as caught:
        await batch.find("round-0", items, since)
    assert older in str(caught.value) and other in str(caught.value)
    await batch.cancel(other)  # the user settles it: the job that is not this chunk's is cancelled
    await run_to_end(batch, other)
    assert await batch.find("round-0", items, since) == older
    tagged = await batch.submit_tagged(items, "round-0")
    assert await batch.find("round-0", items, since) == tagged  # named after the tag: no doubt
    assert await batch.find("round-1", items, since) == older  # another tag's file is never taken


async def test_the_engine_fails_the_calls_and_keeps_the_row_when_find_cannot_tell(
    groq_emulator, register_provider, pocketbatch_env
):
    from pocketbatch.journal import journal

    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    groq = register_provider(strict(GroqProvider))

    async def two_untagged_jobs_then_no_answer(items, tag):
        await groq.batch.submit(items)  # as an earlier pocketbatch would have: files named batch.jsonl
        await groq.batch.submit(items)
        raise BatchError("creating the batch failed: connection lost", retryable=True)  # no answer

    groq.batch.submit_tagged = two_untagged_jobs_then_no_answer
    replies, _ = await ask(["Summarise: a", "Summarise: b"], "groq/openai/gpt-oss-120b", mode="batch")
    assert all(isinstance(r, BatchError) and "cannot tell which" in r.message for r in replies)
    assert groq_emulator.batches_created == 2 and groq_emulator.calls["chat"] == 0  # nothing paid again
    assert len(journal().db.execute("SELECT tag FROM submissions").fetchall()) == 1  # kept for the next run
    assert journal().jobs() == []
