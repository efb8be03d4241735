"""pocketbatch.ray.map_flow on a real local Ray cluster (one for the module), a real redis-server and a
loopback OpenAI-compatible server in its own process; batch jobs through the offline provider's simulated
batch API, whose jobs are files in POCKETBATCH_OFFLINE_DIR that every actor sees."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install pocketbatch[ray])")
import ray

from bench.servers import LoopbackServer, max_in_window
from pocketbatch import AsyncParallelBatchNode, LLMRequest, call_llm_async, config
from pocketbatch.default_plugins.offline import reply
from pocketbatch.ray import FlowRunner, map_flow, result_columns

RATE = 50  # the loopback server's limit, requests a second


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module. It starts without any POCKETBATCH_* or provider variable, so
    the actors have only what map_flow forwards to them."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("POCKETBATCH_") or name.endswith(("_API_KEY", "_BASE_URL")):
                mp.delenv(name)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests/
    yield
    ray.shutdown()


def prompt(i: int) -> str:
    return f"Summarize item {i} in one word."


def dataset(n: int, batch_size: int):
    """n rows in blocks of batch_size: a Ray batch is cut from the blocks one task gets, so aligned
    blocks make each Ray batch exactly one block."""
    items = [{"id": i, "text": prompt(i)} for i in range(n)]
    return ray.data.from_items(items, override_num_blocks=max(1, n // batch_size))


class Summaries(AsyncParallelBatchNode):
    """The seed's node, reading the rows of a Ray batch."""

    async def prep_async(self, shared):
        return [row["text"] for row in shared["rows"]]

    async def exec_async(self, text):
        return await call_llm_async(text)

    async def exec_fallback_async(self, prep_res, exc):
        return exc

    async def post_async(self, shared, prep_res, exec_res_list):
        shared["results"] = exec_res_list


def make_flow():
    return Summaries()


def check_batches(rows: list[dict], batch_size: int) -> None:
    """Every input row once, and each Ray batch's rows together and in their input order."""
    ids = [r["id"] for r in rows]
    assert sorted(ids) == list(range(len(ids)))
    for b in range(0, len(ids), batch_size):
        where = [ids.index(i) for i in range(b, min(b + batch_size, len(ids)))]
        assert where == list(range(where[0], where[0] + len(where)))


def set_env(monkeypatch, **variables: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config.reload()


def test_2000_rows_on_2_actors_share_one_limit_through_redis(cluster, redis_url, monkeypatch):
    with LoopbackServer(rate=RATE, echo=True) as server:
        set_env(
            monkeypatch,
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=server.base_url,
            POCKETBATCH_REDIS_URL=redis_url,
            POCKETBATCH_OPENAI_RPM=str(RATE * 60),  # the tier's limit, as its user would set it
            POCKETBATCH_OPENAI_TPM="0",  # this server limits requests only
            POCKETBATCH_MODE="concurrent",
        )
        rows = map_flow(dataset(2000, 500), make_flow, batch_size=500, actors=2).take_all()
        books = server.stats()
    assert len(rows) == 2000
    check_batches(rows, 500)
    for row in rows:
        assert (row["text"], row["error"], row["via"]) == (f"ok: {prompt(row['id'])}", None, "concurrent")
        assert (row["input_tokens"], row["output_tokens"]) == (10, 1)
    assert books["ok"] == 2000
    assert books["rate_limited"] <= 0.01 * books["requests"]
    # Together the actors stayed within the server's limit (its bucket holds 5 more at once).
    assert max_in_window(books["ok_times"]) <= RATE + 5


def offline_env(monkeypatch, tmp_path: Path, redis_url: str, seconds: float) -> Path:
    jobs = tmp_path / "offline-jobs"
    set_env(
        monkeypatch,
        POCKETBATCH_PROVIDER="offline",
        POCKETBATCH_MODE="batch",
        POCKETBATCH_OFFLINE_DIR=str(jobs),
        POCKETBATCH_OFFLINE_BATCH_SECONDS=str(seconds),
        POCKETBATCH_POLL_INTERVAL="0.2",
        POCKETBATCH_REDIS_URL=redis_url,
        POCKETBATCH_JOURNAL=redis_url,  # the journal in Redis: every actor sees every job
    )
    return jobs


def submitted(jobs: Path) -> list[list[int]]:
    """The row ids of each batch job the simulated provider received."""
    out = []
    for path in sorted(jobs.glob("offline-batch-*.json")):
        lines = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
        out.append(sorted(int(line["request"]["messages"][0]["content"].split()[2]) for line in lines))
    return out


def expected_text(i: int) -> str:
    return reply(LLMRequest.from_prompt(prompt(i), "offline-small"))[0]


@ray.remote
class Registry:
    """Where the flows' actors leave their handles, so the test can kill one."""

    def __init__(self) -> None:
        self.handles = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def all(self) -> list:
        return self.handles


class Registering(Summaries):
    async def prep_async(self, shared):
        registry = ray.get_actor("pocketbatch-test-registry")
        await registry.add.remote(ray.get_runtime_context().current_actor)
        return await super().prep_async(shared)


def make_registering_flow():
    return Registering()


def test_mode_batch_makes_one_job_per_ray_batch_and_a_killed_actor_pays_for_none_twice(
    cluster, redis_url, monkeypatch, tmp_path
):
    """mode=batch: one batch job per Ray batch, every row answered through it; an actor killed while its
    job runs is restarted by Ray, and its batch's second run re-attaches to the job instead of paying
    again. (One test for both: each map_flow starts its actors anew, seconds on two cores.)"""
    jobs = offline_env(monkeypatch, tmp_path, redis_url, seconds=3)
    registry = Registry.options(name="pocketbatch-test-registry").remote()
    killed: list[float] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while not list(jobs.glob("offline-batch-*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the job is in the journal; its batch is waiting for it to end
        victim = ray.get(registry.all.remote())[0]
        ray.kill(victim, no_restart=False)  # Ray restarts it and retries its batch
        killed.append(len(list(jobs.glob("offline-batch-*.json"))))

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    rows = map_flow(dataset(600, 200), make_registering_flow, batch_size=200, actors=2).take_all()
    killer.join(5)
    assert killed, "the test did not kill an actor"
    check_batches(rows, 200)
    for row in rows:
        assert (row["text"], row["via"], row["error"]) == (expected_text(row["id"]), "batch", None)
    # A batch ran again after its actor was killed (the killed actor may have held more than one) ...
    assert len(ray.get(registry.all.remote())) >= 4
    # ... and its second run re-attached to the job of the first: one job per Ray batch, none twice.
    assert sorted(submitted(jobs)) == [list(range(b, b + 200)) for b in (0, 200, 400)]
    ray.kill(registry)


# -- the callable class alone, no cluster needed --------------------------------------------------------


def test_make_flow_must_return_a_flow():
    with pytest.raises(TypeError, match=r"make_flow\(\) must return a pocketbatch Flow or node .*, not list"):
        FlowRunner(lambda: [])


async def test_the_flow_must_leave_one_result_per_row():
    import pyarrow as pa

    class Short(Summaries):
        async def post_async(self, shared, prep_res, exec_res_list):
            shared["results"] = exec_res_list[:-1]

    runner = FlowRunner(Short)
    batch = pa.Table.from_pylist([{"id": i, "text": prompt(i)} for i in range(3)])
    with pytest.raises(ValueError, match=r"one result per row .* \(3 rows in this batch\).* list of 2"):
        await runner(batch)


async def test_each_kind_of_result_becomes_columns_and_a_failed_item_its_error():
    import pyarrow as pa

    class Mixed(Summaries):
        async def exec_async(self, text):
            i = int(text.split()[2])
            if i == 1:
                raise RuntimeError("no luck")
            if i == 2:
                return {"label": "x", "score": 2}
            if i == 3:
                return 3
            return await call_llm_async(text, model="offline/offline-small")

    runner = FlowRunner(Mixed)
    batch = pa.Table.from_pylist([{"id": i, "text": prompt(i)} for i in range(4)])
    out = (await runner(batch)).to_pylist()
    assert out[0]["text"] == expected_text(0) and out[0]["via"] == "concurrent" and out[0]["error"] is None
    assert out[1]["error"] == "RuntimeError: no luck" and out[1]["id"] == 1
    assert (out[2]["label"], out[2]["score"]) == ("x", 2)
    assert out[3]["result"] == 3
    assert out[2]["error"] is None and out[3]["label"] is None  # every row has every column
    assert result_columns(ValueError("bad"))["error"] == "ValueError: bad"


async def test_a_flow_that_raises_gives_every_row_of_its_batch_the_error():
    import pyarrow as pa

    class Broken(Summaries):
        async def exec_async(self, text):
            raise RuntimeError("no luck")

        async def exec_fallback_async(self, prep_res, exc):
            raise exc  # pocketflow's default: the node fails

    batch = pa.Table.from_pylist([{"id": i, "text": prompt(i)} for i in range(3)])
    out = (await FlowRunner(Broken)(batch)).to_pylist()
    assert [(r["id"], r["error"], r["text"]) for r in out] == [
        (i, "RuntimeError: no luck", None) for i in range(3)
    ]


async def test_values_arrow_cannot_type_go_out_as_python_objects():
    import pyarrow as pa

    class Thing:
        pass

    thing = Thing()

    class Odd(Summaries):
        async def exec_async(self, text):
            return ValueError("bad") if "item 0" in text else thing

    batch = pa.Table.from_pylist([{"id": i, "text": prompt(i)} for i in range(2)])
    out = (await FlowRunner(Odd)(batch)).to_dict("records")
    assert out[0]["error"] == "ValueError: bad" and out[1]["result"] is thing


def test_without_redis_map_flow_warns_that_each_actor_keeps_its_own_limit(cluster, monkeypatch):
    import pocketbatch.ray as pbray

    monkeypatch.setattr(pbray, "_warned_local_limits", False)
    with pytest.warns(
        UserWarning, match="each of the 3 actors keeps its own rate limit.*POCKETBATCH_REDIS_URL"
    ):
        map_flow(dataset(4, 2), make_flow, batch_size=2, actors=3)  # lazy: nothing runs


async def test_a_sync_flow_runs_too():
    import pyarrow as pa

    from pocketbatch import BatchNode, Flow, call_llm

    class SyncSummaries(BatchNode):
        def prep(self, shared):
            return [row["text"] for row in shared["rows"]]

        def exec(self, text):
            return call_llm(text, model="offline/offline-small")

        def post(self, shared, prep_res, exec_res):
            shared["results"] = exec_res

    batch = pa.Table.from_pylist([{"id": i, "text": prompt(i)} for i in range(3)])
    out = (await FlowRunner(lambda: Flow(start=SyncSummaries()))(batch)).to_pylist()
    assert [r["text"] for r in out] == [expected_text(i) for i in range(3)]


def test_the_core_never_imports_ray():
    import subprocess

    code = "import sys, pocketbatch, pocketbatch.cli; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
