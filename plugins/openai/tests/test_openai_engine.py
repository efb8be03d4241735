"""Through pocketbatch itself: a parallel node's round of call_llm_async calls, with the OpenAI provider
registered in the core and the emulator (strict SDK clients) on the other side of the HTTP calls."""

import hashlib
import json
import logging
import re
from dataclasses import asdict

import pytest

from pocketbatch import RequestError
from pocketbatch.engine.batch import _canonical, custom_ids, split_ids
from pocketbatch.journal import journal
from pocketbatch.providers import LLMRequest, Usage
from pocketbatch.testing import ask_each
from pocketbatch_openai import OpenAIProvider

MODEL = "openai/gpt-4o-mini"
PRICE = (0.15, 0.60)  # gpt-4o-mini, USD per million (input, output) tokens


@pytest.fixture
def provider(openai_emulator, register_provider, pocketbatch_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-engine")
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    return register_provider(OpenAIProvider(client_options={"_strict_response_validation": True}))


async def ask(prompts, **node_options):
    return await ask_each(prompts, model=MODEL, **node_options)


def cost(input_tokens, output_tokens, factor=1.0):
    return (input_tokens * PRICE[0] + output_tokens * PRICE[1]) * factor / 1_000_000


def lines_end(emulator, provider, **sets_by_prompt):
    """Put each prompt's custom_id in the emulator's error_ids, server_error_ids or expire_ids as the
    batch is submitted: the engine picks the ids, so they are only known then."""
    submit = provider.batch.submit_tagged  # what the engine calls

    async def submit_and_mark(items, tag):
        for custom_id, request in items:
            which = sets_by_prompt.get(request.messages[-1]["content"])
            if which is not None:
                getattr(emulator, which).add(custom_id)
        return await submit(items, tag)

    provider.batch.submit_tagged = submit_and_mark


async def test_a_small_round_goes_concurrent_through_chat_completions(provider, openai_emulator, caplog):
    prompts = ["Summarise: the cat sat", "Summarise: the dog ran", "Summarise: the owl flew"]
    with caplog.at_level(logging.INFO, logger="pocketbatch"):
        replies = await ask(prompts)

    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 3
    assert all(r.model == "gpt-4o-mini-2024-07-18" and r.provider == "openai" for r in replies)
    assert [r.usage for r in replies] == [Usage(4, 5)] * 3
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(4, 5))] * 3
    assert openai_emulator.calls["chat"] == 3 and openai_emulator.batches_created == 0
    assert "3 requests to openai/gpt-4o-mini" in caplog.text and "running concurrently" in caplog.text


async def test_a_batch_round_maps_lines_back_and_reruns_the_retryable_ones(provider, openai_emulator):
    prompts = [f"Summarise: text {i}" for i in range(6)]
    lines_end(
        openai_emulator,
        provider,
        **{
            prompts[1]: "error_ids",  # 400 in the error file: final, the item's own error
            prompts[3]: "server_error_ids",  # 500: run again concurrently
            prompts[4]: "expire_ids",  # batch_expired: run again concurrently
        },
    )

    replies = await ask(prompts, mode="batch")

    assert isinstance(replies[1], RequestError) and replies[1].status == 400
    assert "Invalid request in this line." in replies[1].message
    answered = [r for i, r in enumerate(replies) if i != 1]
    assert answered == [f"Echo: {p}" for i, p in enumerate(prompts) if i != 1]
    assert [r.via for r in answered] == ["batch", "batch", "concurrent", "concurrent", "batch"]
    assert all(r.usage == Usage(3, 4) for r in answered)
    # The batch API's lines at half the price, the lines run again at the full one.
    assert [r.cost_usd for r in answered] == [
        pytest.approx(cost(3, 4, 0.5)),
        pytest.approx(cost(3, 4, 0.5)),
        pytest.approx(cost(3, 4)),
        pytest.approx(cost(3, 4)),
        pytest.approx(cost(3, 4, 0.5)),
    ]
    assert openai_emulator.batches_created == 1
    (batch,) = openai_emulator.batches.values()
    assert batch["status"] == "expired" and batch["request_counts"] == {
        "total": 6,
        "completed": 3,
        "failed": 3,
    }
    assert sorted(b["messages"][-1]["content"] for b in openai_emulator.bodies("chat")) == [
        prompts[3],
        prompts[4],
    ]
    assert batch["input_file_id"] in openai_emulator.deleted_files


async def test_the_output_file_order_is_not_the_input_order(provider, openai_emulator):
    prompts = [f"Summarise: text {i}" for i in range(8)]
    replies = await ask(prompts, mode="batch")

    (batch,) = openai_emulator.batches.values()
    output = openai_emulator.files[batch["output_file_id"]]["content"].decode().splitlines()
    echoed = [json.loads(line)["response"]["body"]["choices"][0]["message"]["content"] for line in output]
    assert sorted(echoed) == sorted(replies) and echoed != list(replies)
    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["batch"] * 8


async def test_the_custom_ids_are_the_content_hashes_the_journal_already_knows(provider, openai_emulator):
    # Journaled rounds are found again by these ids: a change to how they are computed would make a
    # re-run after an upgrade pay for its batch jobs twice.
    submitted = []
    submit = provider.batch.submit_tagged

    async def spy(items, tag):
        submitted.extend(items)
        return await submit(items, tag)

    provider.batch.submit_tagged = spy
    await ask(["Summarise: same", "Summarise: other", "Summarise: same"], mode="batch")

    seen = {}
    for custom_id, request in submitted:
        fields = asdict(request)
        if fields["schema"] is None:  # added after the first journals: left out when unused
            del fields["schema"]
        text = json.dumps(fields, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        assert custom_id == f"pb-{digest}-{seen.get(digest, 0)}"
        seen[digest] = seen.get(digest, 0) + 1
    assert len(submitted) == 3 and len(set(dict(submitted))) == 3


async def test_a_failed_batch_job_runs_every_item_concurrently(provider, openai_emulator, caplog):
    openai_emulator.fail_batch([{"code": "invalid_request", "line": 2, "message": "Bad line."}])
    prompts = [f"Summarise: text {i}" for i in range(4)]

    replies = await ask(prompts, mode="batch")

    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 4
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(3, 4))] * 4
    assert openai_emulator.batches_created == 1 and openai_emulator.calls["chat"] == 4
    (batch,) = openai_emulator.batches.values()
    assert batch["status"] == "failed"
    assert (
        "line 2: invalid_request: Bad line." in caplog.text
        and "running its requests concurrently" in caplog.text
    )


class TaggingProvider(OpenAIProvider):
    """An OpenAI provider whose lines carry metadata of their own (a proxy's habit): bytes the engine's
    estimate, which sees only the LLMRequest, cannot know about."""

    def chat_body(self, request):
        return {**super().chat_body(request), "metadata": {f"key{i}": "t" * 120 for i in range(16)}}


async def test_a_chunk_over_the_exact_size_limit_is_halved_until_it_fits(
    openai_emulator, register_provider, pocketbatch_env
):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    provider = register_provider(TaggingProvider(client_options={"_strict_response_validation": True}))
    prompts = [f"Summarise: text {i}" for i in range(8)]
    requests = [LLMRequest.from_prompt(p, "gpt-4o-mini") for p in prompts]
    items = list(zip(custom_ids(requests), requests, strict=True))  # what the engine will submit
    exact = len(provider.batch.jsonl(items))
    quarter = max(len(provider.batch.jsonl(items[i : i + 2])) for i in range(0, 8, 2))
    # Room for two requests a job: the engine's estimate takes all eight as one chunk, the exact size
    # of that chunk (and of its halves) is over, so it is halved twice.
    provider.batch.max_bytes = quarter
    sized = [(cid, len(_canonical(request))) for cid, request in items]  # what the estimate sees
    assert len(split_ids(provider, sized)) == 1 and exact > 2 * quarter

    replies = await ask(prompts, mode="batch")

    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["batch"] * 8
    assert openai_emulator.batches_created == 4 and openai_emulator.calls["chat"] == 0
    assert [b["request_counts"]["total"] for b in openai_emulator.batches.values()] == [2, 2, 2, 2]


async def test_each_job_carries_its_round_in_metadata(provider, openai_emulator):
    await ask(["Summarise: a", "Summarise: b"], mode="batch")
    [body] = openai_emulator.bodies("batches.create")
    [batch_id] = openai_emulator.batches
    assert openai_emulator.batches[batch_id]["metadata"] == body["metadata"]
    assert re.fullmatch(r"[0-9a-f]{32}-[0-9a-f]{16}", body["metadata"]["pocketbatch"])


async def test_a_lost_answer_to_the_create_call_is_found_by_its_metadata_one_job_in_all(
    provider, openai_emulator
):
    openai_emulator.fail_next(route="batches.create", lose_answer=True)
    prompts = [f"Summarise: text {i}" for i in range(4)]
    replies = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert openai_emulator.batches_created == 1 and len(openai_emulator.batches) == 1
    assert openai_emulator.calls["batches.list"] == 1  # looked up before creating again
    [job] = journal().jobs()
    assert job.job_id in openai_emulator.batches and journal().submissions(job.round) == []


async def test_cached_prompt_tokens_are_priced_at_the_cached_input_rate(provider, openai_emulator):
    openai_emulator.cached_tokens = 1000
    [reply] = await ask(["Summarise: the cat sat"])
    assert reply.usage == Usage(1004, 5, cache_read_tokens=1000)
    # 4 uncached input tokens at $0.15, 1,000 cached ones at $0.075, 5 output tokens at $0.60
    expected = (4 * 0.15 + 1000 * 0.075 + 5 * 0.60) / 1_000_000
    assert reply.cost_usd == pytest.approx(expected)
    [batched] = await ask(["Summarise: the dog ran"], mode="batch")
    assert batched.usage == Usage(1004, 5, cache_read_tokens=1000)
    assert batched.cost_usd == pytest.approx(expected * 0.5)


def test_cached_input_rates_follow_the_checked_table():
    from pocketbatch_openai import OpenAIProvider

    p = OpenAIProvider()
    cached = Usage(1_000_000, 0, cache_read_tokens=1_000_000)  # every input token read from the cache
    assert p.cost("gpt-4o-mini-2024-07-18", cached) == pytest.approx(0.075)
    assert p.cost("gpt-4.1-nano", cached) == pytest.approx(0.025)
    assert p.cost("gpt-5", cached) == pytest.approx(0.125)
    # gpt-4o-2024-05-13 has no cached-input rate: its cached tokens cost its own input price, not the
    # later gpt-4o snapshots' cached rate
    assert p.cost("gpt-4o-2024-05-13", cached) == pytest.approx(5.00)
    assert p.cost("gpt-4-turbo", cached) == pytest.approx(10.00)  # no rate known: the input price
