"""The batch path reads a job's lines as a stream: items resume while the rest is read, nothing twice."""

import gc
import json
from hashlib import sha256

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, TransientError, call_llm_async
from pocketbatch.engine import batch
from pocketbatch.engine.collector import Call
from pocketbatch.providers import LLMRequest
from pocketbatch.registry import get_provider
from pocketbatch.testing import FakeBatch, FakeProvider, ask_each


async def test_items_resume_while_their_jobs_lines_are_still_being_read(register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    finished, at_last_line = [], []

    class Watched(FakeBatch):
        async def results(self, job_id):
            lines = [line async for line in super().results(job_id)]
            for n, line in enumerate(lines, 1):
                if n == len(lines):
                    at_last_line.append(len(finished))
                yield line

    class Ask(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return range(2_500)

        async def exec_async(self, i):
            reply = await call_llm_async(f"say {i}", model="watched/m")
            finished.append(i)
            return reply

        async def post_async(self, shared, prep_res, exec_res_list):
            shared["out"] = exec_res_list

    fake = register_provider(FakeProvider("watched", batch=True))
    fake.batch = Watched(fake)
    shared = {}
    await AsyncFlow(start=Ask(mode="batch")).run_async(shared)
    assert shared["out"] == [f"reply to say {i}" for i in range(2_500)]
    # The items answered by the first two thousand lines had resumed before the job's last line was read.
    assert at_last_line == [2 * batch.SETTLE_EVERY]


async def test_a_read_that_fails_half_way_is_read_again_and_nothing_is_answered_twice(
    register_provider, pocketbatch_env
):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")

    class DropsOnce(FakeBatch):
        reads = 0

        async def results(self, job_id):
            DropsOnce.reads += 1
            n = 0
            async for line in super().results(job_id):
                n += 1
                if DropsOnce.reads == 1 and n > 1_500:
                    raise TransientError("the connection dropped mid-file")
                yield line

    fake = register_provider(FakeProvider("drops", batch=True))
    fake.batch = DropsOnce(fake)
    prompts = [f"say {i}" for i in range(2_000)]
    assert await ask_each(prompts, model="drops/m", mode="batch") == [f"reply to {p}" for p in prompts]
    assert DropsOnce.reads == 2 and len(fake.batch.jobs) == 1
    # The whole job is journaled: the same round again reuses every line, with no job and no call.
    asked = len(fake.requests)
    assert await ask_each(prompts, model="drops/m", mode="batch") == [f"reply to {p}" for p in prompts]
    assert len(fake.batch.jobs) == 1 and len(fake.requests) == asked


def test_custom_ids_and_round_keys_never_change():
    """The journal finds an earlier run's jobs and results by these: a change would pay for a round twice."""

    requests = [
        LLMRequest.from_prompt("Summarize: a", "offline-small"),
        LLMRequest.from_prompt("Summarize: b", "offline-small", max_tokens=5),
        LLMRequest.from_prompt("Summarize: a", "offline-small"),
        LLMRequest.from_prompt(
            [{"role": "user", "content": "é ✓"}], "offline-small", system="s", options={"seed": 1}
        ),
    ]
    ids = batch.custom_ids(requests)
    assert ids == [
        "pb-d47ecdb94cea7373f7717dd9-0",
        "pb-156610bbedbf9e426773dc13-0",
        "pb-d47ecdb94cea7373f7717dd9-1",
        "pb-e792c4019e54f40ca3b3d92d-0",
    ]
    offline = get_provider("offline")
    assert batch.round_key(offline, "offline-small", ids) == "e6e508f97cced4929a56d61faceea291"
    # Fed in pieces, the key is still the digest of the round's JSON, however many ids it has.
    many = [f"pb-{n:024x}-0" for n in range(10_000)]
    whole = json.dumps(["offline", "offline-small", sorted(many)]).encode()
    assert batch.round_key(offline, "offline-small", many) == sha256(whole).hexdigest()[:32]


async def test_a_round_lets_go_of_each_call_once_it_is_answered(register_provider, pocketbatch_env):
    """A call answered for good is freed while the rest of the job is still read, not kept until the
    round ends."""
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    alive = []

    class Watched(FakeBatch):
        async def results(self, job_id):
            lines = [line async for line in super().results(job_id)]
            for n, line in enumerate(lines, 1):
                if n == len(lines):
                    gc.collect()
                    alive.append(sum(isinstance(o, Call) for o in gc.get_objects()))
                yield line

    fake = register_provider(FakeProvider("watched", batch=True))
    fake.batch = Watched(fake)
    replies = await ask_each([f"say {i}" for i in range(2_500)], model="watched/m", mode="batch")
    assert replies == [f"reply to say {i}" for i in range(2_500)]
    # At the last line, the calls answered and resumed are gone (their requests with them): what is left
    # are those whose items have not had their turn since their line was read (fewer than SETTLE_EVERY).
    assert alive and alive[0] < batch.SETTLE_EVERY
