"""Rate-limited servers for bench/ratelimit.py: an in-process fake provider and a loopback HTTP server that
speaks the OpenAI chat completions API. Both admit requests through a token bucket (`rate` a second,
`burst` deep) and answer 429 with the exact time until the next free slot.

The loopback server listens on 127.0.0.1 only, runs in a child process (so it does not share the
client's event loop or interpreter lock), and stops by itself after `max_seconds` or `max_requests`.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pocketbatch.errors import RateLimitError
from pocketbatch.providers import LLMRequest, LLMResponse, Provider, RateLimits, Usage


class TokenBucket:
    """A server's request limit: `rate` a second, `burst` at once; starts full, as after a quiet period."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.stamp = burst, time.monotonic()

    def refill(self) -> float:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level

    def admit(self) -> float | None:
        """None when admitted; otherwise the seconds until a slot is free."""
        if self.refill() >= 1:
            self.level -= 1
            return None
        return (1 - self.level) / self.rate


@dataclass
class Books:
    """What a server saw."""

    requests: int = 0
    rate_limited: int = 0
    ok: int = 0
    ok_times: list[float] = field(default_factory=list)
    limited_times: list[float] = field(default_factory=list)  # time.monotonic() of each 429
    first_at: float | None = (
        None  # time.time() of the first request (wall clock: the client is another process)
    )

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "ok": self.ok,
            "first_at": self.first_at,
        }


def max_in_window(times: list[float], seconds: float = 1.0) -> int:
    """The most of `times` within any `seconds` (a window (t - seconds, t]), e.g. a server's `ok_times`."""
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class FakeServerProvider(Provider):
    """An in-process provider with a server-side limit: no sockets, so only the engine is measured."""

    name = "benchfake"
    default_model = "fake"
    rpm = 500  # where learning starts when nothing is configured, like the OpenAI plugin's tier-1 default
    tpm = 0

    def __init__(self, rate: float, *, burst: float = 5, latency: float = 0.05, headers: bool = False):
        self.bucket = TokenBucket(rate, burst)
        self.latency, self.headers = latency, headers
        self.books = Books()

    def _limits(self) -> RateLimits | None:
        if not self.headers:
            return None
        b = self.bucket
        return RateLimits(
            limit_requests=round(b.rate * 60),
            remaining_requests=int(b.level),
            reset_requests=(b.burst - b.level) / b.rate,
        )

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        self.books.requests += 1
        wait = self.bucket.admit()
        if wait is not None:
            self.books.rate_limited += 1
            raise RateLimitError("429 rate limit", status=429, retry_after=wait, rate_limits=self._limits())
        limits = self._limits()
        await asyncio.sleep(self.latency)
        self.books.ok += 1
        self.books.ok_times.append(time.monotonic())
        return LLMResponse(
            "ok", usage=Usage(10, 1), model=request.model, provider=self.name, rate_limits=limits
        )


# -- the loopback server: the OpenAI chat completions API or the Anthropic messages API -------------------


def _go_duration(seconds: float) -> str:
    return f"{max(0, math.ceil(seconds * 1000))}ms"


def _rfc3339(seconds_from_now: float) -> str:
    when = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Server:
    """One rate-limited chat endpoint. `flavor` "openai" serves POST .../chat/completions with
    `x-ratelimit-*` headers and `retry-after-ms` on a 429; "anthropic" serves POST /v1/messages with
    `anthropic-ratelimit-*` headers and a whole-second `retry-after`, as each API does."""

    def __init__(self, flavor, rate, burst, latency, headers, max_requests, echo=False):
        self.flavor, self.echo = flavor, echo
        self.bucket = TokenBucket(rate, burst)
        self.rate, self.burst, self.latency, self.headers = rate, burst, latency, headers
        self.max_requests = max_requests
        self.books = Books()
        self.done = asyncio.Event()

    def ratelimit_headers(self) -> dict[str, str]:
        if not self.headers:
            return {}
        b = self.bucket
        b.refill()
        limit, remaining, reset = round(self.rate * 60), int(b.level), (b.burst - b.level) / b.rate
        if self.flavor == "anthropic":
            # tokens are not limited by this server; it reports roomy token buckets as Anthropic reports all
            return {
                "anthropic-ratelimit-requests-limit": str(limit),
                "anthropic-ratelimit-requests-remaining": str(remaining),
                "anthropic-ratelimit-requests-reset": _rfc3339(reset),
                "anthropic-ratelimit-input-tokens-limit": "10000000",
                "anthropic-ratelimit-input-tokens-remaining": "10000000",
                "anthropic-ratelimit-input-tokens-reset": _rfc3339(0),
                "anthropic-ratelimit-output-tokens-limit": "10000000",
                "anthropic-ratelimit-output-tokens-remaining": "10000000",
                "anthropic-ratelimit-output-tokens-reset": _rfc3339(0),
            }
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": _go_duration(reset),
            # tokens are not limited by this server; it reports a roomy limit as OpenAI reports both
            "x-ratelimit-limit-tokens": "10000000",
            "x-ratelimit-remaining-tokens": "10000000",
            "x-ratelimit-reset-tokens": "0ms",
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.done.is_set():
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                status, payload, headers = await self.respond(method, path.split("?")[0], body)
                data = json.dumps(payload).encode()
                head = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Too Many Requests'}"]
                head += [f"{k}: {v}" for k, v in headers.items()]
                head += ["content-type: application/json", f"content-length: {len(data)}", "", ""]
                writer.write("\r\n".join(head).encode("latin-1") + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def respond(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        if path == "/stats":
            times = {"ok_times": self.books.ok_times, "limited_times": self.books.limited_times}
            return 200, self.books.as_dict() | times, {}
        if path == "/reset":  # between contestants: empty books, a full bucket
            self.books = Books()
            self.bucket = TokenBucket(self.rate, self.burst)
            return 200, {}, {}
        route = "/v1/messages" if self.flavor == "anthropic" else "/chat/completions"
        if not path.endswith(route) or method != "POST":
            return 404, {"error": {"message": f"no route {method} {path}"}}, {}
        self.books.requests += 1
        if self.books.first_at is None:
            self.books.first_at = time.time()
        if self.books.requests >= self.max_requests:
            self.done.set()  # a runaway client cannot keep it busy for ever
        request = json.loads(body)
        wait = self.bucket.admit()
        if wait is not None:
            self.books.rate_limited += 1
            self.books.limited_times.append(time.monotonic())
            return 429, *self.too_many(wait)
        headers = self.ratelimit_headers()
        await asyncio.sleep(self.latency)
        self.books.ok += 1
        self.books.ok_times.append(time.monotonic())
        return 200, self.reply(request), headers

    def too_many(self, wait: float) -> tuple[dict, dict[str, str]]:
        message = f"Rate limit reached: {round(self.rate * 60)} requests per min."
        if self.flavor == "anthropic":
            error = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
            return error, {"retry-after": str(math.ceil(wait))} | self.ratelimit_headers()
        headers = {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))}
        error = {
            "message": f"{message} Please try again in {wait * 1000:.0f}ms.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        return {"error": error}, headers | self.ratelimit_headers()

    def reply(self, request: dict) -> dict:
        n = self.books.requests
        text = "ok"
        if self.echo:  # "ok: " and the last message's text, so a client can tell which answer is whose
            text = f"ok: {request['messages'][-1]['content']}"
        if self.flavor == "anthropic":
            return {
                "id": f"msg_{n:06d}",
                "type": "message",
                "role": "assistant",
                "model": request.get("model", "claude-haiku-4-5"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            }
        return {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "gpt-4o-mini"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }


def _serve(port_pipe, flavor, rate, burst, latency, headers, max_seconds, max_requests, echo=False) -> None:
    async def main() -> None:
        app = _Server(flavor, rate, burst, latency, headers, max_requests, echo)
        server = await asyncio.start_server(app.handle, "127.0.0.1", 0, backlog=2048)
        port_pipe.send(server.sockets[0].getsockname()[1])
        port_pipe.close()
        async with server:
            try:
                await asyncio.wait_for(app.done.wait(), max_seconds)
            except asyncio.TimeoutError:
                pass

    asyncio.run(main())


class LoopbackServer:
    """`with LoopbackServer(rate=50) as server:` a chat server on 127.0.0.1 at `server.base_url`, in its
    own process (it shares neither the client's event loop nor its interpreter lock)."""

    def __init__(
        self,
        rate: float = 50,
        *,
        flavor: str = "openai",
        burst: float = 5,
        latency: float = 0.05,
        headers: bool = False,
        max_seconds: float = 900,
        max_requests: int = 200_000,
        echo: bool = False,
    ) -> None:
        self.flavor = flavor
        self.args = (flavor, rate, burst, latency, headers, max_seconds, max_requests, echo)
        self.process: multiprocessing.Process | None = None
        self.port = 0

    def __enter__(self) -> LoopbackServer:
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_serve, args=(send, *self.args), daemon=True)
        self.process.start()
        if not receive.poll(30):
            raise RuntimeError("the loopback server did not start")
        self.port = receive.recv()
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.join(5)

    @property
    def base_url(self) -> str:
        """What the SDK's base-URL variable takes: OpenAI's ends in /v1, Anthropic's SDK adds it."""
        root = f"http://127.0.0.1:{self.port}"
        return root if self.flavor == "anthropic" else f"{root}/v1"

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._get("/reset")

    def stats(self) -> dict:
        return self._get("/stats")
