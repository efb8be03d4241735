"""Through pocketbatch itself: parallel nodes' rounds of call_llm_async calls, with GeminiProvider
registered in the core and the emulator on the other side of the SDK's HTTP calls."""

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pocketbatch import RequestError, Usage
from pocketbatch.engine import events
from pocketbatch.engine.batch import CancelPolicy, cancel_policy, chunk_tag
from pocketbatch.engine.limits import limiter_for
from pocketbatch.journal import journal
from pocketbatch.testing import ask_each
from pocketbatch_gemini import GeminiProvider
from pocketbatch_gemini.testing import GeminiEmulator

MODEL = "gemini/gemini-2.5-flash"
PRICE = (0.30, 2.50)  # gemini-2.5-flash, USD per million (input, output) tokens


@pytest.fixture
def provider(gemini_emulator, register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    return register_provider(GeminiProvider())


async def ask(prompts, **node_options):
    with events.summarize() as summary:
        replies = await ask_each(prompts, model=MODEL, **node_options)
    return replies, [d.reason for d in summary.decisions]


def cost(input_tokens, output_tokens, factor=1.0):
    return (input_tokens * PRICE[0] + output_tokens * PRICE[1]) * factor / 1_000_000


def lines_end(emulator, provider, **sets_by_prompt):
    """Put each prompt's custom_id in the emulator's error_keys, server_error_keys or expire_keys as the
    batch is submitted: the engine picks the ids, so they are only known then."""
    submit_tagged = provider.batch.submit_tagged

    async def submit_and_mark(items, tag):
        for custom_id, request in items:
            which = sets_by_prompt.get(request.messages[-1]["content"])
            if which is not None:
                getattr(emulator, which).add(custom_id)
        return await submit_tagged(items, tag)

    provider.batch.submit_tagged = submit_and_mark


async def test_a_small_round_goes_concurrent(provider, gemini_emulator, caplog):
    prompts = ["Summarise: the cat sat", "Summarise: the dog ran", "Summarise: the owl flew"]
    with caplog.at_level(logging.INFO, logger="pocketbatch"):
        replies, _ = await ask(prompts)

    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 3
    assert [r.usage for r in replies] == [Usage(4, 5)] * 3
    assert [r.cost_usd for r in replies] == [pytest.approx(cost(4, 5))] * 3
    assert gemini_emulator.calls["generate"] == 3 and gemini_emulator.batches_created == 0
    assert "3 requests to gemini/gemini-2.5-flash" in caplog.text and "running concurrently" in caplog.text


async def test_the_engine_retries_429s_and_5xx_after_the_retry_delay(provider, gemini_emulator):
    gemini_emulator.fail_next(1, status=429, retry_delay=0.05)
    gemini_emulator.fail_next(1, status=503)
    replies, _ = await ask(["Summarise: one"])
    assert replies == ["Echo: Summarise: one"] and gemini_emulator.calls["generate"] == 3


async def test_the_engine_does_not_retry_a_bad_request(provider, gemini_emulator):
    gemini_emulator.fail_next(1, status=400)
    (reply,), _ = await ask(["Summarise: one"])
    assert isinstance(reply, RequestError) and gemini_emulator.calls["generate"] == 1


@pytest.mark.parametrize("through", ["inline", "file"])
async def test_a_batch_round_maps_lines_back_and_reruns_the_retryable_ones(
    provider, gemini_emulator, through
):
    if through == "file":
        provider.batch.inline_limit = 0
    prompts = [f"Summarise: text {i}" for i in range(6)]
    lines_end(
        gemini_emulator,
        provider,
        **{
            prompts[1]: "error_keys",  # 400: final, the item's own error
            prompts[3]: "server_error_keys",  # 500: run again concurrently
            prompts[4]: "expire_keys",  # never ran before the job expired: run again concurrently
        },
    )

    replies, reasons = await ask(prompts, mode="batch")

    assert isinstance(replies[1], RequestError) and replies[1].status == 400
    answered = [r for i, r in enumerate(replies) if i != 1]
    assert answered == [f"Echo: {p}" for i, p in enumerate(prompts) if i != 1]
    assert [r.via for r in answered] == ["batch", "batch", "concurrent", "concurrent", "batch"]
    assert [r.cost_usd for r in answered] == [
        pytest.approx(cost(3, 4, 0.5)),
        pytest.approx(cost(3, 4, 0.5)),
        pytest.approx(cost(3, 4)),
        pytest.approx(cost(3, 4)),
        pytest.approx(cost(3, 4, 0.5)),
    ]
    assert gemini_emulator.batches_created == 1
    assert sorted(b["contents"][0]["parts"][0]["text"] for b in gemini_emulator.bodies("generate")) == [
        prompts[3],
        prompts[4],
    ]
    assert "using the batch API, 50% cheaper" in reasons[0]


async def test_a_failed_batch_job_runs_every_item_concurrently(provider, gemini_emulator, caplog):
    gemini_emulator.fail_batch("Batch quota exceeded.")
    prompts = [f"Summarise: text {i}" for i in range(4)]
    replies, _ = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts]
    assert [r.via for r in replies] == ["concurrent"] * 4
    assert gemini_emulator.batches_created == 1 and gemini_emulator.calls["generate"] == 4
    assert "running its requests concurrently" in caplog.text


async def test_a_round_over_max_requests_is_split_into_jobs(provider, gemini_emulator):
    provider.batch.max_requests = 3
    prompts = [f"Summarise: text {i}" for i in range(7)]
    replies, _ = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    sizes = [
        len(b["batch"]["inputConfig"]["requests"]["requests"])
        for b in gemini_emulator.bodies("batches.create")
    ]
    assert sizes == [3, 3, 1]


async def test_a_round_over_max_bytes_is_split_into_jobs_that_fit(provider, gemini_emulator):
    prompts = [f"Summarise: text {i}" for i in range(8)]
    one = len(provider.batch.jsonl([("pb-0123456789abcdef01234567-0", _request(prompts[0]))]))
    provider.batch.max_bytes = int(one * 2.2)  # room for two requests a job at most
    replies, _ = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    jobs = [
        b["batch"]["inputConfig"]["requests"]["requests"] for b in gemini_emulator.bodies("batches.create")
    ]
    assert sum(map(len, jobs)) == 8 and max(map(len, jobs)) <= 2
    assert gemini_emulator.calls["generate"] == 0


def _request(prompt):
    from pocketbatch import LLMRequest

    return LLMRequest.from_prompt(prompt, "gemini-2.5-flash")


async def test_the_deadline_cancels_the_job_and_finishes_concurrently(
    provider, gemini_emulator, pocketbatch_env
):
    gemini_emulator.polls_per_state = 10**6  # the job never ends on its own
    gemini_emulator.cancel_completes = 0.5
    pocketbatch_env(POCKETBATCH_BATCH_DEADLINE="0.1", POCKETBATCH_POLL_INTERVAL="0.01")
    prompts = [f"Summarise: text {i}" for i in range(4)]
    replies, _ = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts]
    assert gemini_emulator.calls["batches.cancel"] == 1
    # The cancelled job finished half its lines: kept at the batch price; the rest ran concurrently.
    assert sorted(r.via for r in replies) == ["batch", "batch", "concurrent", "concurrent"]
    assert gemini_emulator.calls["generate"] == 2


async def test_cancelling_the_run_cancels_the_job(provider, gemini_emulator):
    gemini_emulator.polls_per_state = 10**6
    task = asyncio.ensure_future(ask([f"Summarise: text {i}" for i in range(3)], mode="batch"))
    while not gemini_emulator.batches_created:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gemini_emulator.calls["batches.cancel"] == 1  # before the cancellation reached the caller


async def test_a_run_stopped_while_its_job_runs_re_attaches_to_it(provider, gemini_emulator):
    # What the CLI does when a run is killed or interrupted and the jobs are left running: the journal
    # holds the job, and the same round run again waits for it instead of paying for a second one.
    gemini_emulator.polls_per_state = 10**6
    prompts = [f"Summarise: text {i}" for i in range(3)]
    cancel_policy.set(CancelPolicy("leave"))
    task = asyncio.ensure_future(ask(prompts, mode="batch"))
    while not gemini_emulator.batches_created:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancel_policy.set(None)
    assert gemini_emulator.calls["batches.cancel"] == 0

    gemini_emulator.polls_per_state = 1
    replies, reasons = await ask(prompts, mode="batch")

    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert gemini_emulator.batches_created == 1 and "re-attaching to batches/" in reasons[0]
    assert [j.state for j in journal().jobs()] == ["collected"]
    again, reasons = await ask(prompts, mode="batch")  # and once collected, reused without a call
    assert (
        again == replies and gemini_emulator.batches_created == 1 and gemini_emulator.calls["generate"] == 0
    )


async def test_the_limit_is_learned_from_429s_alone(gemini_emulator, register_provider, pocketbatch_env):
    class Eager(GeminiProvider):
        rpm = 6000  # where learning starts: far above the server's limit
        tpm = 0

    provider = register_provider(Eager())
    gemini_emulator.server_rpm = 1200  # 20 requests a second, reported by 429s with a retryDelay only
    pocketbatch_env(POCKETBATCH_MODE="concurrent")
    prompts = [f"Summarise: text {i}" for i in range(40)]
    with events.summarize() as summary:
        replies = await ask_each(prompts, model=MODEL)

    assert replies == [f"Echo: {p}" for p in prompts]
    assert summary.rate_limited > 0  # Gemini sends no rate-limit headers: only 429s teach the engine
    learned = limiter_for(provider, "gemini-2.5-flash").rpm
    assert learned < 6000 and limiter_for(provider, "gemini-2.5-flash").learning()["rpm"]


# A first run in a process of its own: its emulator saves the server's state once the job exists, so the
# job outlives the process when the test kills it, as a real Gemini job would.
FIRST_RUN = """
import asyncio, json, sys
from pocketbatch.testing import ask_each
from pocketbatch_gemini.testing import GeminiEmulator

with GeminiEmulator() as emulator:
    emulator.polls_per_state = 10**6  # the job runs until the process is killed
    create = emulator._batch_create

    def create_and_save(request, model):
        response = create(request, model)
        with open(sys.argv[1], "w") as f:
            json.dump(emulator.state(), f)
        return response

    emulator._batch_create = create_and_save
    asyncio.run(ask_each(json.loads(sys.argv[2]), model="gemini/gemini-2.5-flash", mode="batch"))
"""


def journaled_states(path):
    try:
        return [row[0] for row in sqlite3.connect(path).execute("SELECT state FROM jobs")]
    except sqlite3.OperationalError:  # no journal, or no table in it yet
        return []


def kill_a_first_run_while_its_job_runs(journal_path, state_path, prompts):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "GOOGLE_", "GEMINI_"))}
    env.update(GEMINI_API_KEY="k", POCKETBATCH_JOURNAL=str(journal_path), POCKETBATCH_POLL_INTERVAL="0.05")
    first = subprocess.Popen(
        [sys.executable, "-c", FIRST_RUN, str(state_path), json.dumps(prompts)],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while journaled_states(journal_path) != ["running"]:
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first run never journaled its job"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()


async def test_a_run_killed_while_its_job_runs_is_resumed_from_the_journal(
    tmp_path, register_provider, pocketbatch_env, monkeypatch
):
    journal_path, state_path = tmp_path / "journal.sqlite3", tmp_path / "server.json"
    prompts = [f"Summarise: text {i}" for i in range(3)]
    kill_a_first_run_while_its_job_runs(journal_path, state_path, prompts)

    monkeypatch.setenv("GEMINI_API_KEY", "k")
    pocketbatch_env(POCKETBATCH_JOURNAL=str(journal_path), POCKETBATCH_POLL_INTERVAL="0.01")
    register_provider(GeminiProvider())
    with GeminiEmulator.from_state(json.loads(state_path.read_text())) as server:
        replies, reasons = await ask(prompts, mode="batch")

    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert "re-attaching to batches/" in reasons[0]
    assert server.batches_created == 0 and server.calls["generate"] == 0  # nothing paid twice
    assert journaled_states(journal_path) == ["collected"]


@pytest.mark.parametrize("through", ["inline", "file"])
async def test_a_lost_answer_to_the_create_call_is_found_by_its_display_name_one_job_in_all(
    provider, gemini_emulator, through
):
    if through == "file":  # the input file is kept for the job the lost answer was about
        provider.batch.inline_limit = 0
    gemini_emulator.fail_next(route="batches.create", lose_answer=True)
    prompts = [f"Summarise: text {i}" for i in range(4)]
    replies, _ = await ask(prompts, mode="batch")
    assert replies == [f"Echo: {p}" for p in prompts] and {r.via for r in replies} == {"batch"}
    assert gemini_emulator.batches_created == 1 and len(gemini_emulator.batches) == 1
    assert gemini_emulator.calls["batches.list"] == 1  # looked up before creating again
    assert gemini_emulator.bodies("generate") == []  # nothing ran concurrently
    [job] = journal().jobs()
    assert job.job_id in gemini_emulator.batches and journal().submissions(job.round) == []
    [created] = gemini_emulator.batches.values()
    assert created["metadata"]["displayName"] == f"pocketbatch {chunk_tag(job.round, job.custom_ids)}"
