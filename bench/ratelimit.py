"""Calls against a server-side rate limit, measured as users run them: how many items each way loses, how
many 429s it draws, what share of the limit it achieves and how soon its first request goes out.

    .venv/bin/python bench/ratelimit.py                       # every scenario, 500 calls at 50 req/s
    .venv/bin/python bench/ratelimit.py --only node --scenario configured
    .venv/bin/python bench/ratelimit.py --breakdown           # also the engine alone (run_all, in-process)

Each contestant runs in a fresh interpreter (bench/user_flow.py): the seed's AsyncParallelBatchNode whose
exec_async awaits `call_llm_async(prompt)`, with POCKETBATCH_MODE=concurrent and the provider's SDK pointed
at a loopback server through its own base-URL variable; the clock runs from the flow's start to its end.
Peers in the same run: LangChain's `.abatch` with `InMemoryRateLimiter`, LiteLLM's `Router`, both given
0.95 of the limit, and pocketflow 0.0.3's node calling the SDK directly.

The server (bench/servers.py) runs in its own process on 127.0.0.1: a token bucket of `--rate` a second,
burst 5, 50 ms a call, 429 beyond with the API's retry header; it speaks the OpenAI chat completions API
or the Anthropic messages API, with or without that API's rate-limit headers.

The breakdown runs `engine.concurrent.run_all` in this (warm) process against an in-process fake provider:
the engine without start-up, SDK or HTTP, for comparison with the user's path, never as the headline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the SDKs' httpx honours proxy variables
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from servers import FakeServerProvider, LoopbackServer  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    name: str
    flavor: str  # "openai" | "anthropic"
    configured: bool  # POCKETBATCH_<PROVIDER>_RPM at 0.95 of the server's limit
    headers: bool  # the server reports its limit in the API's rate-limit headers
    calls_factor: int  # times --calls
    contestants: tuple[str, ...]


PEERS = ("langchain", "litellm", "pocketflow")
SCENARIOS = (
    Scenario("configured", "openai", True, False, 1, ("node", "two-flows", "batch-flow", *PEERS)),
    Scenario("headers", "openai", False, True, 1, ("node", "batch-flow")),
    Scenario("429s", "openai", False, False, 2, ("node", "two-flows", "batch-flow")),
    Scenario("configured", "anthropic", True, False, 1, ("node", "langchain", "litellm")),
    Scenario("headers", "anthropic", False, True, 1, ("node",)),
)
CASE_TEXT = {
    "configured": "limit configured (0.95)",
    "headers": "nothing configured, rate-limit headers",
    "429s": "nothing configured, no headers",
}


@dataclass
class Row:
    scenario: Scenario
    contestant: str
    calls: int
    lost: int
    requests: int
    rate_limited: int
    seconds: float
    ok: int
    limit: float
    first_request_ms: float | None
    learned_rpm: float | None = None

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def of_limit(self) -> float:
        return self.ok / self.seconds / self.limit

    @property
    def of_limit_after_first(self) -> float:
        """The same from the first request on: the steady pace, without the start-up."""
        first = (self.first_request_ms or 0) / 1000
        return self.ok / (self.seconds - first) / self.limit


def child_env(scenario: Scenario, server: LoopbackServer, rate: float, journal: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POCKETBATCH_") and not k.endswith(("_API_KEY", "_BASE_URL"))
    }
    prefix = scenario.flavor.upper()
    env[f"{prefix}_API_KEY"] = "sk-bench"
    env[f"{prefix}_BASE_URL"] = server.base_url
    env["POCKETBATCH_MODE"] = "concurrent"
    env["POCKETBATCH_JOURNAL"] = journal
    if scenario.configured:
        env[f"POCKETBATCH_{prefix}_RPM"] = str(round(0.95 * rate * 60))
    env["LITELLM_LOG"] = "ERROR"
    return env


def run_contestant(scenario: Scenario, contestant: str, server: LoopbackServer, args, calls: int) -> Row:
    server.reset()
    time.sleep(0.5)  # the server's bucket is full again, as after a quiet period
    with tempfile.TemporaryDirectory() as tmp:
        env = child_env(scenario, server, args.rate, str(Path(tmp) / "journal.sqlite3"))
        command = [sys.executable, str(HERE / "user_flow.py"), contestant, "--calls", str(calls)]
        command += ["--rate", str(args.rate), "--flavor", scenario.flavor]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{contestant} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    s = server.stats()
    first = (s["first_at"] - out["started_at"]) * 1000 if s["first_at"] else None
    return Row(
        scenario,
        contestant,
        calls,
        out["lost"],
        s["requests"],
        s["rate_limited"],
        out["seconds"],
        s["ok"],
        args.rate,
        first,
        out["learned_rpm"],
    )


def _line(r: Row) -> str:
    first = f"{r.first_request_ms:.0f} ms" if r.first_request_ms is not None else "-"
    return (
        f"| {r.scenario.flavor} | {CASE_TEXT[r.scenario.name]} | {r.contestant} | {r.lost}/{r.calls} | "
        f"{r.rate_limited} ({r.share_429:.1%}) | **{r.of_limit:.2f}** | {r.of_limit_after_first:.2f} | "
        f"{first} | {r.seconds:.1f} s |"
    )


def user_rows(args) -> list[Row]:
    rows = []
    for scenario in SCENARIOS:
        if args.scenario and scenario.name not in args.scenario:
            continue
        if args.flavor and scenario.flavor != args.flavor:
            continue
        contestants = [c for c in scenario.contestants if not args.only or c in args.only]
        if not contestants:
            continue
        with LoopbackServer(
            args.rate, flavor=scenario.flavor, latency=args.latency, headers=scenario.headers
        ) as server:
            for contestant in contestants:
                row = run_contestant(scenario, contestant, server, args, args.calls * scenario.calls_factor)
                rows.append(row)
                print(_line(row), flush=True)
    return rows


# -- the breakdown: the engine alone, in this process --------------------------------------------------


def breakdown(args) -> None:
    from pocketbatch import config
    from pocketbatch.engine import concurrent
    from pocketbatch.engine.limits import limiter_for, reset_limiters
    from pocketbatch.providers import LLMRequest

    print("\nBreakdown: engine.concurrent.run_all in a warm process, in-process fake provider (no HTTP)")
    print("| case | lost | 429s (% of requests) | ok rate / limit | time | learned RPM |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in ("configured", "headers", "429s"):
        for name in [n for n in os.environ if n.startswith("POCKETBATCH_")]:
            del os.environ[name]
        if case == "configured":
            os.environ["POCKETBATCH_BENCHFAKE_RPM"] = str(round(0.95 * args.rate * 60))
        config.reload()
        reset_limiters()
        provider = FakeServerProvider(args.rate, latency=args.latency, headers=case == "headers")
        requests = [
            LLMRequest([{"role": "user", "content": f"Summarize item {i}."}], "fake")
            for i in range(args.calls)
        ]
        start = time.perf_counter()
        results = asyncio.run(concurrent.run_all(provider, requests))
        seconds = time.perf_counter() - start
        b = provider.books
        lost = sum(1 for r in results if isinstance(r, Exception))
        share = b.rate_limited / b.requests
        print(
            f"| {CASE_TEXT[case]} | {lost}/{args.calls} | {b.rate_limited} ({share:.1%}) | "
            f"{b.ok / seconds / args.rate:.2f} | {seconds:.1f} s | {limiter_for(provider, 'fake').rpm:,.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="the server's limit, requests a second")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds a call takes once admitted")
    parser.add_argument("--only", nargs="*", help="contestants: node two-flows batch-flow " + " ".join(PEERS))
    parser.add_argument("--scenario", nargs="*", choices=tuple(CASE_TEXT))
    parser.add_argument("--flavor", choices=("openai", "anthropic"))
    parser.add_argument("--breakdown", action="store_true", help="also the engine alone, in-process")
    args = parser.parse_args()
    import anthropic
    import openai

    print(
        f"{args.calls} calls (1,000 without headers or configuration) against a limit of {args.rate:g} req/s "
        f"({args.rate * 60:,.0f} RPM), burst 5, {args.latency * 1000:.0f} ms a call; each contestant a fresh "
        f"process; Python {sys.version.split()[0]}, openai {openai.__version__}, "
        f"anthropic {anthropic.__version__}"
    )
    print(
        "| API | case | contestant | lost | 429s (% of requests) | ok rate / limit | first request | time |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    user_rows(args)
    if args.breakdown:
        breakdown(args)


if __name__ == "__main__":
    main()
