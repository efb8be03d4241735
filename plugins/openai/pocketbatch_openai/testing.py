"""An emulator of the OpenAI API for tests, and the pytest fixture `openai_emulator` that runs it.

The emulator answers the official `openai` SDK at the HTTP level (respx on httpx2's transport), so the
code under test runs unchanged: chat completions, file upload and download, and batches that walk
validating → in_progress → finalizing → completed over successive polls. No request leaves the process:
a request to any other host raises respx's AllMockedAssertionError.

    async def test_summaries(openai_emulator):
        openai_emulator.fail_next(1, status=429, retry_after_ms=200)
        ...  # run code that calls openai/gpt-4o-mini
        assert openai_emulator.calls["chat"] == 2

The fixture sets OPENAI_API_KEY to a test key and removes OPENAI_BASE_URL for the test. It needs the
`testing` extra (`pip install pocketbatch-openai[testing]`: respx and pytest-httpx2).
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import itertools
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pocketbatch.schema import example, nodes
from pocketbatch.testing import MountedEmulator

BASE_URL = "https://api.openai.com/v1"
ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class Flavor:
    """How one OpenAI-shaped server differs from OpenAI itself, as its documentation says."""

    base_url: str
    upload_path: tuple[str, ...] = ("files",)  # where a batch input file is uploaded
    upload_purpose: str = "batch"
    windows: tuple[str, ...] = ("24h",)  # the completion windows a batch may ask for
    together_jobs: bool = False  # jobs as Together shapes them: wrapped on create, upper-case, progress
    rate_limits: tuple[tuple[str, str], ...] = (
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-limit-tokens", "200000"),
        ("x-ratelimit-reset-requests", "120ms"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    )


FLAVORS: dict[str, Flavor] = {
    "openai": Flavor(BASE_URL),
    # Groq: the OpenAI API under /openai/v1; windows from 24h to 7d; its request headers count per day.
    "groq": Flavor(
        "https://api.groq.com/openai/v1",
        windows=tuple(f"{h}h" for h in range(24, 169)) + tuple(f"{d}d" for d in range(1, 8)),
        rate_limits=(
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "250000"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ),
    ),
    # Together: uploads at /files/upload with purpose batch-api; jobs of its own shape; its own headers.
    "together": Flavor(
        "https://api.together.xyz/v1",
        upload_path=("files", "upload"),
        upload_purpose="batch-api",
        together_jobs=True,
        rate_limits=(("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "9"), ("x-ratelimit-reset", "1")),
    ),
}

_MESSAGES = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", None),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_QUOTA = "You exceeded your current quota, please check your plan and billing details."


@dataclass(frozen=True)
class Refusal:
    """What a `reply` function returns for a request the model refuses: the message's `refusal`."""

    text: str = "I'm sorry, I can't help with that."


def default_reply(body: dict) -> str:
    """`Echo: <the last user message>`: deterministic, and distinct for distinct prompts. A request with a
    json_schema response_format gets a deterministic instance of its schema, as JSON."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"] or body.get("messages") or [{}]
    prompt = _content_text(users[-1].get("content"))
    schema = response_schema(body)
    if schema is not None:
        return json.dumps(example(schema, seed=prompt))
    return f"Echo: {prompt}"


def response_schema(body: dict) -> dict | None:
    """The JSON schema of a request's `response_format` (type json_schema), or None."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


@dataclass
class Fault:
    """One injected failure: an HTTP error response, or (timeout/disconnect) no response at all."""

    status: int = 429
    code: str | None = None
    message: str | None = None
    retry_after_ms: float | None = None
    retry_after: float | None = None
    should_retry: bool | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: bool = False
    disconnect: bool = False
    lose_answer: bool = False


class OpenAIEmulator(MountedEmulator):
    """A small in-memory OpenAI: chat completions, files and batches, with faults on request.

    State and counters for assertions:
      `requests`: every httpx.Request answered, in order; `calls`: a Counter per route ("chat",
      "files.create", "files.retrieve", "files.content", "files.delete", "batches.create",
      "batches.retrieve", "batches.cancel", "batches.list"); `files` (id -> {"object", "content"}),
      `deleted_files`, `batches` (id -> the batch as served), `batches_created`, `bodies(route)`,
      `uploaded_lines()` (every batch input line sent).
    Knobs:
      `fail_next(n, status=429, ...)` queues faults for a route (chat by default; 429 with
      `retry_after_ms`, 5xx, `code="insufficient_quota"`, `should_retry`, `timeout=True`);
      `error_ids` (400 invalid_request_error lines) and `server_error_ids` (500 lines) go to a batch's
      error file; `expire_ids` make a batch end `expired` with those lines `batch_expired`;
      `fail_batch(errors=[...])` makes the next batch created end `failed` with that `errors.data`;
      `polls_per_state` (retrieve calls spent in validating, in_progress and finalizing, default 1);
      `cancel_completes` (share of lines done before a cancel, default 0.5); `shuffle` (output lines out
      of input order, default True); `reply(body) -> str | Refusal` (default `default_reply`); `snapshots`
      (the model name a response reports); `rate_limits` (x-ratelimit-* headers on chat responses);
      `cached_tokens` (prompt tokens each reply reports as cache reads, in `prompt_tokens_details`).
    `flavor` ("openai", "groq" or "together") serves another OpenAI-shaped API with its documented
    differences (see FLAVORS): Groq's `/openai/v1` base and 24h-7d windows and per-day request headers;
    Together's `/files/upload` with purpose `batch-api`, jobs wrapped in `{"job": ...}` on create, with
    upper-case states and a `progress` percentage instead of request counts.
    """

    def __init__(self, base_url: str | None = None, *, seed: int = 0, flavor: str = "openai") -> None:
        self.flavor = FLAVORS[flavor]
        self.base_url = (base_url or self.flavor.base_url).rstrip("/")
        self.requests: list[Any] = []
        self.calls: Counter[str] = Counter()
        self.files: dict[str, dict[str, Any]] = {}
        self.deleted_files: list[str] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.error_ids: set[str] = set()
        self.server_error_ids: set[str] = set()
        self.expire_ids: set[str] = set()
        self.polls_per_state = 1
        self.cached_tokens = 0  # prompt tokens each reply reports as read from the prompt cache
        self.cancel_completes = 0.5
        self.shuffle = True
        self.reply: Callable[[dict], str | Refusal] = default_reply
        self.snapshots: dict[str, str] = {
            "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
            "gpt-4o": "gpt-4o-2024-08-06",
        }
        self.rate_limits: dict[str, str] = dict(self.flavor.rate_limits)
        self._routes: list[str] = []  # the route of each entry in self.requests
        self._jobs: dict[str, _Job] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._batch_failures: list[list[dict]] = []
        self._random = random.Random(seed)
        self._ids = itertools.count(1)
        self._clock = int(time.time())  # created_at of batches: `find` compares it with the client's
        self._used_requests = 0
        self._used_tokens = 0

    # -- the knobs -------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        *,
        route: str = "chat",
        code: str | None = None,
        message: str | None = None,
        retry_after_ms: float | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: dict[str, str] | None = None,
        timeout: bool = False,
        disconnect: bool = False,
        lose_answer: bool = False,
    ) -> None:
        """The next n requests to `route` fail this way (then it answers normally again).

        `lose_answer=True`: the request is carried out (a batch is created) but its answer never
        arrives: the client sees the connection drop."""
        fault = Fault(
            status=status,
            code=code,
            message=message,
            retry_after_ms=retry_after_ms,
            retry_after=retry_after,
            should_retry=should_retry,
            headers=dict(headers or {}),
            timeout=timeout,
            disconnect=disconnect,
            lose_answer=lose_answer,
        )
        self._faults.setdefault(route, []).extend([fault] * n)

    def fail_batch(self, errors: list[dict] | None = None) -> None:
        """The next batch created ends `failed` on its first poll, with `errors` as its `errors.data`."""
        errors = errors or [{"code": "invalid_request", "line": 1, "message": "The batch was rejected."}]
        self._batch_failures.append([{"param": None, "line": None, **e} for e in errors])

    def uploaded_lines(self) -> list[dict]:
        """Every line of every batch input file uploaded, in order (kept after the file is deleted)."""
        lines = []
        for request, route in zip(self.requests, self._routes, strict=True):
            if route == "files.create":
                form = _multipart(request.headers.get("content-type", ""), request.content)
                content = form.get("file", (None, b""))[1]
                lines += [json.loads(line) for line in content.splitlines() if line.strip()]
        return lines

    @property
    def batches_created(self) -> int:
        return self.calls["batches.create"]

    def bodies(self, route: str = "chat") -> list[Any]:
        """The JSON bodies of the requests to `route` (chat and batches.create)."""
        return [
            json.loads(r.content)
            for r, name in zip(self.requests, self._routes, strict=True)
            if name == route
        ]

    # -- HTTP ------------------------------------------------------------------------------------

    def _handle(self, request: Any) -> Any:
        path = request.url.path
        base_path = self._base_path()
        rel = path[len(base_path) :] if path.startswith(base_path) else path
        parts = [p for p in rel.split("/") if p]
        method = request.method
        route, handler, args = self._dispatch(method, parts)
        self.requests.append(request)
        self._routes.append(route)
        self.calls[route] += 1
        self._clock += 1
        faults = self._faults.get(route)
        if faults and faults[0].lose_answer and handler is not None:
            import httpcore2

            faults.pop(0)
            handler(request, *args)
            raise httpcore2.ReadError("emulated connection lost before the answer arrived")
        if faults:
            return self._fault(faults.pop(0), route, request)
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return self._error(401, "You didn't provide an API key.")
        if handler is None:
            return self._error(404, f"Unknown request URL: {method} {path}.", code="unknown_url")
        return handler(request, *args)

    def _base_path(self) -> str:
        import httpx

        return httpx.URL(self.base_url).path.rstrip("/")

    def _dispatch(self, method: str, parts: list[str]) -> tuple[str, Any, tuple]:
        match method, parts:
            case "POST", ["chat", "completions"]:
                return "chat", self._chat, ()
            case "POST", path if tuple(path) == self.flavor.upload_path:
                return "files.create", self._file_create, ()
            case "GET", ["files", file_id]:
                return "files.retrieve", self._file_retrieve, (file_id,)
            case "DELETE", ["files", file_id]:
                return "files.delete", self._file_delete, (file_id,)
            case "GET", ["files", file_id, "content"]:
                return "files.content", self._file_content, (file_id,)
            case "POST", ["batches"]:
                return "batches.create", self._batch_create, ()
            case "GET", ["batches"]:
                return "batches.list", self._batch_list, ()
            case "GET", ["batches", batch_id]:
                return "batches.retrieve", self._batch_retrieve, (batch_id,)
            case "POST", ["batches", batch_id, "cancel"]:
                return "batches.cancel", self._batch_cancel, (batch_id,)
        return "unknown", None, ()

    def _response(self, status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
        import httpx

        headers = {"x-request-id": f"req_{next(self._ids)}", **(headers or {})}
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    def _error(
        self, status: int, message: str | None = None, *, code: str | None = None, headers: dict | None = None
    ) -> Any:
        default_message, kind, default_code = _MESSAGES.get(status, ("Error.", "server_error", None))
        if code == "insufficient_quota":
            kind, default_message = "insufficient_quota", _QUOTA
        error = {
            "message": message or default_message,
            "type": kind,
            "param": None,
            "code": code if code is not None else default_code,
        }
        return self._response(status, {"error": error}, headers)

    def _fault(self, fault: Fault, route: str, request: Any) -> Any:
        import httpcore2

        if fault.timeout:
            raise httpcore2.ReadTimeout("emulated timeout")
        if fault.disconnect:
            raise httpcore2.ConnectError("emulated connection failure")
        headers = dict(self._rate_limit_headers(remaining_requests=0) if route == "chat" else {})
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{fault.retry_after_ms:g}"
        if fault.retry_after is not None:
            headers["retry-after"] = f"{fault.retry_after:g}"
        if fault.should_retry is not None:
            headers["x-should-retry"] = "true" if fault.should_retry else "false"
        headers.update(fault.headers)
        return self._error(fault.status, fault.message, code=fault.code, headers=headers)

    # -- chat completions ------------------------------------------------------------------------

    def _chat(self, request: Any) -> Any:
        try:
            body = json.loads(request.content)
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        problem = _check_chat_body(body)
        if problem:
            return self._error(400, problem)
        completion = self.completion(body)
        self._used_requests += 1
        self._used_tokens += completion["usage"]["total_tokens"]
        return self._response(200, completion, self._rate_limit_headers())

    def completion(self, body: dict) -> dict:
        """The ChatCompletion the emulator answers `body` with (the same on the batch path)."""
        answer = self.reply(body)
        refusal = answer.text if isinstance(answer, Refusal) else None
        text = "" if isinstance(answer, Refusal) else answer
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if limit is not None and _tokens(text) > limit:
            text, finish = " ".join(text.split()[:limit]), "length"
        prompt = " ".join(_content_text(m.get("content")) for m in body["messages"])
        usage: dict[str, Any] = {
            "prompt_tokens": _tokens(prompt) + self.cached_tokens,
            "completion_tokens": _tokens(refusal or text),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if self.cached_tokens:  # a cached prompt prefix: part of prompt_tokens, billed at its own rate
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens, "audio_tokens": 0}
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": self._clock,
            "model": self.snapshots.get(body["model"], body["model"]),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish,
                    "logprobs": None,
                    "message": {
                        "role": "assistant",
                        "content": None if refusal is not None else text,
                        "refusal": refusal,
                    },
                }
            ],
            "usage": usage,
        }

    def _rate_limit_headers(self, remaining_requests: int | None = None) -> dict[str, str]:
        headers = dict(self.rate_limits)
        limit_requests = int(headers.get("x-ratelimit-limit-requests", "0") or 0)
        limit_tokens = int(headers.get("x-ratelimit-limit-tokens", "0") or 0)
        if "x-ratelimit-limit-requests" not in headers:  # a server with headers of its own naming
            return headers
        if remaining_requests is None:
            remaining_requests = max(0, limit_requests - self._used_requests)
        headers.setdefault("x-ratelimit-remaining-requests", str(remaining_requests))
        headers.setdefault("x-ratelimit-remaining-tokens", str(max(0, limit_tokens - self._used_tokens)))
        return headers

    # -- files -----------------------------------------------------------------------------------

    def _file_create(self, request: Any) -> Any:
        form = _multipart(request.headers.get("content-type", ""), request.content)
        purpose = self.flavor.upload_purpose
        if "file" not in form or form.get("purpose", (None, b""))[1] != purpose.encode():
            return self._error(400, f"Upload a 'file' with purpose '{purpose}'.")
        filename, content = form["file"]
        file = self._add_file(filename or "upload.jsonl", content, purpose)
        return self._response(200, file)

    def _add_file(self, filename: str, content: bytes, purpose: str) -> dict:
        file_id = f"file-{next(self._ids)}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": self._clock,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[file_id] = {"object": obj, "content": content}
        return obj

    def _file_retrieve(self, request: Any, file_id: str) -> Any:
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        return self._response(200, self.files[file_id]["object"])

    def _file_delete(self, request: Any, file_id: str) -> Any:
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        del self.files[file_id]
        self.deleted_files.append(file_id)
        return self._response(200, {"id": file_id, "object": "file", "deleted": True})

    def _file_content(self, request: Any, file_id: str) -> Any:
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        return self._response(
            200, self.files[file_id]["content"], {"content-type": "application/octet-stream"}
        )

    # -- batches ---------------------------------------------------------------------------------

    def _batch_create(self, request: Any) -> Any:
        params = json.loads(request.content)
        file_id = params.get("input_file_id")
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}")
        if params.get("endpoint") != ENDPOINT:
            return self._error(400, f"The emulator only serves {ENDPOINT} batches.")
        window = params.get("completion_window")
        if window not in self.flavor.windows:
            return self._error(400, f"completion_window {window!r} is not one of {self.flavor.windows[0]}..")
        batch_id = f"batch_{next(self._ids)}"
        lines, errors = _read_input(self.files[file_id]["content"])
        if self._batch_failures:
            errors = self._batch_failures.pop(0)
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "input_file_id": file_id,
            "completion_window": window,
            "status": "validating",
            "created_at": self._clock,
            "expires_at": self._clock + 86_400,
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "metadata": params.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        self.batches[batch_id] = batch
        file_size = len(self.files[file_id]["content"])
        self._jobs[batch_id] = _Job(lines=lines, errors=errors, file_size=file_size)
        if self.flavor.together_jobs:
            return self._response(200, {"job": self.together_job(batch_id), "warning": ""})
        return self._response(200, batch)

    def _batch_retrieve(self, request: Any, batch_id: str) -> Any:
        if batch_id not in self.batches:
            return self._error(404, f"No batch found with id '{batch_id}'.")
        self._advance(batch_id)
        return self._response(200, self._served(batch_id))

    def _batch_cancel(self, request: Any, batch_id: str) -> Any:
        if batch_id not in self.batches:
            return self._error(404, f"No batch found with id '{batch_id}'.")
        batch = self.batches[batch_id]
        if batch["status"] not in ("validating", "in_progress", "finalizing"):
            return self._error(400, f"Cannot cancel a batch with status '{batch['status']}'.")
        self._set_status(batch, "cancelling")
        self._jobs[batch_id].polls = 0
        return self._response(200, self._served(batch_id))

    def _served(self, batch_id: str) -> dict:
        return self.together_job(batch_id) if self.flavor.together_jobs else self.batches[batch_id]

    def together_job(self, batch_id: str) -> dict:
        """The batch as Together serves it: upper-case status, a progress percentage, no request counts."""
        batch, job = self.batches[batch_id], self._jobs[batch_id]
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        errors = (batch.get("errors") or {}).get("data") or []
        return {
            "id": batch_id,
            "user_id": "user-emulated",
            "input_file_id": batch["input_file_id"],
            "file_size_bytes": job.file_size,
            # Together documents no cancelling state: a job being cancelled is still in progress.
            "status": "IN_PROGRESS" if batch["status"] == "cancelling" else batch["status"].upper(),
            "job_deadline": "2026-12-03T00:00:00Z",
            "created_at": _iso(batch["created_at"]),
            "endpoint": batch["endpoint"],
            "progress": 100.0 * done / len(job.lines) if job.lines else 0.0,
            "model_id": job.lines[0]["body"]["model"] if job.lines else None,
            "output_file_id": batch["output_file_id"],
            "error_file_id": batch["error_file_id"],
            "error": "; ".join(e["message"] for e in errors) or None,
            "completed_at": None,
        }

    def _batch_list(self, request: Any) -> Any:
        data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        if self.flavor.together_jobs:  # Together's GET /batches: a plain array of its jobs
            return self._response(200, [self.together_job(b["id"]) for b in data])
        return self._response(
            200,
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            },
        )

    def _set_status(self, batch: dict, status: str) -> None:
        batch["status"] = status
        batch[f"{status}_at"] = self._clock

    def _advance(self, batch_id: str) -> None:
        batch, job = self.batches[batch_id], self._jobs[batch_id]
        status = batch["status"]
        if status in ("completed", "expired", "cancelled", "failed"):
            return
        job.polls += 1
        if job.polls < self.polls_per_state:
            return
        job.polls = 0
        if status == "cancelling":
            self._finish(batch, job, "cancelled")
            return
        if status == "validating":
            if job.errors:
                batch["errors"] = {"object": "list", "data": job.errors}
                self._set_status(batch, "failed")
                return
            self._set_status(batch, "in_progress")
            batch["request_counts"]["total"] = len(job.lines)
        elif status == "in_progress":
            self._set_status(batch, "finalizing")
        elif status == "finalizing":
            expired = any(line["custom_id"] in self.expire_ids for line in job.lines)
            self._finish(batch, job, "expired" if expired else "completed")

    def _finish(self, batch: dict, job: _Job, status: str) -> None:
        done = len(job.lines)
        if status == "cancelled":
            done = int(len(job.lines) * self.cancel_completes)
        output, errors = [], []
        for i, line in enumerate(job.lines):
            custom_id = line["custom_id"]
            if status == "cancelled" and i >= done:
                errors.append(self._not_run(custom_id, "batch_cancelled", "This request was cancelled."))
            elif status == "expired" and custom_id in self.expire_ids:
                errors.append(
                    self._not_run(
                        custom_id,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                )
            elif custom_id in self.error_ids:
                errors.append(self._line(custom_id, 400, _error_body(400, "Invalid request in this line.")))
            elif custom_id in self.server_error_ids:
                errors.append(self._line(custom_id, 500, _error_body(500)))
            else:
                output.append(self._line(custom_id, 200, self.completion(line["body"])))
        for key, name, lines in (
            ("output_file_id", "batch_output.jsonl", output),
            ("error_file_id", "batch_errors.jsonl", errors),
        ):
            if lines:
                batch[key] = self._add_file(name, self._jsonl(lines), "batch_output")["id"]
        batch["request_counts"] = {"total": len(job.lines), "completed": len(output), "failed": len(errors)}
        self._set_status(batch, status)

    def _line(self, custom_id: str, status: int, body: dict) -> dict:
        n = next(self._ids)
        return {
            "id": f"batch_req_{n}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{n}", "body": body},
            "error": None,
        }

    def _not_run(self, custom_id: str, code: str, message: str) -> dict:
        return {
            "id": f"batch_req_{next(self._ids)}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }

    def _jsonl(self, lines: list[dict]) -> bytes:
        order = list(lines)
        if self.shuffle and len(order) > 1:
            self._random.shuffle(order)
            if order == lines:  # the real API promises no order: never hand back input order by luck
                order.reverse()
        return b"".join(json.dumps(line).encode() + b"\n" for line in order)


@dataclass
class _Job:
    lines: list[dict]
    errors: list[dict]
    polls: int = 0
    file_size: int = 0  # bytes of the input file, as Together's jobs report them


def _error_body(status: int, message: str | None = None) -> dict:
    default_message, kind, code = _MESSAGES.get(status, ("Error.", "server_error", None))
    return {"error": {"message": message or default_message, "type": kind, "param": None, "code": code}}


def _check_chat_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array."
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        return "Each message needs a 'role'."
    return _check_response_format(body.get("response_format"))


_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _check_response_format(fmt: Any) -> str | None:
    """What the API says about a json_schema response_format that strict mode cannot take (the rules
    pocketbatch's conversion must meet: every property required, additionalProperties false)."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object")):
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return "Invalid value for 'response_format.type'."
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not _SCHEMA_NAME.match(str(spec.get("name", ""))):
        return "Invalid 'response_format.json_schema.name': must match ^[a-zA-Z0-9_-]{1,64}$."
    schema = spec.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "Invalid schema for response_format: the root must be an object."
    if spec.get("strict"):
        for path, node in nodes(schema):
            if "properties" in node or node.get("type") == "object":
                if node.get("additionalProperties") is not False:
                    return (
                        f"Invalid schema for response_format '{spec['name']}': In context=({path!r}), "
                        "'additionalProperties' is required to be supplied and to be false."
                    )
                if sorted(node.get("required") or []) != sorted(node.get("properties") or {}):
                    return (
                        f"Invalid schema for response_format '{spec['name']}': In context=({path!r}), "
                        "'required' is required to be supplied and to be an array including every key in "
                        "properties."
                    )
    return None


def _iso(epoch: float) -> str:
    """An epoch time as Together writes its times: ISO 8601 in UTC with a Z."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat().replace("+00:00", "Z")


def _read_input(content: bytes) -> tuple[list[dict], list[dict]]:
    """The lines of a batch input file, and the validation errors the real API would fail it with."""
    lines: list[dict] = []
    errors: list[dict] = []
    seen: set[str] = set()
    model = None
    raw_lines = [raw for raw in content.decode("utf-8", "replace").splitlines() if raw.strip()]

    def error(code: str, n: int, message: str) -> None:
        errors.append({"code": code, "line": n, "message": message, "param": None})

    if not raw_lines:
        error("empty_file", 1, "The input file is empty.")
    if len(raw_lines) > 50_000:
        error("too_many_tasks", 50_001, "The batch has more than 50,000 requests.")
    for n, raw in enumerate(raw_lines, 1):
        try:
            line = json.loads(raw)
        except ValueError:
            error("invalid_json_line", n, "This line is not valid JSON.")
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(custom_id, str):
            error("missing_required_parameter", n, "Missing required parameter: 'custom_id'.")
            continue
        if custom_id in seen:
            error("duplicate_custom_id", n, f"The custom_id '{custom_id}' is a duplicate.")
        seen.add(custom_id)
        if line.get("method") != "POST" or line.get("url") != ENDPOINT:
            error("url_mismatch", n, f"The line's url does not match the batch endpoint {ENDPOINT}.")
        body = line.get("body")
        problem = _check_chat_body(body)
        if problem:
            error("invalid_request", n, problem)
            continue
        model = model or body["model"]
        if body["model"] != model:
            error("model_mismatch", n, "All requests in a batch must use the same model.")
        lines.append(line)
    return lines, errors


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) for each part of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + data
    )
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


@pytest.fixture
def groq_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIEmulator]:
    """An OpenAIEmulator serving Groq's API on https://api.groq.com/openai/v1, with a test GROQ_API_KEY."""
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test-groq-emulator")
    monkeypatch.delenv("GROQ_BASE_URL", raising=False)
    with OpenAIEmulator(flavor="groq") as emulator:
        yield emulator


@pytest.fixture
def together_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIEmulator]:
    """An OpenAIEmulator serving Together's API on api.together.xyz/v1, with a test TOGETHER_API_KEY."""
    monkeypatch.setenv("TOGETHER_API_KEY", "test-together-emulator")
    monkeypatch.delenv("TOGETHER_BASE_URL", raising=False)
    with OpenAIEmulator(flavor="together") as emulator:
        yield emulator


@pytest.fixture
def openai_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIEmulator]:
    """An OpenAIEmulator on https://api.openai.com/v1 for one test, with a test OPENAI_API_KEY set."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-emulator")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with OpenAIEmulator() as emulator:
        yield emulator
