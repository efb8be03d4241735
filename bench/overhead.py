"""Overhead of the graph core: pocketbatch against pocketflow 0.0.3, measured in the same run.

    .venv/bin/python bench/overhead.py                            # 100,000 items, median of 5 timing runs
    .venv/bin/python bench/overhead.py --items 2000 --repeat 3    # a quick run, e.g. in CI
    .venv/bin/python bench/overhead.py --check                    # exit 1 when a ratio misses its target

The targets (TARGETS) are the issue's, for 100,000 items; docs/benchmarks.md has the figures and how they
change with the number of items.

Every measurement runs in a fresh interpreter (this script calling itself with --worker), so neither library
warms the other's caches or heap. Wall time is the median over --repeat runs of the library's own work only
(the event loop and the input list exist before the clock starts); peak memory comes from a separate run
under tracemalloc, which slows the code it traces. Both libraries must produce the same output.

To add a case, write a function `(lib, items) -> Run` and add it to CASES; a case that only one library
can run lists it in `libs`, and the ratios are printed only for cases both run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

LIBS = ("pocketflow", "pocketbatch")
TARGETS = {"time": 1.2, "memory": 1.0}  # pocketbatch / pocketflow, from the issue


@dataclass
class Run:
    """What one measurement runs, and what it must have produced."""

    start: Callable[[], Awaitable[Any]]
    check: Callable[[], bool]


@dataclass(frozen=True)
class Case:
    about: str
    build: Callable[[ModuleType, int], Run]
    libs: tuple[str, ...] = LIBS
    targets: bool = True  # whether the TARGETS apply (else the ratios are only reported)


def parallel_node(lib: ModuleType, items: int) -> Run:
    class Double(lib.AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return shared["items"]

        async def exec_async(self, item):
            return item * 2

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    shared: dict[str, Any] = {"items": list(range(items))}
    flow = lib.AsyncFlow(Double())
    return Run(
        start=lambda: flow.run_async(shared),
        check=lambda: shared["out"] == [i * 2 for i in range(items)],
    )


def llm_call(lib: ModuleType, items: int) -> Run:
    """The same node, each item one LLM call to a zero-latency provider: through call_llm_async (a round,
    the strategy, the limiter, retries, cost) in pocketbatch; awaiting the provider's coroutine directly in
    pocketflow, which is what a bare call costs."""
    from pocketbatch import LLMRequest, LLMResponse, Provider, Usage, call_llm_async, hookimpl, registry
    from pocketbatch.plugins import pm

    class ZeroLatency(Provider):
        name = "zero"
        default_model = "zero"

        async def call_llm_async(self, request):
            return LLMResponse(
                request.messages[-1]["content"], usage=Usage(1, 1), model="zero", provider="zero"
            )

    provider = ZeroLatency()
    if lib.__name__ == "pocketbatch":

        class Plugin:
            @hookimpl
            def register_providers(self, register):
                register(provider)

        pm.register(Plugin(), name="bench-zero")
        registry.reset()
        call = lambda text: call_llm_async(text, model="zero/zero")  # noqa: E731
    else:
        call = lambda text: provider.call_llm_async(LLMRequest.from_prompt(text, "zero"))  # noqa: E731

    return asking(lib, items, call, str, lambda i, reply: reply == str(i))


def asking(lib: ModuleType, items: int, call, prompt, right) -> Run:
    """The seed's node: each item's exec_async awaits `call(prompt(item))`; `right(i, reply)` checks it."""

    class Ask(lib.AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return shared["items"]

        async def exec_async(self, item):
            return await call(prompt(item))

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    shared: dict[str, Any] = {"items": list(range(items))}
    flow = lib.AsyncFlow(Ask())
    return Run(
        start=lambda: flow.run_async(shared),
        check=lambda: len(shared["out"]) == items and all(right(i, r) for i, r in enumerate(shared["out"])),
    )


def offline_call(lib: ModuleType, items: int) -> Run:
    """The seed's node calling the offline provider with no latency and no client limits, as
    bench/node_path.py runs it (without the journal): through call_llm_async in pocketbatch; awaiting the
    offline provider's own coroutine in pocketflow, so the difference is pocketbatch's alone."""
    import os

    from pocketbatch import LLMRequest, call_llm_async, config
    from pocketbatch.default_plugins.offline import OfflineProvider

    os.environ.update(
        POCKETBATCH_OFFLINE_LATENCY="0", POCKETBATCH_OFFLINE_RPM="0", POCKETBATCH_OFFLINE_TPM="0",
        POCKETBATCH_MODE="concurrent", POCKETBATCH_JOURNAL="off",
    )  # fmt: skip
    config.reload()
    provider = OfflineProvider()
    if lib.__name__ == "pocketbatch":
        call = lambda text: call_llm_async(text, model="offline/offline-small")  # noqa: E731
    else:
        call = lambda text: provider.call_llm_async(LLMRequest.from_prompt(text, "offline-small"))  # noqa: E731

    return asking(
        lib,
        items,
        call,
        lambda item: f"Summarize document {item}: the quick brown fox jumps over the lazy dog.",
        lambda i, reply: f"document {i}:" in reply,
    )


CASES: dict[str, Case] = {
    "parallel_node": Case(
        "AsyncParallelBatchNode in an AsyncFlow, exec_async returns item * 2 without awaiting",
        parallel_node,
    ),
    "llm_call": Case(
        "the same, each item awaiting one LLM call to a zero-latency provider: pocketbatch through "
        "call_llm_async and the engine, pocketflow awaiting the provider's coroutine directly (the "
        "engine's per-call overhead as a ratio to a bare coroutine call; no target)",
        llm_call,
        targets=False,
    ),
    "offline_call": Case(
        "the seed's node calling the offline provider (no latency, no client limits), as "
        "bench/node_path.py runs it: pocketbatch through call_llm_async, pocketflow awaiting the "
        "provider's coroutine directly (no target)",
        offline_call,
        targets=False,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# One measurement, in a fresh interpreter


def measure(lib_name: str, case_name: str, items: int, what: str) -> dict[str, float]:
    lib = importlib.import_module(lib_name)
    run = CASES[case_name].build(lib, items)

    async def timed() -> float:
        if what == "memory":
            tracemalloc.start()
        began = time.perf_counter()
        await run.start()
        return time.perf_counter() - began

    seconds = asyncio.run(timed())
    peak = tracemalloc.get_traced_memory()[1] if what == "memory" else 0
    tracemalloc.stop()
    if not run.check():
        raise SystemExit(f"{lib_name} produced a wrong result in {case_name}")
    return {"seconds": seconds, "peak_bytes": peak}


def in_fresh_interpreter(lib: str, case: str, items: int, what: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", lib, case, what, "--items", str(items)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------------------
# The comparison


def compare(case_name: str, items: int, repeat: int) -> dict[str, dict[str, float]]:
    libs = CASES[case_name].libs
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    for r in range(repeat):
        for lib in libs if r % 2 == 0 else reversed(libs):  # alternate who runs first
            times[lib].append(in_fresh_interpreter(lib, case_name, items, "time")["seconds"])
    return {
        lib: {
            "seconds": statistics.median(times[lib]),
            "peak_bytes": in_fresh_interpreter(lib, case_name, items, "memory")["peak_bytes"],
        }
        for lib in libs
    }


def row(case_name: str, result: dict[str, dict[str, float]]) -> tuple[list[str], list[str]]:
    """A markdown table row for one case, and the targets it missed."""
    cells, missed = [case_name], []
    for what, key, unit, scale in (("time", "seconds", "s", 1), ("memory", "peak_bytes", "MB", 1e6)):
        figures = [result[lib][key] / scale if lib in result else None for lib in LIBS]
        cells += [f"{f:.3f} {unit}" if unit == "s" else f"{f:.1f} {unit}" for f in figures if f is not None]
        cells += ["—"] * figures.count(None)
        if None in figures:
            cells.append("—")
            continue
        ratio = figures[1] / figures[0]
        ok = ratio <= TARGETS[what] or not CASES[case_name].targets
        cells.append(f"{ratio:.2f}×" + ("" if ok else " (missed)"))
        if not ok:
            missed.append(f"{case_name} {what}")
    return cells, missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="items per run (default 100000)")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per library (default 5)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its target")
    parser.add_argument("--worker", nargs=3, metavar=("LIB", "CASE", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        lib, case, what = args.worker
        print(json.dumps(measure(lib, case, args.items, what)))
        return 0

    versions = ", ".join(f"{lib} {importlib.metadata.version(lib)}" for lib in LIBS)
    print(f"Python {platform.python_version()}, {versions}; {args.items:,} items; ", end="")
    print(f"time: median of {args.repeat} runs, each in a fresh interpreter; memory: tracemalloc peak\n")
    print(
        "| case | time pocketflow | time pocketbatch | ratio (target ≤ {time}×) "
        "| peak pocketflow | peak pocketbatch | ratio (target ≤ {memory}×) |".format(**TARGETS)
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    missed: list[str] = []
    for case_name in args.case or CASES:
        cells, case_missed = row(case_name, compare(case_name, args.items, args.repeat))
        print("| " + " | ".join(cells) + " |")
        missed += case_missed
    print()
    for case_name in args.case or CASES:
        print(f"{case_name}: {CASES[case_name].about}")
    if missed:
        print(f"missed: {', '.join(missed)}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
