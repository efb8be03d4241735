"""Client-side cost of the batch path (issue 8): N requests through `BatchRound` against the OpenAI
emulator with the real `openai` SDK, next to plain `json.dumps` + `json.loads` of the same lines.

    .venv/bin/python bench/batch.py [--requests 50000] [--runs 3] [--profile]

Timed (the client side): custom_ids and the round key, splitting, building and checking the JSONL
lines, the SDK's multipart upload and batch calls, polling (POCKETBATCH_POLL_INTERVAL=0.001),
streaming and parsing the output file, pricing, the journal (a new SQLite file per run, as in real
use), and settling every call so that its result reads back in input order. Not timed: building the
LLMRequests (the caller's work), and the emulator's handling of each HTTP request (parsing the upload,
validating it, making the completions, writing the output file): it runs in-process, so its time is
measured around each request it answers and subtracted. Garbage collection is counted where it
happens: in the client's time or in the emulator's.

The baseline, in the same run: `json.dumps` of each request line as uploaded, joined into one file, and
`json.loads` of each line of the output file as served; once with the parsed results dropped as they
are made, once kept in a list (the batch path has to hold every result until the round ends, and
holding them is what makes the garbage collector walk them).

Peak memory comes from a separate run under tracemalloc (which slows everything down, so it never
shares a run with the timings). The client-side peak leaves out what the emulator holds between the
requests it answers (its copy of the upload, the parsed lines, the output file), estimated with
sys.getsizeof: see `TimedEmulator`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

MODEL = "gpt-4o-mini"


def _configure(journal: Path) -> None:
    # A new journal file for each run: the same round in an old one would be reused instead of run.
    os.environ["POCKETBATCH_JOURNAL"] = str(journal)
    os.environ["POCKETBATCH_POLL_INTERVAL"] = "0.001"
    os.environ["POCKETBATCH_REUSE"] = "1"
    os.environ["POCKETBATCH_LOAD_PLUGINS"] = ""  # the provider is built here, not found by entry point
    os.environ["OPENAI_API_KEY"] = "sk-bench-openai-emulator"
    os.environ.pop("OPENAI_BASE_URL", None)


def _emulator_class() -> type:
    from pocketbatch_openai.testing import OpenAIEmulator

    class TimedEmulator(OpenAIEmulator):
        """The emulator, timing its own work and keeping no more than the job needs.

        Under tracemalloc it also measures the client's peak: at each request it answers, the traced
        peak since the previous one, less what the emulator held in between, is the client's.
        """

        def __init__(self) -> None:
            super().__init__()
            self.server_seconds = 0.0
            self.handling = False  # read by the GC callback: whose time a collection is
            self.uploads: list[bytes] = []  # for the baseline: the client deletes its input files
            self.outputs: list[bytes] = []
            self.held = 0  # bytes the emulator allocated and still holds (measured under tracemalloc)
            self.client_peak = 0

        def _handle(self, request: Any) -> Any:
            if tracemalloc.is_tracing():
                self._client_interval_ended()
            self.handling = True
            start = time.perf_counter()
            try:
                return super()._handle(request)
            finally:
                # The emulator's and respx's records of every request and reply (each whole upload
                # among them) are for test assertions; kept, they would count as the client's memory.
                self._mock.reset()
                self.requests.clear()
                self._routes.clear()
                self.server_seconds += time.perf_counter() - start
                self.handling = False
                if tracemalloc.is_tracing():
                    self._server_interval_ended()

        def _add_file(self, filename: str, content: bytes, purpose: str) -> dict:
            (self.uploads if purpose == "batch" else self.outputs).append(content)
            return super()._add_file(filename, content, purpose)

        def _file_content(self, request: Any, file_id: str) -> Any:
            # A server streams a file; respx would hand the client the whole body as one chunk, and
            # charge it a copy of the whole output file that no real download makes.
            if file_id not in self.files:
                return super()._file_content(request, file_id)
            import httpx

            content = self.files[file_id]["content"]

            async def chunks() -> Any:
                for start in range(0, len(content), 65536):
                    yield content[start : start + 65536]

            headers = {"content-type": "application/octet-stream", "x-request-id": f"req_{file_id}"}
            return httpx.Response(200, content=chunks(), headers=headers)

        def _finish(self, batch: dict, job: Any, status: str) -> None:
            super()._finish(batch, job, status)
            job.lines = []  # the parsed input is not needed once the output file is written

        def _client_interval_ended(self) -> None:
            self.client_peak = max(self.client_peak, tracemalloc.get_traced_memory()[1] - self.held)

        def _server_interval_ended(self) -> None:
            # Filtering tracemalloc's traces by the emulator's frames takes minutes at this size; the
            # emulator's state is a few plain containers, so their deep size stands in for it.
            state = (self.files, self.batches, [job.lines for job in self._jobs.values()])
            self.held = _deep_size((state, self.uploads, self.outputs))
            tracemalloc.reset_peak()

    return TimedEmulator


def _deep_size(root: Any) -> int:
    """sys.getsizeof of root and of every container, string and number it reaches, each counted once."""
    seen: set[int] = set()
    size, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
    return size


def _requests(n: int) -> list:
    from pocketbatch import LLMRequest

    # A short extraction prompt, each one distinct, as a real round's are.
    return [
        LLMRequest(
            messages=[
                {
                    "role": "user",
                    "content": f"Extract the product, the sentiment and a one-line summary from review "
                    f"#{i}: 'I bought the kettle in March and it still boils in under two minutes; "
                    f"the lid sticks a little.'",
                }
            ],
            model=MODEL,
            system="Answer in JSON with the keys product, sentiment and summary.",
            max_tokens=64,
            temperature=0,
        )
        for i in range(n)
    ]


@dataclass
class Run:
    wall: float  # seconds from the calls' creation to every result in a list in input order
    server: float  # seconds of it inside the emulator's handlers
    client_gc: float  # seconds of garbage collection outside them
    jobs: int
    request_lines: list[bytes]
    result_lines: list[bytes]
    peak: int = 0  # tracemalloc peak of the whole process over the round, when traced
    client_peak: int = 0  # the same less what the emulator held

    @property
    def client(self) -> float:
        return self.wall - self.server


async def _round(requests: list, provider: Any) -> tuple[float, list]:
    from pocketbatch.engine.batch import BatchRound, run
    from pocketbatch.engine.collector import Call
    from pocketbatch.engine.strategy import Decision

    decision = Decision("batch", "benchmark: mode is batch", len(requests), 0.0, None, None)
    start = time.perf_counter()
    calls = [Call(provider, request, "batch") for request in requests]
    await run(BatchRound.of(provider, calls), decision)
    results = [call.result() for call in calls]
    return time.perf_counter() - start, results


def _measure(n: int, journal: Path, *, trace: bool = False, profile: cProfile.Profile | None = None) -> Run:
    from pocketbatch import config
    from pocketbatch_openai import OpenAIProvider

    _configure(journal)
    config.reload()
    requests = _requests(n)
    with _emulator_class()() as emulator:
        provider = OpenAIProvider()
        gc_seconds = [0.0]
        started = [0.0, False]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[:] = [time.perf_counter(), emulator.handling]
            elif not started[1]:
                gc_seconds[0] += time.perf_counter() - started[0]

        gc.collect()
        gc.callbacks.append(on_gc)
        if trace:
            tracemalloc.start()
        if profile is not None:
            profile.enable()
        try:
            wall, results = asyncio.run(_round(requests, provider))
        finally:
            if profile is not None:
                profile.disable()
            gc.callbacks.remove(on_gc)
        run = Run(
            wall=wall,
            server=emulator.server_seconds,
            client_gc=gc_seconds[0],
            jobs=emulator.batches_created,
            request_lines=[line for content in emulator.uploads for line in content.splitlines()],
            result_lines=[line for content in emulator.outputs for line in content.splitlines()],
        )
        if trace:
            emulator._client_interval_ended()
            run.peak, run.client_peak = tracemalloc.get_traced_memory()[1], emulator.client_peak
            tracemalloc.stop()
    _check(requests, results)
    return run


def _check(requests: list, results: list) -> None:
    """Every request answered by the batch path, priced, in input order: else the timing means nothing."""
    assert len(results) == len(requests)
    for request, result in zip(requests, results, strict=True):
        if result.via != "batch" or result.cost_usd is None:
            raise AssertionError(f"not answered by the batch path: {result!r} ({result.via})")
        if result != f"Echo: {request.messages[0]['content']}":
            raise AssertionError(f"a result is not its request's: {str(result)[:80]!r}")


def _baseline(run: Run) -> tuple[float, float]:
    """Seconds for json.dumps of the request lines into one file plus json.loads of the result lines:
    (parsed results dropped, parsed results kept)."""
    lines = [json.loads(line) for line in run.request_lines]
    gc.collect()
    start = time.perf_counter()
    "".join([json.dumps(line) + "\n" for line in lines])
    dumps = time.perf_counter() - start
    start = time.perf_counter()
    for line in run.result_lines:
        json.loads(line)
    dropped = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    kept = [json.loads(line) for line in run.result_lines]
    kept_seconds = time.perf_counter() - start
    del kept
    return dumps + dropped, dumps + kept_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs; medians are reported")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one more run")
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory(prefix="pocketbatch-bench-") as tmp:
        journals = (Path(tmp) / f"journal-{i}.sqlite3" for i in range(args.runs + 3))
        _measure(min(n, 200), next(journals))  # warm up: imports, SDK clients, compiled regexes
        runs, dropped, kept = [], [], []
        for _ in range(args.runs):
            run = _measure(n, next(journals))
            base = _baseline(run)
            runs.append(run)
            dropped.append(base[0])
            kept.append(base[1])
        traced = _measure(n, next(journals), trace=True)
        profile = None
        if args.profile:
            profile = cProfile.Profile()
            _measure(n, next(journals), profile=profile)
    _report(n, runs, statistics.median(dropped), statistics.median(kept), traced)
    if profile is not None:
        _print_profile(pstats.Stats(profile), n)


# Client-side steps that make no HTTP request, so their cumulative time in the profile is all client.
STEPS = (
    ("custom_ids and round key", "engine/batch.py", "of"),
    ("JSONL lines built and checked", "pocketbatch_openai/batch.py", "jsonl"),
    ("result lines parsed", "pocketbatch_openai/batch.py", "_line"),
    ("pricing", "engine/batch.py", "_priced"),
    ("journal: outcomes saved", "pocketbatch/journal.py", "save_outcomes"),
    ("calls settled", "engine/collector.py", "settle"),
)


def _print_profile(stats: pstats.Stats, n: int) -> None:
    def cumulative(path: str, function: str) -> float:
        return sum(
            ct
            for (file, _, name), (_, _, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
            if name == function and file.replace(os.sep, "/").endswith(path)
        )

    # The round's coroutines run in several tasks, so the client's total is everything profiled (the
    # round and nothing else) less the emulator's handlers.
    client = stats.total_tt - cumulative("bench/batch.py", "_handle")  # type: ignore[attr-defined]
    print(f"\nwhere the client-side time goes (cProfile of one more run, {client:.2f} s profiled):")
    rest = client
    for label, path, function in STEPS:
        seconds = cumulative(path, function)
        rest -= seconds
        print(f"  {label:52} {seconds / client:4.0%}")
    print(f"  {'the rest: SDK upload and download, polling, setup':52} {rest / client:4.0%}")
    print("(garbage collection is inside whichever step triggered it; the emulator's functions are in")
    print("testing.py, by own time:)")
    stats.sort_stats("tottime").print_stats(25)


def _report(n: int, runs: list[Run], dropped: float, kept: float, traced: Run) -> None:
    client = statistics.median(r.client for r in runs)
    client_gc = statistics.median(r.client_gc for r in runs)
    server = statistics.median(r.server for r in runs)
    run = runs[0]
    request_bytes = sum(map(len, run.request_lines)) / n
    result_bytes = sum(map(len, run.result_lines)) / n
    print(
        f"pocketbatch batch path: {n:,} requests to openai/{MODEL} through the OpenAI emulator "
        f"(openai {version('openai')}, Python {platform.python_version()}, {os.cpu_count()} cores), "
        f"{run.jobs} job{'s' if run.jobs != 1 else ''}, median of {len(runs)} runs"
    )
    print(f"request line {request_bytes:,.0f} B, result line {result_bytes:,.0f} B on average\n")
    rows = [
        ("client-side batch path", client),
        ("  of which garbage collection", client_gc),
        ("json.dumps + json.loads, results dropped", dropped),
        ("json.dumps + json.loads, results kept", kept),
        ("emulator's own work (not in the above)", server),
    ]
    print(f"{'':44} {'seconds':>8} {'requests/s':>11} {'µs/request':>11}")
    for name, seconds in rows:
        rate = f"{n / seconds:11,.0f}" if "of which" not in name else f"{'':11}"
        print(f"{name:44} {seconds:8.3f} {rate} {seconds / n * 1e6:11.1f}")
    print()
    # Issue 8 asked for 3× the peer; issue 14 for 2× the peer that keeps its results, as the path must.
    for name, base, target in (("results dropped", dropped, 3), ("results kept", kept, 2)):
        ratio = client / base
        verdict = "met" if ratio <= target else "missed"
        print(f"ratio to json.dumps + json.loads, {name:16}: {ratio:4.1f}×  (target ≤ {target}×: {verdict})")
    print(
        f"peak memory (tracemalloc), client side: {traced.client_peak / n / 1024:6.2f} KiB/request "
        f"({traced.client_peak / 2**20:,.0f} MiB); with the emulator's copies: "
        f"{traced.peak / n / 1024:.2f} KiB/request"
    )


if __name__ == "__main__":
    main()
