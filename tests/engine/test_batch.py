"""The batch path reads a job's lines as a stream: items resume while the rest is read, nothing twice."""

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, TransientError, call_llm_async
from pocketbatch.engine import batch
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
