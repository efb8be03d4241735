"""What pocketbatch itself costs per item, through the path users run: the seed's AsyncParallelBatchNode whose
exec_async awaits call_llm_async(prompt), on the offline provider with no latency, the journal on, each run
a fresh process.

    .venv/bin/python bench/node_path.py                                  # both modes, the issue's sizes
    .venv/bin/python bench/node_path.py --mode concurrent --items 100000
    .venv/bin/python bench/node_path.py --mode batch --items 1000000     # a million-item batch round
    .venv/bin/python bench/node_path.py --floor                          # pocketflow's own node, waiting
    .venv/bin/python bench/node_path.py --mode concurrent --runs 5       # the median of five processes

Time: from the flow's start to its end, per item (the offline provider's own work included: for a batch
round it writes and reads its job files). Memory: the process's peak RSS less that of a baseline process
that imports the same packages and holds the same prompts and results (the reply strings), per item.
In concurrent mode the client-side limits are off (POCKETBATCH_OFFLINE_RPM=0, TPM=0), so only
pocketbatch's own work is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SIZES = {"concurrent": 100_000, "batch": 200_000}
# --floor: pocketflow 0.0.3's own AsyncParallelBatchNode (no pocketbatch at all), every item waiting at
# once, as a round's items do; each row adds what an item would hold if call_llm_async were a coroutine
# that makes its request (before issue 14's fifth round it was).
FLOORS = {
    "floor-future": "pocketflow's node, each item awaiting a future",
    "floor-coroutine": "+ a coroutine with call_llm_async's signature around it",
    "floor-request": "+ the call's LLMRequest",
}
# The peer, in the same run as the concurrent mode: pocketflow 0.0.3's own node awaiting the offline
# provider's coroutine directly (no pocketbatch between them), as bench/overhead.py's offline_call does.
PEER = "pocketflow"
TARGETS = {"concurrent": (30.0, 2.0), "batch": (100.0, 2.0)}  # (µs per item, KiB per item), issue 14


def prompts(n: int) -> list[str]:
    return [f"Summarize document {i}: the quick brown fox jumps over the lazy dog." for i in range(n)]


def worker(mode: str, items: int, baseline: bool) -> dict:
    import gc

    import pocketbatch
    from pocketbatch import AsyncFlow, AsyncParallelBatchNode, call_llm_async

    texts = prompts(items)
    if baseline:
        # What any program holding these prompts and their replies needs, without pocketbatch doing anything.
        from pocketbatch.default_plugins.offline import reply
        from pocketbatch.providers import LLMRequest

        results = [reply(LLMRequest.from_prompt(t, "offline-small"))[0] for t in texts]
        gc.collect()
        return {"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "n": len(results)}

    if mode in FLOORS:
        return floor(mode, texts)
    if mode == PEER:
        return pocketflow_direct(texts)

    async def summarize(node, text):  # the seed's node: its exec_async awaits call_llm_async
        return await call_llm_async(text)

    results, seconds = run_seed_node(AsyncFlow, AsyncParallelBatchNode, summarize, texts)
    assert len(results) == items and all(isinstance(r, str) for r in results)
    vias = {r.via for r in results}
    assert vias == {mode}, vias
    del pocketbatch
    return {"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": seconds}


def run_seed_node(flow: type, node: type, exec_async: Any, texts: list[str]) -> tuple[list, float]:
    """The seed's flow (one AsyncParallelBatchNode over shared["texts"], of pocketbatch or of pocketflow)
    with this exec_async: its results, and its seconds from the flow's start to its end."""
    import asyncio

    class Seed(node):
        async def prep_async(self, shared):
            return shared["texts"]

        async def post_async(self, shared, prep_res, exec_res_list):
            shared["results"] = exec_res_list

    Seed.exec_async = exec_async
    shared = {"texts": texts}
    start = time.perf_counter()
    asyncio.run(flow(start=Seed()).run_async(shared))
    return shared["results"], time.perf_counter() - start


def pocketflow_direct(texts: list[str]) -> dict:
    """The peer row: pocketflow's own node whose exec_async awaits the offline provider itself."""
    from pocketflow import AsyncFlow, AsyncParallelBatchNode

    from pocketbatch.default_plugins.offline import OfflineProvider
    from pocketbatch.providers import LLMRequest

    provider = OfflineProvider()

    async def summarize(node, text):
        return await provider.call_llm_async(LLMRequest.from_prompt(text, "offline-small"))

    results, seconds = run_seed_node(AsyncFlow, AsyncParallelBatchNode, summarize, texts)
    assert len(results) == len(texts) and all(f"document {i}:" in r for i, r in enumerate(results))
    return {"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": seconds}


def floor(mode: str, texts: list[str]) -> dict:
    """A floor row: the items answered (with the offline provider's reply) once every one is waiting."""
    import asyncio

    from pocketflow import AsyncFlow, AsyncParallelBatchNode

    from pocketbatch.default_plugins.offline import reply
    from pocketbatch.providers import LLMRequest

    waiting: list[tuple[asyncio.Future, str]] = []

    async def answer(text: str) -> str:
        future = asyncio.get_running_loop().create_future()
        waiting.append((future, text))
        if len(waiting) == len(texts):  # all waiting: answer them
            for each, prompt in waiting:
                each.set_result(reply(LLMRequest.from_prompt(prompt, "offline-small"))[0])
            waiting.clear()
        return await future

    async def like_call_llm_async(prompt, *, model=None, system=None, max_tokens=None, temperature=None,
                                  schema=None, **options):  # fmt: skip
        request = None
        if mode == "floor-request":
            request = LLMRequest.from_prompt(prompt, "offline-small", system=system, options=options)
        response = await answer(prompt)
        del request
        return response

    async def wait(node, text):
        return await (answer(text) if mode == "floor-future" else like_call_llm_async(text))

    results, seconds = run_seed_node(AsyncFlow, AsyncParallelBatchNode, wait, texts)
    assert len(results) == len(texts)
    return {"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": seconds}


def run(mode: str, items: int, baseline: bool, tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    env |= {
        "POCKETBATCH_PROVIDER": "offline",
        "POCKETBATCH_MODE": mode if mode in SIZES else "concurrent",
        "POCKETBATCH_OFFLINE_LATENCY": "0",
        "POCKETBATCH_OFFLINE_BATCH_SECONDS": "0",
        "POCKETBATCH_OFFLINE_RPM": "0",
        "POCKETBATCH_OFFLINE_TPM": "0",
        "POCKETBATCH_POLL_INTERVAL": "0.01",
        "POCKETBATCH_JOURNAL": os.path.join(tmp, f"journal-{time.monotonic_ns()}.sqlite3"),
        "POCKETBATCH_OFFLINE_DIR": os.path.join(tmp, "offline"),
    }
    command = [sys.executable, __file__, "--worker", mode, str(items), str(int(baseline))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(SIZES), action="append")
    parser.add_argument("--items", type=int, help="default: 100,000 concurrent, 200,000 batch")
    parser.add_argument("--floor", action="store_true", help="pocketflow's own node, without pocketbatch")
    parser.add_argument(
        "--runs", type=int, default=1, help="fresh processes per mode: the median time, with the range"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, items, baseline = args.worker
        print(json.dumps(worker(mode, int(items), baseline == "1")))
        return
    if args.floor:
        return print_floor(args.items or SIZES["concurrent"])
    python = sys.version.split()[0]
    print(f"Python {python}; each run a fresh process; offline provider, no latency, journal on")
    print("| mode | items | µs per item | extra peak KiB per item | target (µs, KiB) | total | extra peak |")
    print("|---|---:|---:|---:|---|---:|---:|")
    ratio = ""
    for mode in args.mode or tuple(SIZES):
        items = args.items or SIZES[mode]
        modes = (mode, PEER) if mode == "concurrent" else (mode,)
        with tempfile.TemporaryDirectory() as tmp:
            base = run(mode, items, True, tmp)
            # Turn about with the peer, so that both see the same minutes of a machine whose speed drifts.
            runs = [run(each, items, False, tmp) for _ in range(max(1, args.runs)) for each in modes]
        ours = runs[:: len(modes)]
        peers = runs[1 :: len(modes)] if PEER in modes else []
        seconds, spread = _median(ours, items)
        extra = max(0, max(got["rss_kib"] for got in ours) - base["rss_kib"])
        us, kib = seconds / items * 1e6, extra / items
        t_us, t_kib = TARGETS[mode]
        print(
            f"| {mode} | {items:,} | **{us:.1f}**{spread} | **{kib:.2f}** | ≤ {t_us:g} µs, ≤ {t_kib:g} KiB | "
            f"{seconds:.1f} s | {extra / 1024:,.0f} MiB |",
            flush=True,
        )
        if peers:
            peer_seconds, peer_spread = _median(peers, items)
            print(
                f"| {PEER}, the provider awaited directly | {items:,} | {peer_seconds / items * 1e6:.1f}"
                f"{peer_spread} | | | {peer_seconds:.1f} s | |",
                flush=True,
            )
            ratio = (
                f"pocketbatch's concurrent path takes {seconds / peer_seconds:.2f}× pocketflow's, same runs"
            )
    if ratio:
        print(f"\n{ratio} (turn about).")


def _median(runs: list[dict], items: int) -> tuple[float, str]:
    """The median seconds of several runs, and their range in µs an item ("" for one run)."""
    seconds = statistics.median(got["seconds"] for got in runs)
    if len(runs) == 1:
        return seconds, ""
    fastest, slowest = (f(got["seconds"] for got in runs) / items * 1e6 for f in (min, max))
    return seconds, f" ({fastest:.1f}–{slowest:.1f})"


def print_floor(items: int) -> None:
    print(f"The floor, {items:,} items each waiting at once; extra peak KiB per item, measured as above")
    print("| what every item holds | extra peak KiB per item |")
    print("|---|---:|")
    for mode, label in FLOORS.items():
        with tempfile.TemporaryDirectory() as tmp:
            base = run("concurrent", items, True, tmp)
            got = run(mode, items, False, tmp)
        print(f"| {label} | **{max(0, got['rss_kib'] - base['rss_kib']) / items:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
