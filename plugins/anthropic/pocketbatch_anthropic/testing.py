"""pytest plugin: the `anthropic_emulator` fixture, an in-memory Anthropic API for the official SDK.

It answers the real `anthropic` SDK (which sends through httpx2/httpcore2) through respx, so code under
test runs unchanged and nothing reaches the network: a request the emulator does not know fails the test.
Every body passes the SDK's strict validation (`_strict_response_validation=True`).

    async def test_summaries(anthropic_emulator):
        anthropic_emulator.fail_next(1, status=529)            # the next /v1/messages call is overloaded
        anthropic_emulator.results_for = {"item-3": "expired"}  # how batch lines end, by custom_id
        ...
        assert anthropic_emulator.calls["messages"] == 2

Knobs (attributes, set them before the calls): `polls_until_ended`, `results_for`, `done_before_cancel`,
`ratelimit_headers`, `limits`, `usage_extra`, `reply`. Faults: `fail_next(n, status=..., route=...)`.
Records: `requests`, `calls`, `bodies(route)`, `batches`, `batches_created`.

The fixture sets a test ANTHROPIC_API_KEY and removes ANTHROPIC_BASE_URL for the test. Outside pytest,
`with AnthropicEmulator(base_url=...) as emulator:` (or `emulate_anthropic()`) does the same mounting.
respx and pytest-httpx2 (the `testing` extra) are imported only when an emulator starts.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pocketbatch.schema import example, nodes
from pocketbatch.testing import respx_mocker

from .api import ERROR_TYPE_STATUS

DEFAULT_BASE_URL = "https://api.anthropic.com"
ROUTES = (
    "messages",
    "batches.create",
    "batches.list",
    "batches.retrieve",
    "batches.results",
    "batches.cancel",
)
# How a batch line can end; the error types are the API's own names.
RESULT_TYPES = ("succeeded", "expired", "canceled", *ERROR_TYPE_STATUS)
_STATUS_ERROR_TYPE = {status: name for name, status in ERROR_TYPE_STATUS.items()}
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")


@dataclass
class RecordedRequest:
    """One request the emulator answered (or failed on purpose)."""

    route: str  # one of ROUTES
    method: str
    url: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, None without one
    size: int  # bytes of the body as sent


@dataclass
class Fault:
    status: int | str  # an HTTP status, "timeout" / "connection" for a request that gets no reply, or
    # "lost" for one carried out whose answer never arrives
    error_type: str
    message: str
    headers: dict[str, str]


@dataclass
class EmulatedBatch:
    id: str
    requests: list[dict]
    created_at: datetime
    polls_left: int
    processing_status: str = "in_progress"
    cancel_initiated_at: datetime | None = None
    ended_at: datetime | None = None
    lines: list[dict] = field(default_factory=list)  # result lines in input order, once ended

    def result_types(self) -> dict[str, str]:
        """custom_id -> "succeeded" | "errored:<error type>" | "expired" | "canceled"."""
        out = {}
        for line in self.lines:
            result = line["result"]
            kind = result["type"]
            out[line["custom_id"]] = (
                f"errored:{result['error']['error']['type']}" if kind == "errored" else kind
            )
        return out


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def prompt_text(params: dict) -> str:
    """The text of the last user message of a Messages request."""
    for message in reversed(params.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


@dataclass(frozen=True)
class Refusal:
    """What a `reply` function returns for a request the model refuses (stop_reason "refusal")."""

    text: str = "I can't help with that."


def output_schema(params: dict) -> dict | None:
    """The JSON schema of a request's `output_config.format` (structured outputs), or None."""
    fmt = (params.get("output_config") or {}).get("format")
    return fmt.get("schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None


def default_reply(params: dict) -> str:
    """Deterministic text from the prompt, so a test can tell which reply answers which request; a
    structured-output request gets a deterministic instance of its schema, as JSON."""
    schema = output_schema(params)
    if schema is not None:
        return json.dumps(example(schema, seed=prompt_text(params)))
    return f"reply to: {prompt_text(params)}"


def _words(text: str) -> int:
    return len(text.split())


def _check_output_config(config: Any) -> str | None:
    """What the API says about an output_config.format it cannot take."""
    if config is None:
        return None
    fmt = config.get("format") if isinstance(config, dict) else "?"
    if fmt is None:
        return None
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(schema, dict):
        return "output_config.format: expected {type: 'json_schema', schema: {...}}"
    for path, node in nodes(schema):
        is_object = "properties" in node or node.get("type") == "object"
        if is_object and node.get("additionalProperties") is not False:
            return f"output_config.format.schema: {path or 'root'}: additionalProperties must be false"
    return None


class AnthropicEmulator:
    """The Messages and Message Batches endpoints with state, faults and counters.

    Attributes a test may set:
    - `polls_until_ended` (2): a new batch answers "in_progress" to this many retrieves, then "ended";
      a cancelled one answers "canceling" to one retrieve, then "ended".
    - `results_for` ({}): custom_id -> a result type in RESULT_TYPES ("expired", "canceled",
      "invalid_request_error", "overloaded_error", "api_error", ...); any other line succeeds.
    - `done_before_cancel` (0): on cancel, this many requests (in input order) already succeeded; the
      rest end "canceled".
    - `ratelimit_headers` (None): the exact anthropic-ratelimit-* headers for every reply; None makes
      them from `limits` and the tokens used so far (RFC 3339 resets, as the API sends).
    - `limits`: {"requests": 50, "input-tokens": 50_000, "output-tokens": 10_000} per minute.
    - `usage_extra` ({}): extra usage fields on every message, e.g. {"cache_read_input_tokens": 100}
      or {"cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40}}.
    - `reply` (default_reply): params -> the reply text (or a `Refusal`); it is cut to max_tokens
      words, a word a token.
    """

    def __init__(self, base_url: str | None = None, *, seed: int = 0) -> None:
        self.base_url = (base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.polls_until_ended = 2
        self._results_for: dict[str, str] = {}
        self.done_before_cancel = 0
        self.ratelimit_headers: dict[str, str] | None = None
        self.limits = {"requests": 50, "input-tokens": 50_000, "output-tokens": 10_000}
        self.usage_extra: dict[str, Any] = {}
        self.reply: Callable[[dict], str | Refusal] = default_reply
        self.max_batch_requests = 100_000
        self.requests: list[RecordedRequest] = []
        self.calls: Counter[str] = Counter()
        self.batches: dict[str, EmulatedBatch] = {}
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._random = random.Random(seed)
        self._used = Counter[str]()
        self._ids = Counter[str]()

    def __enter__(self) -> AnthropicEmulator:
        """Mount the emulator with respx until the block ends (the fixture does this for one test)."""
        import respx

        self._mock = respx.mock(using=respx_mocker(), assert_all_called=False, assert_all_mocked=True)
        self.install(self._mock.__enter__())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._mock.__exit__(*exc_info)

    # --- the test's side ------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int | str = 529,
        *,
        route: str = "messages",
        error_type: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next n requests to `route` with an error instead.

        `status` is an HTTP status (the body's error type follows it: 429 rate_limit_error, 529
        overloaded_error, 500 api_error, ...; override with `error_type`), "timeout" / "connection"
        for a request that never gets a reply, or "lost" for one that is carried out (a batch is
        created) but whose answer never arrives. 429 replies carry `retry-after: 1` unless `retry_after`
        says otherwise and 529 replies `x-should-retry: true`, as the API's do; `headers` adds or
        replaces headers (e.g. {"x-should-retry": "false"}). Error replies carry the rate-limit headers.
        """
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
        if isinstance(status, str) and status not in ("timeout", "connection", "lost"):
            raise ValueError(f'status must be an int, "timeout", "connection" or "lost", not {status!r}')
        extra: dict[str, str] = {}
        if status == 429:
            extra["retry-after"] = "1"
        if status == 529:
            extra["x-should-retry"] = "true"
        if retry_after is not None:
            extra["retry-after"] = f"{retry_after:g}"
        extra.update(headers or {})
        if error_type is None and isinstance(status, int):
            error_type = _STATUS_ERROR_TYPE.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
        kind = error_type or "api_error"
        fault = Fault(status, kind, message or f"emulated {kind}", extra)
        self._faults[route].extend(fault for _ in range(n))

    @property
    def results_for(self) -> dict[str, str]:
        return self._results_for

    @results_for.setter
    def results_for(self, value: dict[str, str]) -> None:
        # Checked here, where a typo is the test's own traceback, not a "connection error" from the SDK.
        wrong = {k: v for k, v in value.items() if v not in RESULT_TYPES}
        if wrong:
            raise ValueError(f"results_for values must be among {RESULT_TYPES}; got {wrong}")
        self._results_for = dict(value)

    @property
    def batches_created(self) -> int:
        return len(self.batches)

    def bodies(self, route: str) -> list[Any]:
        """The JSON bodies sent to a route, in order."""
        return [r.body for r in self.requests if r.route == route]

    def install(self, router: Any) -> None:
        """Add the routes to a respx router (emulate_anthropic and the fixture do this)."""
        base = re.escape(self.base_url)
        batch = rf"{base}/v1/messages/batches/(?P<batch_id>[A-Za-z0-9_-]+)"
        routes = [
            ("POST", rf"^{base}/v1/messages(\?.*)?$", "messages", self._messages),
            ("POST", rf"^{base}/v1/messages/batches(\?.*)?$", "batches.create", self._create),
            ("GET", rf"^{base}/v1/messages/batches(\?.*)?$", "batches.list", self._list),
            ("GET", rf"^{batch}(\?.*)?$", "batches.retrieve", self._retrieve),
            ("GET", rf"^{batch}/results(\?.*)?$", "batches.results", self._results),
            ("POST", rf"^{batch}/cancel(\?.*)?$", "batches.cancel", self._cancel),
        ]
        for method, pattern, name, handler in routes:
            router.route(method=method, url__regex=pattern, name=name).mock(
                side_effect=self._handler(name, handler)
            )

    # --- the API's side -------------------------------------------------------------------------------

    def _handler(self, route: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        def respond(request: Any, **kwargs: Any) -> Any:
            content = request.content
            try:
                body = json.loads(content) if content else None
            except ValueError:
                body = None
            self.requests.append(
                RecordedRequest(
                    route, request.method, str(request.url), dict(request.headers), body, len(content)
                )
            )
            self.calls[route] += 1
            if self._faults[route] and self._faults[route][0].status == "lost":
                import httpcore2

                self._faults[route].popleft()
                handler(body, **kwargs)
                raise httpcore2.ReadError("emulated connection lost before the answer arrived")
            if self._faults[route]:
                return self._fault(self._faults[route].popleft())
            return handler(body, **kwargs)

        return respond

    def _response(self, status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
        import httpx

        self._ids["request"] += 1
        headers = {"request-id": f"req_emu_{self._ids['request']:06d}", **(headers or {})}
        return httpx.Response(status, json=body, headers=headers)

    def _error(self, status: int, error_type: str, message: str, headers: dict | None = None) -> Any:
        body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": None}
        return self._response(status, body, headers)

    def _fault(self, fault: Fault) -> Any:
        import httpcore2

        if fault.status == "timeout":
            raise httpcore2.ReadTimeout("emulated read timeout")
        if fault.status == "connection":
            raise httpcore2.ConnectError("emulated connection failure")
        headers = self._ratelimit_headers()
        if fault.status == 429 and self.ratelimit_headers is None:
            # A 429 means the request bucket is empty until the wait is over.
            wait = float(fault.headers.get("retry-after", "1"))
            headers["anthropic-ratelimit-requests-remaining"] = "0"
            headers["anthropic-ratelimit-requests-reset"] = _iso(
                datetime.now(timezone.utc) + timedelta(seconds=wait)
            )
        headers.update(fault.headers)
        return self._error(int(fault.status), fault.error_type, fault.message, headers)

    def _ratelimit_headers(self) -> dict[str, str]:
        if self.ratelimit_headers is not None:
            return dict(self.ratelimit_headers)
        now = datetime.now(timezone.utc)
        headers = {}
        for name, limit in self.limits.items():
            used = min(self._used[name], limit)
            # The reset is when the bucket is full again: it refills at limit per minute.
            reset = now + timedelta(seconds=60 * used / limit)
            headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(limit - used)
            headers[f"anthropic-ratelimit-{name}-reset"] = _iso(reset)
        return headers

    def _check_params(self, params: Any) -> str | None:
        """What the API would say is wrong with Messages params, or None."""
        if not isinstance(params, dict):
            return "params must be an object"
        if not params.get("model"):
            return "model: Field required"
        if not params.get("messages"):
            return "messages: at least one message is required"
        max_tokens = params.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return "max_tokens: must be an integer >= 1"
        return _check_output_config(params.get("output_config"))

    def _message(self, params: dict) -> dict:
        self._ids["message"] += 1
        answer = self.reply(params)
        words = (answer.text if isinstance(answer, Refusal) else answer).split()
        max_tokens = params["max_tokens"]
        stop_reason = "max_tokens" if len(words) > max_tokens else "end_turn"
        if isinstance(answer, Refusal):
            stop_reason = "refusal"
        text = " ".join(words[:max_tokens])
        system = params.get("system")
        system_text = system if isinstance(system, str) else _text_of(system)
        input_tokens = max(
            1, _words(system_text) + sum(_words(_text_of(m.get("content"))) for m in params["messages"])
        )
        output_tokens = _words(text)
        return {
            "id": f"msg_emu_{self._ids['message']:06d}",
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens, **self.usage_extra},
        }

    def _messages(self, body: Any) -> Any:
        problem = self._check_params(body)
        if problem:
            return self._error(400, "invalid_request_error", problem, self._ratelimit_headers())
        message = self._message(body)
        usage = message["usage"]
        self._used["requests"] += 1
        self._used["input-tokens"] += usage["input_tokens"]
        self._used["output-tokens"] += usage["output_tokens"]
        return self._response(200, message, self._ratelimit_headers())

    def _batch_body(self, batch: EmulatedBatch) -> dict:
        counts = dict.fromkeys(_COUNTS, 0)
        if batch.processing_status == "ended":
            for line in batch.lines:
                counts[line["result"]["type"]] += 1
        else:
            counts["processing"] = len(batch.requests)
        ended = batch.processing_status == "ended"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.processing_status,
            "request_counts": counts,
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.created_at + timedelta(hours=24)),
            "ended_at": _iso(batch.ended_at),
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancel_initiated_at),
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def _create(self, body: Any) -> Any:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return self._error(400, "invalid_request_error", "requests: at least one request is required")
        if len(requests) > self.max_batch_requests:
            return self._error(413, "request_too_large", f"at most {self.max_batch_requests} requests")
        seen = set()
        for i, entry in enumerate(requests):
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
                return self._error(400, "invalid_request_error", f"requests.{i}.custom_id: invalid")
            if custom_id in seen:
                return self._error(400, "invalid_request_error", f"duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
        self._ids["batch"] += 1
        batch = EmulatedBatch(
            id=f"msgbatch_emu_{self._ids['batch']:04d}",
            requests=requests,
            created_at=datetime.now(timezone.utc),
            polls_left=self.polls_until_ended,
        )
        self.batches[batch.id] = batch
        return self._response(200, self._batch_body(batch))

    def _end(self, batch: EmulatedBatch, *, cancelled: bool) -> None:
        for i, entry in enumerate(batch.requests):
            kind = self.results_for.get(entry["custom_id"], "succeeded")
            if cancelled and i >= self.done_before_cancel and entry["custom_id"] not in self.results_for:
                kind = "canceled"
            batch.lines.append({"custom_id": entry["custom_id"], "result": self._result(kind, entry)})
        batch.processing_status = "ended"
        batch.ended_at = datetime.now(timezone.utc)

    def _result(self, kind: str, entry: dict) -> dict:
        if kind == "succeeded":
            problem = self._check_params(entry.get("params"))
            if problem is None:
                return {"type": "succeeded", "message": self._message(entry["params"])}
            kind, message = "invalid_request_error", problem
        elif kind in ("expired", "canceled"):
            return {"type": kind}
        elif kind in ERROR_TYPE_STATUS:
            message = f"emulated {kind}"
        else:
            raise ValueError(f"results_for values must be one of {RESULT_TYPES}, not {kind!r}")
        return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}

    def _find(self, batch_id: str) -> EmulatedBatch | Any:
        batch = self.batches.get(batch_id)
        if batch is None:
            return self._error(404, "not_found_error", f"no message batch {batch_id!r}")
        return batch

    def _list(self, body: Any) -> Any:
        data = [self._batch_body(b) for b in reversed(self.batches.values())]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return self._response(200, {"data": data, "has_more": False, "first_id": first, "last_id": last})

    def _retrieve(self, body: Any, batch_id: str) -> Any:
        batch = self._find(batch_id)
        if not isinstance(batch, EmulatedBatch):
            return batch
        if batch.processing_status != "ended":
            if batch.polls_left > 0:
                batch.polls_left -= 1
            else:
                self._end(batch, cancelled=batch.processing_status == "canceling")
        return self._response(200, self._batch_body(batch))

    def _results(self, body: Any, batch_id: str) -> Any:
        import httpx

        batch = self._find(batch_id)
        if not isinstance(batch, EmulatedBatch):
            return batch
        if batch.processing_status != "ended":
            return self._error(404, "not_found_error", f"message batch {batch_id!r} has not ended")
        lines = list(batch.lines)
        # The API promises no order; make sure a test that relies on input order fails.
        self._random.shuffle(lines)
        if len(lines) > 1 and lines == batch.lines:
            lines.reverse()
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return httpx.Response(200, content=content, headers={"content-type": "application/x-jsonl"})

    def _cancel(self, body: Any, batch_id: str) -> Any:
        batch = self._find(batch_id)
        if not isinstance(batch, EmulatedBatch):
            return batch
        # Cancelling a batch that is already cancelling or ended changes nothing.
        if batch.processing_status == "in_progress":
            batch.processing_status = "canceling"
            batch.cancel_initiated_at = datetime.now(timezone.utc)
            batch.polls_left = 1  # one retrieve still sees "canceling", as a real cancel takes a while
        return self._response(200, self._batch_body(batch))


@contextmanager
def emulate_anthropic(base_url: str | None = None, *, seed: int = 0) -> Iterator[AnthropicEmulator]:
    """An AnthropicEmulator mounted for the duration of the block, for use outside the fixture.

    base_url defaults to ANTHROPIC_BASE_URL, else https://api.anthropic.com. Requests to anything else
    raise respx's AllMockedAssertionError, so nothing reaches the network.
    """
    with AnthropicEmulator(base_url, seed=seed) as emulator:
        yield emulator


@pytest.fixture
def anthropic_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicEmulator]:
    """The Anthropic API, emulated for the official SDK for one test (see AnthropicEmulator).

    It sets a test ANTHROPIC_API_KEY and removes ANTHROPIC_BASE_URL for the test, so the code under test
    talks to the emulator at https://api.anthropic.com whatever the developer's shell says.
    """
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-emulator")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    with AnthropicEmulator(DEFAULT_BASE_URL) as emulator:
        yield emulator
