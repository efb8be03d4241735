"""Batch rounds are journaled: a re-run re-attaches to its job or reuses its results, never pays twice."""

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketbatch import LLMResponse, RequestError, Usage
from pocketbatch.default_plugins.offline import OfflineBatch
from pocketbatch.engine import events
from pocketbatch.engine.batch import CancelPolicy, cancel_policy
from pocketbatch.journal import Journal, decode, encode, journal
from pocketbatch.testing import FakeBatch, FakeProvider, ask_each

BIN = Path(sys.executable).parent / "pocketbatch"


@pytest.fixture(autouse=True)
def batches(pocketbatch_env, monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0.05")
    pocketbatch_env(
        POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_MODE="batch", POCKETBATCH_PROVIDER="offline"
    )


def jobs_submitted():
    return len(list(OfflineBatch.folder().glob("*.json")))


async def run(items):
    """Each item asks "say <item>" in one parallel node; the replies and the round's decision lines."""
    with events.summarize() as summary:
        out = await ask_each([f"say {item}" for item in items])
    return out, [d.reason for d in summary.decisions]


def test_outcomes_round_trip_through_json():
    r = LLMResponse("hi", usage=Usage(2, 3), model="m", provider="p", via="batch", cost_usd=0.1)
    back = decode(json.loads(json.dumps(encode(r))))
    assert (back, back.usage, back.via, back.cost_usd) == ("hi", Usage(2, 3), "batch", 0.1)
    err = decode(encode(RequestError("bad", status=400)))
    assert isinstance(err, RequestError) and err.status == 400 and not err.retryable


def test_the_journal_keeps_no_prompts_and_no_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    asyncio.run(run(["a secret prompt"]))
    dump = "\n".join(sqlite3.connect(journal().path).iterdump())
    assert "say a secret prompt" not in dump.split("outcomes")[0]  # jobs hold hashes and ids only
    assert "sk-secret-value" not in dump


async def test_running_the_same_round_again_reuses_its_results():
    first, _ = await run(list(range(5)))
    again, reasons = await run(list(range(5)))
    assert again == first and [r.via for r in again] == ["batch"] * 5
    assert jobs_submitted() == 1
    assert "reusing 5 results from the journal" in reasons[0]


async def test_the_same_requests_in_another_order_are_the_same_round():
    await run([1, 2, 3])
    again, reasons = await run([3, 1, 2])
    assert ["say 3" in again[0], "say 1" in again[1]] == [True, True]
    assert jobs_submitted() == 1 and "reusing 3" in reasons[0]


async def test_fresh_submits_anew(pocketbatch_env):
    await run([1, 2])
    pocketbatch_env(POCKETBATCH_REUSE="0", POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_MODE="batch",
                    POCKETBATCH_PROVIDER="offline")  # fmt: skip
    await run([1, 2])
    assert jobs_submitted() == 2


async def test_a_job_left_running_is_re_attached_not_resubmitted(monkeypatch):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "0.5")
    cancel_policy.set(CancelPolicy("leave"))  # as the CLI does on Ctrl-C when asked to leave jobs running
    task = asyncio.ensure_future(run(list(range(4))))
    while jobs_submitted() == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancel_policy.set(None)
    out, reasons = await run(list(range(4)))
    assert [f"say {i}" in r for i, r in enumerate(out)] == [True] * 4
    assert jobs_submitted() == 1 and "re-attaching to offline-batch-" in reasons[0]
    assert [j.state for j in journal().jobs()] == ["collected"]


async def test_even_a_concurrent_choice_goes_back_to_a_journaled_batch_round(pocketbatch_env):
    await run([1, 2, 3])
    pocketbatch_env(
        POCKETBATCH_MODE="concurrent", POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_PROVIDER="offline"
    )
    again, reasons = await run([1, 2, 3])
    assert {r.via for r in again} == {"batch"} and "not paying twice" in reasons[0]


def test_jobs_are_listed_with_their_state(tmp_path):
    store = Journal(tmp_path / "j.sqlite3")
    store.add_job("job-1", "round-a", "offline", "m", ["a", "b"])
    store.set_state("job-1", "ended", {"succeeded": 2})
    [job] = store.jobs()
    assert (job.job_id, job.state, job.counts, job.custom_ids) == (
        "job-1",
        "ended",
        {"succeeded": 2},
        ["a", "b"],
    )


# -- a real process, killed ------------------------------------------------------------------------


def cli_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    env.update(
        POCKETBATCH_JOURNAL=str(tmp_path / "journal.sqlite3"),
        POCKETBATCH_OFFLINE_DIR=str(tmp_path / "offline"),
        POCKETBATCH_OFFLINE_LATENCY="0",
        POCKETBATCH_POLL_INTERVAL="0.05",
        **extra,
    )
    return env


def start_run(tmp_path, env):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(f"prompt {i}") + "\n" for i in range(20)))
    args = [str(BIN), "run", str(src), "-o", str(tmp_path / "out.jsonl"), "--mode", "batch"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds=30):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def job_states(tmp_path):
    path = tmp_path / "journal.sqlite3"
    if not path.exists():
        return []
    try:
        return [row[0] for row in sqlite3.connect(path).execute("SELECT state FROM jobs")]
    except sqlite3.OperationalError:  # the table is not there yet
        return []


def finish_and_check(tmp_path, env):
    rerun = start_run(tmp_path, env)
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(1, 21))
    assert all(f"prompt {r['id'] - 1}" in r["text"] and r["via"] == "batch" for r in rows)
    assert len(list((tmp_path / "offline").glob("*.json"))) == 1  # one job submitted in all


def test_killed_while_the_job_runs_the_rerun_re_attaches(tmp_path):
    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="2")
    first = start_run(tmp_path, env)
    wait_for(lambda: job_states(tmp_path) == ["running"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    finish_and_check(tmp_path, env)
    assert job_states(tmp_path) == ["collected"]


def test_killed_while_results_download_the_rerun_reads_them_again(tmp_path):
    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="0.2", POCKETBATCH_OFFLINE_DOWNLOAD_SECONDS="3")
    first = start_run(tmp_path, env)
    wait_for(lambda: job_states(tmp_path) == ["ended"])  # ended at the provider, results not yet read
    first.send_signal(signal.SIGKILL)
    first.wait()
    env["POCKETBATCH_OFFLINE_DOWNLOAD_SECONDS"] = "0"
    finish_and_check(tmp_path, env)


def test_ctrl_c_without_a_terminal_leaves_jobs_running_and_says_how_to_resume(tmp_path):
    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="2")
    first = start_run(tmp_path, env)
    wait_for(lambda: job_states(tmp_path) == ["running"])
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 130
    assert "Left batch jobs running: offline-batch-" in err and "pocketbatch run" in err
    assert "Traceback" not in err
    [job] = list((tmp_path / "offline").glob("*.json"))
    assert json.loads(job.read_text())["cancelled"] is None  # left running at the provider
    finish_and_check(tmp_path, env)


def test_batches_commands_over_the_journal(tmp_path):
    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="30")
    first = start_run(tmp_path, env)
    wait_for(lambda: job_states(tmp_path) == ["running"])
    first.send_signal(signal.SIGKILL)
    first.wait()

    def cli(*args):
        done = subprocess.run(
            [str(BIN), "batches", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    [listed] = json.loads(cli("list", "--json"))
    assert (listed["provider"], listed["requests"], listed["state"]) == ("offline", 20, "running")
    shown = json.loads(cli("show", listed["job_id"], "--json"))
    assert shown["provider_status"] == {"state": "running", "counts": {"processing": 20}}
    assert "cancelling" in cli("cancel", listed["job_id"])
    resumed = cli("resume", listed["job_id"])
    counts = json.loads(resumed.split(": ", 1)[1].split("; ")[0])
    assert counts["canceled"] + counts.get("succeeded", 0) == 20 and counts["to_rerun"] == counts["canceled"]
    assert json.loads(cli("list", "--json"))[0]["state"] == "collected"
    assert listed["job_id"] in cli("list")  # the table


def test_batches_show_unknown_job_is_exit_2(tmp_path):
    env = cli_env(tmp_path)
    done = subprocess.run([str(BIN), "batches", "show", "nope"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "no batch job 'nope' in the journal" in done.stderr


def test_ctrl_c_on_a_terminal_asks_and_can_cancel_the_jobs(tmp_path):
    import pty

    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="30", TERM="dumb")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(f"prompt {i}") + "\n" for i in range(20)))
    leader, follower = pty.openpty()
    args = [str(BIN), "run", str(src), "-o", str(tmp_path / "out.jsonl"), "--mode", "batch"]
    proc = subprocess.Popen(args, env=env, stdin=follower, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    wait_for(lambda: job_states(tmp_path) == ["running"])
    proc.send_signal(signal.SIGINT)  # Ctrl-C (the pty is not its controlling terminal, so no ^C byte)

    screen = b""
    while b"leave" not in screen:
        screen += os.read(leader, 1024)
    os.write(leader, b"cancel\n")
    assert proc.wait(timeout=30) == 130
    os.close(leader)
    [job] = list((tmp_path / "offline").glob("*.json"))
    assert json.loads(job.read_text())["cancelled"] is not None  # cancelled at the provider, as asked


async def test_a_journaled_job_the_provider_lost_runs_concurrently_once(monkeypatch):
    await run([1, 2, 3])
    [job] = journal().jobs()
    journal().set_state(job.job_id, "running")  # as if the run had died before collecting
    journal().db.execute("DELETE FROM outcomes")
    for path in OfflineBatch.folder().glob("*.json"):
        path.unlink()  # the provider forgot the job (deleted, or past its retention)
    again, reasons = await run([1, 2, 3])
    assert [f"say {i}" in r for i, r in zip([1, 2, 3], again, strict=True)] == [True] * 3
    assert {r.via for r in again} == {"concurrent"} and "re-attaching" in reasons[0]
    assert [j.state for j in journal().jobs()] == ["lost"]
    third, reasons = await run([1, 2, 3])  # the answers were journaled: no job, no call
    assert third == again and "reusing 3 results" in reasons[0] and jobs_submitted() == 0


async def test_two_runs_of_the_same_round_at_once_submit_one_job(register_provider):
    class SlowToAccept(FakeBatch):
        async def submit(self, items):
            await asyncio.sleep(0.05)  # an upload takes time: the other run could slip in meanwhile
            return await super().submit(items)

    fake = register_provider(FakeProvider("slow", batch=True))
    fake.batch = SlowToAccept(fake)
    first, second = await asyncio.gather(
        ask_each(["a", "b", "c"], model="slow/m", mode="batch"),
        ask_each(["a", "b", "c"], model="slow/m", mode="batch"),
    )
    assert first == second == ["reply to a", "reply to b", "reply to c"]
    assert len(fake.batch.jobs) == 1  # the second run waited for the lease and re-attached


def test_a_lease_left_by_a_dead_process_does_not_hold(tmp_path):
    store = Journal(tmp_path / "j.sqlite3")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    here = socket.gethostname()
    store.db.execute(
        "INSERT INTO leases VALUES ('r', ?, ?)", (f"{here}:{gone.stdout.strip()}:x", time.time())
    )
    assert store.acquire("r", "elsewhere:1:y")  # its process is gone: the lease is free
    assert not store.acquire("r", f"{here}:{os.getpid()}:z")  # a live holder (elsewhere:1) holds it
    store.release("r", "elsewhere:1:y")
    assert store.acquire("r", f"{here}:{os.getpid()}:z")


# -- the journal in Redis (POCKETBATCH_JOURNAL=redis://...) ----------------------------------------


@pytest.fixture
def redis_journal_url(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_both_journals_keep_the_same_things(kind, tmp_path, request):
    from pocketbatch.redis_journal import RedisJournal

    if kind == "redis":
        store = RedisJournal(request.getfixturevalue("redis_journal_url"))
    else:
        store = Journal(tmp_path / "j.sqlite3")
    assert not store.knows("round-a") and not store.has_jobs("offline", "m") and store.jobs() == []
    store.add_job("job-1", "round-a", "offline", "m", ["a", "b"])
    store.add_job("job-2", "round-b", "offline", "m", ["c"])
    store.set_state("job-1", "ended", {"succeeded": 2})
    [job] = store.jobs("round-a")
    assert (job.job_id, job.state, job.counts, job.custom_ids) == (
        "job-1",
        "ended",
        {"succeeded": 2},
        ["a", "b"],
    )
    assert job.ended_at is not None and store.job("job-2").ended_at is None and store.job("nope") is None
    assert [j.job_id for j in store.jobs()] == ["job-1", "job-2"]
    assert store.knows("round-a") and store.has_jobs("offline", "m") and not store.has_jobs("offline", "x")
    store.save_outcomes(
        "round-a", {"a": LLMResponse("hi", usage=Usage(1, 2)), "b": RequestError("no")}, "job-1"
    )
    outcomes = store.outcomes("round-a")
    assert outcomes["a"] == "hi" and isinstance(outcomes["b"], RequestError)
    me, other = f"{socket.gethostname()}:{os.getpid()}:a", f"{socket.gethostname()}:{os.getpid()}:b"
    assert store.acquire("round-c", me) and store.acquire("round-c", me)
    assert not store.acquire("round-c", other)  # a live holder keeps it
    store.release("round-c", other)  # not the holder: nothing happens
    assert not store.acquire("round-c", other)
    store.release("round-c", me)
    assert store.acquire("round-c", other)
    dead = f"{socket.gethostname()}:999999999:c"  # no such process: its lease no longer holds
    assert store.acquire("round-d", dead) and store.acquire("round-d", me)
    store.close()


def test_the_redis_journal_keeps_no_prompts_and_no_keys(redis_journal_url, monkeypatch):
    import redis

    monkeypatch.setenv("POCKETBATCH_JOURNAL", redis_journal_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    from pocketbatch import config

    config.reload()
    asyncio.run(run(["a secret prompt"]))
    client = redis.Redis.from_url(redis_journal_url, decode_responses=True)
    dump = {k: client.dump(k) for k in client.keys("*")}
    jobs = [repr(v) for k, v in dump.items() if ":outcomes:" not in k]
    assert dump and not any("a secret prompt" in v or "sk-secret-value" in v for v in jobs)
    client.close()


def test_a_job_submitted_on_one_machine_is_resumed_from_another(tmp_path, redis_journal_url):
    """Machine A (its own HOME) submits, is killed; machine B (another HOME) re-attaches through the same
    Redis journal: one job in all. The offline provider's folder stands for the provider both reach."""
    import redis

    client = redis.Redis.from_url(redis_journal_url, decode_responses=True)

    def states():
        return [client.hget(k, "state") for k in client.keys("pocketbatch:{journal}:job:*")]

    env = {
        **cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="2"),
        "POCKETBATCH_JOURNAL": redis_journal_url,
    }
    (tmp_path / "home-a").mkdir()
    (tmp_path / "home-b").mkdir()
    first = start_run(tmp_path, {**env, "HOME": str(tmp_path / "home-a"), "XDG_CACHE_HOME": ""})
    wait_for(lambda: states() == ["running"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    finish_and_check(tmp_path, {**env, "HOME": str(tmp_path / "home-b"), "XDG_CACHE_HOME": ""})
    assert states() == ["collected"]
    assert not list(tmp_path.glob("home-*/**/*.sqlite3"))  # no SQLite journal on either machine
    client.close()
