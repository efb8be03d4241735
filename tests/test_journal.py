"""Batch rounds are journaled: a re-run re-attaches to its job or reuses its results, never pays twice."""

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketbatch import BatchError, LLMResponse, RequestError, TransientError, Usage
from pocketbatch.default_plugins.offline import OfflineBatch
from pocketbatch.engine import events
from pocketbatch.engine.batch import CancelPolicy, cancel_policy
from pocketbatch.journal import Journal, decode, encode, journal, lease_holder
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
    cached = LLMResponse("hi", usage=Usage(9, 1, cache_read_tokens=5, cache_write_tokens=2))
    assert decode(json.loads(json.dumps(encode(cached)))).usage == cached.usage
    one_hour = LLMResponse("hi", usage=Usage(9, 1, 5, 2, cache_write_1h_tokens=1))
    assert decode(json.loads(json.dumps(encode(one_hour)))).usage == one_hour.usage
    err = decode(encode(RequestError("bad", status=400)))
    assert isinstance(err, RequestError) and err.status == 400 and not err.retryable


def test_outcomes_round_trip_through_the_journals_columns(tmp_path):
    store = Journal(tmp_path / "j.sqlite3")
    outcomes = {
        "a": LLMResponse(
            "hi",
            usage=Usage(9, 1, 5, 2, cache_write_1h_tokens=1),
            model="m",
            provider="p",
            via="batch",
            cost_usd=0.25,
        ),
        "b": LLMResponse("plain", usage=Usage(2, 3)),
        "c": RequestError("bad", status=400),
    }
    store.save_outcomes("r", outcomes, "job-1")
    back = store.outcomes("r")
    assert (back["a"], back["a"].usage, back["a"].model, back["a"].via, back["a"].cost_usd) == (
        "hi", Usage(9, 1, 5, 2, cache_write_1h_tokens=1), "m", "batch", 0.25)  # fmt: skip
    assert (back["b"], back["b"].usage, back["b"].cost_usd) == ("plain", Usage(2, 3), None)
    assert isinstance(back["c"], RequestError) and back["c"].status == 400 and not back["c"].retryable
    assert store.db.execute("SELECT COUNT(*) FROM outcomes WHERE outcome != ''").fetchone()[0] == 0


def test_an_older_journals_json_outcomes_still_read_beside_new_ones(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the outcomes table as journals before its columns had it
    old.execute("CREATE TABLE outcomes (round TEXT NOT NULL, custom_id TEXT NOT NULL, job_id TEXT, "
                "outcome TEXT NOT NULL, PRIMARY KEY (round, custom_id))")  # fmt: skip
    written = json.dumps(encode(LLMResponse("from before", usage=Usage(4, 5), via="batch", cost_usd=0.5)))
    old.execute("INSERT INTO outcomes VALUES ('r', 'old', 'job-0', ?)", (written,))
    old.commit()
    old.close()
    store = Journal(path)
    store.save_outcomes("r", {"new": LLMResponse("after", usage=Usage(1, 1))})
    back = store.outcomes("r")
    assert (back["old"], back["old"].usage, back["old"].cost_usd) == ("from before", Usage(4, 5), 0.5)
    assert (back["new"], back["new"].usage) == ("after", Usage(1, 1))


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


# -- no double submission ------------------------------------------------------------------------

KILLED_AFTER_CREATE = """
import os, signal, sys
from pocketbatch.cli import main
from pocketbatch.default_plugins.offline import OfflineBatch

create = OfflineBatch.submit_tagged

async def create_then_die(self, items, tag):
    await create(self, items, tag)  # the provider has the job; its id never reaches the journal
    os.kill(os.getpid(), signal.SIGKILL)

OfflineBatch.submit_tagged = create_then_die
sys.argv = ["pocketbatch", *sys.argv[1:]]
sys.exit(main())
"""


def test_killed_between_create_and_the_journal_write_the_rerun_finds_the_job(tmp_path):
    env = cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="0.2")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(f"prompt {i}") + "\n" for i in range(20)))
    args = ["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--mode", "batch"]
    first = subprocess.run([sys.executable, "-c", KILLED_AFTER_CREATE, *args], env=env, capture_output=True)
    assert first.returncode == -signal.SIGKILL
    assert job_states(tmp_path) == []  # no job id was written down, only the "submitting" row
    assert len(list((tmp_path / "offline").glob("*.json"))) == 1
    finish_and_check(tmp_path, env)  # one job in all: the re-run found it at the provider
    assert job_states(tmp_path) == ["collected"]
    rows = sqlite3.connect(tmp_path / "journal.sqlite3").execute("SELECT * FROM submissions").fetchall()
    assert rows == []


async def test_a_lost_answer_to_the_create_call_is_looked_up_before_submitting_again(monkeypatch):
    create = OfflineBatch.submit_tagged
    lost = []

    async def answer_lost_once(self, items, tag):
        job_id = await create(self, items, tag)
        if not lost:
            lost.append(job_id)
            raise TransientError("the connection dropped before the answer came")  # the job exists
        return job_id

    monkeypatch.setattr(OfflineBatch, "submit_tagged", answer_lost_once)
    out, _ = await run([1, 2, 3])
    assert [f"say {i}" in r for i, r in zip([1, 2, 3], out, strict=True)] == [True] * 3
    assert {r.via for r in out} == {"batch"} and jobs_submitted() == 1
    assert [j.job_id for j in journal().jobs()] == lost


async def test_a_provider_that_cannot_find_jobs_keeps_the_submitting_row_after_failing(
    monkeypatch, pocketbatch_env
):
    async def always_lost(self, items, tag):
        raise TransientError("the connection dropped")

    async def finds_nothing(self, tag, items, since):
        return None

    monkeypatch.setattr(OfflineBatch, "submit_tagged", always_lost)
    monkeypatch.setattr(OfflineBatch, "find", finds_nothing)
    pocketbatch_env(POCKETBATCH_MAX_RETRIES="2", POCKETBATCH_POLL_INTERVAL="0.01", POCKETBATCH_MODE="batch",
                    POCKETBATCH_PROVIDER="offline")  # fmt: skip
    out, _ = await run([1, 2])
    assert {r.via for r in out} == {"concurrent"}  # answered all the same
    [(key,)] = journal().db.execute("SELECT DISTINCT round FROM submissions").fetchall()
    [sub] = journal().submissions(key)
    assert len(sub.custom_ids) == 2  # a later run of a round with these requests asks the provider first


# -- a journal that stays small ----------------------------------------------------------------------


def age(round_key, days):
    """Make a round look last used `days` ago (its jobs too)."""
    then = time.time() - days * 86400
    journal().db.execute("UPDATE rounds SET last_used = ? WHERE round = ?", (then, round_key))
    journal().db.execute(
        "UPDATE jobs SET submitted_at = ?, ended_at = ? WHERE round = ?", (then, then, round_key)
    )


def prune(*args):
    from click.testing import CliRunner

    from pocketbatch.cli import cli

    done = CliRunner().invoke(cli, ["batches", "prune", *args])
    assert done.exit_code == 0, done.output
    return done.output


async def test_prune_deletes_old_ended_rounds_and_keeps_recent_and_running_ones(monkeypatch):
    await run(["old"])
    await run(["recent"])
    old, recent = [job.round for job in journal().jobs()]
    monkeypatch.setenv("POCKETBATCH_OFFLINE_BATCH_SECONDS", "600")
    cancel_policy.set(CancelPolicy("leave"))
    task = asyncio.ensure_future(run(["still running"]))
    while len(journal().jobs()) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancel_policy.set(None)
    running = journal().jobs()[-1].round
    age(old, 40)
    age(running, 40)

    dry = prune("--dry-run")
    assert re.match(
        r"would prune 1 round last used before [-0-9]+ [:0-9]+ \(1 job, 1 results, [0-9]+ bytes", dry
    )
    assert "kept 1 with jobs still running" in dry
    assert len(journal().jobs()) == 3  # a dry run deletes nothing

    done = prune("--older-than", "30d")
    pruned = r"pruned 1 round last used before .* \(1 job, 1 results, .* of records\); kept 1 .*\nfreed "
    assert re.match(pruned, done)
    assert {job.round for job in journal().jobs()} == {recent, running}
    assert journal().outcomes(old) == {} and journal().outcomes(recent) != {}
    assert not journal().knows(old)
    everything = prune("--older-than", "0")  # all but the round whose job is still running
    assert everything.startswith("pruned 1 round") and "kept 1 with jobs still running" in everything
    assert [job.round for job in journal().jobs()] == [running]


def test_prune_refuses_a_duration_it_cannot_read():
    from click.testing import CliRunner

    from pocketbatch.cli import cli

    done = CliRunner().invoke(cli, ["batches", "prune", "--older-than", "soon"])
    assert done.exit_code == 2 and "'soon' is not a duration" in done.output


def test_an_older_journal_gets_its_rounds_dated_when_opened(tmp_path):
    path = tmp_path / "old.sqlite3"
    store = Journal(path)
    store.add_job("job-1", "round-a", "offline", "m", ["a"])
    store.db.execute("UPDATE jobs SET submitted_at = 1000, ended_at = 2000")
    store.save_outcomes("round-b", {"x": LLMResponse("hi")})  # a round known only by its outcomes
    store.db.execute("DROP TABLE rounds")  # as journals written before it were
    store.close()
    reopened = Journal(path)
    rows = dict(reopened.db.execute("SELECT round, last_used FROM rounds").fetchall())
    assert rows["round-a"] == 2000 and rows["round-b"] > time.time() - 3600  # undated: counted from now


async def test_a_create_call_answered_with_an_error_leaves_no_submitting_row(monkeypatch):
    async def queue_full(self, items, tag):
        raise BatchError("the batch queue is full", status=429, retryable=True)  # an answer: no job

    monkeypatch.setattr(OfflineBatch, "submit_tagged", queue_full)
    out, _ = await run([1, 2])
    assert {r.via for r in out} == {"concurrent"}
    assert journal().db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 0


# -- the journal in Redis (POCKETBATCH_JOURNAL=redis://...) ----------------------------------------


def open_store(kind, tmp_path, request):
    """A journal of either kind: SQLite in tmp_path, or Redis at the test server."""
    from pocketbatch.redis_journal import RedisJournal

    if kind == "redis":
        return RedisJournal(request.getfixturevalue("redis_url"))
    return Journal(tmp_path / "j.sqlite3")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_both_journals_keep_the_same_things(kind, tmp_path, request):
    store = open_store(kind, tmp_path, request)
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


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_both_journals_keep_submitting_rows_and_prune_alike(kind, tmp_path, request):
    store = open_store(kind, tmp_path, request)
    started = store.start_submission("round-s", "round-s-0", "offline", "m", ["a", "b"])
    assert store.start_submission("round-s", "round-s-0", "offline", "m", ["a", "b"]) == started
    assert store.knows("round-s") and store.has_jobs("offline", "m")
    [sub] = store.submissions("round-s")
    assert (sub.tag, sub.custom_ids, sub.started_at) == ("round-s-0", ["a", "b"], started)
    store.add_job("job-s", "round-s", "offline", "m", ["a", "b"], tag="round-s-0")
    assert store.submissions("round-s") == []  # known by its job id from now on
    store.start_submission("round-t", "round-t-0", "offline", "m", ["c"])
    store.end_submission("round-t", "round-t-0")
    assert store.submissions("round-t") == []

    store.add_job("job-old", "round-old", "offline", "m", ["x"])
    store.save_outcomes("round-old", {"x": LLMResponse("done")}, "job-old")
    store.set_state("job-old", "collected")
    for round in ("round-s", "round-old"):
        store.touch(round, "offline", "m")
    later = time.time() + 3600  # both rounds are older than this; round-s's job is still running
    dry = store.prune(later, dry_run=True)
    assert (dry.rounds, dry.jobs, dry.outcomes, dry.kept) == (1, 1, 1, 1)
    assert store.job("job-old") is not None  # a dry run deletes nothing
    done = store.prune(later)
    assert (done.rounds, done.jobs, done.outcomes, done.kept) == (1, 1, 1, 1)
    assert store.job("job-old") is None and store.outcomes("round-old") == {}
    assert not store.knows("round-old") and store.job("job-s") is not None
    assert done.size_after <= done.size_before
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_dry_run_prune_says_exactly_what_the_real_one_deletes(kind, tmp_path, request):
    store = open_store(kind, tmp_path, request)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = f"{socket.gethostname()}:{gone.stdout.strip()}:x"  # a run that died holding its lease
    # A round whose run died after taking its lease, before any job (no submitting row left either);
    store.touch("round-dead", "offline", "m")
    assert store.acquire("round-dead", dead)
    # one that ended and was collected, its lease also left by a dead run;
    store.add_job("job-old", "round-old", "offline", "m", ["x", "y"])
    store.save_outcomes("round-old", {"x": LLMResponse("done"), "y": LLMResponse("done too")}, "job-old")
    store.set_state("job-old", "collected")
    store.touch("round-old", "offline", "m")
    assert store.acquire("round-old", dead)
    # and one a live run holds, which stays.
    store.touch("round-live", "offline", "m")
    assert store.acquire("round-live", lease_holder())
    later = time.time() + 3600
    dry = store.prune(later, dry_run=True)
    done = store.prune(later)
    assert (dry.rounds, dry.jobs, dry.outcomes, dry.kept) == (
        done.rounds,
        done.jobs,
        done.outcomes,
        done.kept,
    )
    assert (done.rounds, done.jobs, done.outcomes, done.kept) == (2, 1, 2, 1)
    assert dry.records_bytes == done.records_bytes > 0
    assert store.job("job-old") is None and not store.knows("round-old") and store.outcomes("round-old") == {}
    again = store.prune(later, dry_run=True)
    assert (again.rounds, again.kept, again.records_bytes) == (0, 1, 0)  # only the live run's round is left
    store.close()


def test_the_redis_journal_keeps_no_prompts_and_no_keys(redis_url, monkeypatch):
    import redis

    monkeypatch.setenv("POCKETBATCH_JOURNAL", redis_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    from pocketbatch import config

    config.reload()
    asyncio.run(run(["a secret prompt"]))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    dump = {k: client.dump(k) for k in client.keys("*")}
    jobs = [repr(v) for k, v in dump.items() if ":outcomes:" not in k]
    assert dump and not any("a secret prompt" in v or "sk-secret-value" in v for v in jobs)
    client.close()


def test_a_job_submitted_on_one_machine_is_resumed_from_another(tmp_path, redis_url):
    """Machine A (its own HOME) submits, is killed; machine B (another HOME) re-attaches through the same
    Redis journal: one job in all. The offline provider's folder stands for the provider both reach."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def states():
        return [client.hget(k, "state") for k in client.keys("pocketbatch:{journal}:job:*")]

    env = {
        **cli_env(tmp_path, POCKETBATCH_OFFLINE_BATCH_SECONDS="2"),
        "POCKETBATCH_JOURNAL": redis_url,
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
