"""An emulator of the Gemini API for tests, and the pytest fixture `gemini_emulator` that runs it.

It answers the official `google-genai` SDK at the HTTP level (respx on httpx2's transport, the one
GeminiProvider's clients send through), so the code under test runs unchanged: generateContent, Batch
Mode (inline requests or a JSONL input file; jobs walk PENDING → RUNNING → SUCCEEDED over successive
polls) and the Files API (resumable upload, download, delete). No request leaves the process: a request
to any other host raises respx's AllMockedAssertionError.

    async def test_summaries(gemini_emulator):
        gemini_emulator.fail_next(1, status=429, retry_delay=0.2)
        ...  # run code that calls gemini/gemini-2.5-flash
        assert gemini_emulator.calls["generate"] == 2

The fixture sets GEMINI_API_KEY to a test key and removes GOOGLE_API_KEY and GOOGLE_GEMINI_BASE_URL for
the test. It needs the `testing` extra (`pip install pocketbatch-gemini[testing]`: respx, pytest-httpx2).
"""

from __future__ import annotations

import datetime
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest

from pocketbatch.schema import example
from pocketbatch.testing import MountedEmulator

BASE_URL = "https://generativelanguage.googleapis.com"
# The Gemini API refuses a request body over 20 MiB (and so a batch of inline requests over it).
MAX_BODY_BYTES = 20 * 1024 * 1024

_STATUS = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report it."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}


@dataclass(frozen=True)
class Refusal:
    """What a `reply` function returns for a request Gemini withholds: the candidate ends with
    `finishReason` `reason` (SAFETY, PROHIBITED_CONTENT, RECITATION, ...) and, as the API sends a
    blocked candidate, no content unless `text` is given."""

    text: str = ""
    reason: str = "SAFETY"


def prompt_text(request: dict) -> str:
    """The text of the last user turn of a generateContent body."""
    users = [c for c in request.get("contents", []) if c.get("role", "user") == "user"] or [{}]
    return _text(users[-1])


def response_schema(request: dict) -> dict | None:
    """The JSON schema of a structured-output request (`generationConfig.responseJsonSchema`), or None."""
    schema = (request.get("generationConfig") or {}).get("responseJsonSchema")
    return schema if isinstance(schema, dict) else None


def default_reply(request: dict) -> str:
    """`Echo: <the last user turn's text>`: deterministic, and distinct for distinct prompts. A
    structured-output request gets a deterministic instance of its schema, as JSON."""
    schema = response_schema(request)
    if schema is not None:
        return json.dumps(example(schema, seed=prompt_text(request)))
    return f"Echo: {prompt_text(request)}"


def _text(content: dict) -> str:
    return " ".join(str(p.get("text", "")) for p in content.get("parts", []) if isinstance(p, dict))


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def error_body(status: int, message: str | None = None, details: list | None = None) -> dict:
    """A Google API error body: `{"error": {"code", "message", "status", "details"}}`."""
    name, default = _STATUS.get(status, ("UNKNOWN", "Error."))
    error: dict[str, Any] = {"code": status, "message": message or default, "status": name}
    if details:
        error["details"] = details
    return {"error": error}


@dataclass
class Fault:
    """One injected failure: an HTTP error (with a RetryInfo delay on 429), or no response at all."""

    status: int = 429
    message: str | None = None
    retry_delay: float | None = None
    timeout: bool = False
    disconnect: bool = False
    lose_answer: bool = False


class GeminiEmulator(MountedEmulator):
    """A small in-memory Gemini API: generateContent, batches and files, with faults on request.

    State for assertions: `requests` (every request answered, in order), `calls` (a Counter per route:
    "generate", "batches.create", "batches.get", "batches.list", "batches.cancel", "batches.delete",
    "files.upload",
    "files.get", "files.download", "files.delete"), `bodies(route)`, `files` (name -> {"object",
    "content"}), `deleted_files`, `batches` (name -> the job as served), `batches_created`.
    Knobs: `fail_next(n, status=429, route="generate", retry_delay=..., timeout=, disconnect=,
    lose_answer=)` (`lose_answer=True`: the request is carried out, a job created, but the client sees
    the connection drop before the answer); `list_page_size` (jobs per `batches.list` page at most);
    `error_keys` (lines that fail 400 INVALID_ARGUMENT), `server_error_keys` (500 INTERNAL);
    `expire_keys` (the job ends JOB_STATE_EXPIRED without those lines); `fail_batch(message)` (the next
    job ends JOB_STATE_FAILED); `polls_per_state` (get calls spent in PENDING and RUNNING, default 1);
    `cancel_completes` (share of lines done before a cancel, default 0.5); `cancel_polls` (get calls
    before a cancel takes effect, default 1: the REST API has no cancelling state); `shuffle` (results out of
    input order, default True: the API has been seen to answer inline requests out of order);
    `reply(request) -> str | Refusal` (default_reply: an instance of the schema for a structured-output
    request; answers are cut to maxOutputTokens words, a word a token, ending MAX_TOKENS);
    `thoughts_tokens` (thinking tokens reported on every reply);
    `thought_summary` (a thought part put before each reply's text, as `include_thoughts` returns);
    `server_rpm` (a server-side request limit on generateContent, answered with 429 and a retryDelay,
    0 for none); `invalid_keys` (keys answered with 400 API_KEY_INVALID, as the real API does).
    """

    def __init__(self, base_url: str = BASE_URL, *, seed: int = 0) -> None:
        self.base_url = base_url.rstrip("/")
        self.requests: list[Any] = []
        self.calls: Counter[str] = Counter()
        self.files: dict[str, dict[str, Any]] = {}
        self.deleted_files: list[str] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.error_keys: set[str] = set()
        self.server_error_keys: set[str] = set()
        self.expire_keys: set[str] = set()
        self.polls_per_state = 1
        self.cancel_completes = 0.5
        self.cancel_polls = 1
        self.shuffle = True
        self.reply: Callable[[dict], str | Refusal] = default_reply
        self.thoughts_tokens = 0
        self.thought_summary: str | None = None
        self.server_rpm: float = 0
        self.invalid_keys: set[str] = set()
        self.list_page_size = 50
        self._routes: list[str] = []
        self._jobs: dict[str, _Job] = {}
        self._uploads: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._batch_failures: list[str] = []
        self._random = random.Random(seed)
        self._ids = itertools.count(1)
        self._bucket: tuple[float, float] | None = None  # (level, stamp) of the server_rpm bucket

    # -- the knobs -------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        *,
        route: str = "generate",
        message: str | None = None,
        retry_delay: float | None = None,
        timeout: bool = False,
        disconnect: bool = False,
        lose_answer: bool = False,
    ) -> None:
        """The next n requests to `route` fail this way (then it answers normally again).

        `lose_answer=True`: the request is carried out (a job is created) but its answer never arrives:
        the client sees the connection drop."""
        fault = Fault(status, message, retry_delay, timeout, disconnect, lose_answer)
        self._faults.setdefault(route, []).extend([fault] * n)

    def fail_batch(self, message: str = "The batch could not be processed.") -> None:
        """The next batch created ends JOB_STATE_FAILED on its first poll, with this error message."""
        self._batch_failures.append(message)

    @property
    def batches_created(self) -> int:
        return self.calls["batches.create"]

    def bodies(self, route: str = "generate") -> list[Any]:
        """The JSON bodies of the requests to `route` (generate and batches.create)."""
        return [
            json.loads(r.content)
            for r, name in zip(self.requests, self._routes, strict=True)
            if name == route
        ]

    def batch_requests(self) -> list[dict]:
        """The request bodies (REST JSON) of every batch job's lines, inline or from a file, in order."""
        return [line["request"] for job in self._jobs.values() for line in job.lines]

    # -- state that outlives a process, as a real server's does --------------------------------------

    def state(self) -> dict:
        """The emulated server's files and jobs as JSON-able data, for `GeminiEmulator.from_state`: a
        test can kill a process mid-job and let another process find the job where it was."""
        return {
            "files": {
                name: {"object": f["object"], "content": f["content"].decode("latin-1")}
                for name, f in self.files.items()
            },
            "batches": self.batches,
            "jobs": {name: asdict(job) for name, job in self._jobs.items()},
            "next_id": next(self._ids),
        }

    @classmethod
    def from_state(cls, state: dict, base_url: str = BASE_URL) -> GeminiEmulator:
        """An emulator holding the files and jobs `state()` saved (its knobs start at their defaults)."""
        emulator = cls(base_url)
        emulator.files = {
            name: {"object": f["object"], "content": f["content"].encode("latin-1")}
            for name, f in state["files"].items()
        }
        emulator.batches = state["batches"]
        emulator._jobs = {name: _Job(**job) for name, job in state["jobs"].items()}
        emulator._ids = itertools.count(state["next_id"])
        return emulator

    # -- HTTP ------------------------------------------------------------------------------------

    def _handle(self, request: Any) -> Any:
        route, handler, args = self._dispatch(request)
        self.requests.append(request)
        self._routes.append(route)
        self.calls[route] += 1
        faults = self._faults.get(route)
        if faults and faults[0].lose_answer and handler is not None:
            import httpcore2

            faults.pop(0)
            handler(request, *args)
            raise httpcore2.ReadError("emulated connection lost before the answer arrived")
        if faults:
            return self._fault(faults.pop(0))
        if handler is None:
            return self._error(404, f"Unknown request URL: {request.method} {request.url.path}.")
        key = request.headers.get("x-goog-api-key", "")
        if not key and "upload_id" not in request.url.params:  # an upload URL carries its own grant
            return self._error(403, "Method doesn't allow unregistered callers. Please use an API Key.")
        if key in self.invalid_keys:
            info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            return self._error(400, "API key not valid. Please pass a valid API key.", [info])
        return handler(request, *args)

    def _dispatch(self, request: Any) -> tuple[str, Any, tuple]:
        parts = [p for p in request.url.path.split("/") if p]
        upload = bool(parts) and parts[0] == "upload"
        parts = parts[2:] if upload else parts[1:]  # drop "upload" and the API version (v1, v1beta)
        method, last = request.method, parts[-1] if parts else ""
        name, _, verb = last.partition(":")
        match method, parts[:-1], name, verb:
            case "POST", ["models"], model, "generateContent":
                return "generate", self._generate, (model,)
            case "POST", ["models"], model, "batchGenerateContent":
                return "batches.create", self._batch_create, (model,)
            case "GET", [], "batches", "":
                return "batches.list", self._batch_list, ()
            case "GET", ["batches"], batch_id, "":
                return "batches.get", self._batch_get, (f"batches/{batch_id}",)
            case "POST", ["batches"], batch_id, "cancel":
                return "batches.cancel", self._batch_cancel, (f"batches/{batch_id}",)
            case "DELETE", ["batches"], batch_id, "":
                return "batches.delete", self._batch_delete, (f"batches/{batch_id}",)
            case "POST", [], "files", "" if upload:
                return "files.upload", self._upload, ()
            case "GET", ["files"], file_id, "":
                return "files.get", self._file_get, (f"files/{file_id}",)
            case "GET", ["files"], file_id, "download":
                return "files.download", self._file_download, (f"files/{file_id}",)
            case "DELETE", ["files"], file_id, "":
                return "files.delete", self._file_delete, (f"files/{file_id}",)
        return "unknown", None, ()

    def _response(self, status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
        import httpx

        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    def _error(self, status: int, message: str | None = None, details: list | None = None) -> Any:
        return self._response(status, error_body(status, message, details))

    def _fault(self, fault: Fault) -> Any:
        import httpcore2

        if fault.timeout:
            raise httpcore2.ReadTimeout("emulated timeout")
        if fault.disconnect:
            raise httpcore2.ConnectError("emulated connection failure")
        return self._error(fault.status, fault.message, _retry_details(fault.retry_delay))

    # -- generateContent -------------------------------------------------------------------------

    def _generate(self, request: Any, model: str) -> Any:
        try:
            body = json.loads(request.content)
        except ValueError:
            return self._error(400, "Invalid JSON payload received.")
        problem = _check_request(body)
        if problem:
            return self._error(400, problem)
        wait = self._admit()
        if wait is not None:
            return self._error(429, None, _retry_details(wait))
        return self._response(200, self.generate(model, body))

    def generate(self, model: str, body: dict) -> dict:
        """The GenerateContentResponse (REST JSON) the emulator answers `body` with, on both paths."""
        answer = self.reply(body)
        refusal = answer if isinstance(answer, Refusal) else None
        text = refusal.text if refusal is not None else answer
        config = body.get("generationConfig") or {}
        limit, finish = config.get("maxOutputTokens"), "STOP"
        if limit is not None and _tokens(text) > limit:
            text, finish = " ".join(text.split()[:limit]), "MAX_TOKENS"
        if refusal is not None:
            finish = refusal.reason
        prompt = " ".join(_text(c) for c in body["contents"])
        if body.get("systemInstruction"):
            prompt += " " + _text(body["systemInstruction"])
        usage = {"promptTokenCount": _tokens(prompt), "candidatesTokenCount": _tokens(text) if text else 0}
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        usage["totalTokenCount"] = sum(usage.values())
        parts = [{"text": text}]
        if self.thought_summary:  # what includeThoughts returns: a summary part flagged as a thought
            parts.insert(0, {"text": self.thought_summary, "thought": True})
        candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
        if text or refusal is None:
            candidate["content"] = {"parts": parts, "role": "model"}
        if refusal is not None:  # a withheld candidate says which filter stopped it
            category = "HARM_CATEGORY_DANGEROUS_CONTENT"
            candidate["safetyRatings"] = [{"category": category, "probability": "HIGH", "blocked": True}]
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": f"resp-{next(self._ids)}",
        }

    def _admit(self) -> float | None:
        """None when the server_rpm bucket admits a call, else the seconds until it would."""
        if not self.server_rpm:
            return None
        rate, burst, now = self.server_rpm / 60, 2.0, time.monotonic()
        level, stamp = self._bucket or (burst, now)
        level = min(burst, level + (now - stamp) * rate)
        if level < 1:
            self._bucket = (level, now)
            return (1 - level) / rate
        self._bucket = (level - 1, now)
        return None

    # -- files -----------------------------------------------------------------------------------

    def _upload(self, request: Any) -> Any:
        command = request.headers.get("x-goog-upload-command", "")
        upload_id = request.url.params.get("upload_id")
        if upload_id is None:  # start a resumable upload: the SDK sends the bytes to the URL we return
            if command != "start":
                return self._error(400, "Only resumable uploads are emulated.")
            meta = json.loads(request.content or b"{}").get("file") or {}
            upload_id = str(next(self._ids))
            self._uploads[upload_id] = meta
            url = f"{self.base_url}{request.url.path}?upload_id={upload_id}&upload_protocol=resumable"
            return self._response(200, b"", {"x-goog-upload-url": url, "x-goog-upload-status": "active"})
        meta = self._uploads.get(upload_id)
        if meta is None or "upload" not in command:
            return self._error(400, "Unknown upload.")
        meta["_content"] = meta.get("_content", b"") + request.content  # the SDK sends 8 MiB chunks
        if "finalize" not in command:
            return self._response(200, b"", {"x-goog-upload-status": "active"})
        del self._uploads[upload_id]
        mime_type = meta.get("mimeType") or meta.get("mime_type") or ""
        file = self._add_file(meta.pop("_content"), mime_type, meta)
        return self._response(200, {"file": file}, {"x-goog-upload-status": "final"})

    def _add_file(self, content: bytes, mime_type: str, meta: dict | None = None) -> dict:
        name = f"files/{next(self._ids)}-pb"
        obj = {
            "name": name,
            "displayName": (meta or {}).get("displayName") or (meta or {}).get("display_name") or "",
            "mimeType": mime_type,
            "sizeBytes": str(len(content)),
            "state": "ACTIVE",
            "source": "UPLOADED",
            "uri": f"{self.base_url}/v1beta/{name}",
        }
        self.files[name] = {"object": obj, "content": content}
        return obj

    def _file_get(self, request: Any, name: str) -> Any:
        if name not in self.files:
            return self._error(404, f"File {name} not found.")
        return self._response(200, self.files[name]["object"])

    def _file_download(self, request: Any, name: str) -> Any:
        if name not in self.files:
            return self._error(404, f"File {name} not found.")
        return self._response(200, self.files[name]["content"], {"content-type": "application/octet-stream"})

    def _file_delete(self, request: Any, name: str) -> Any:
        if name not in self.files:
            return self._error(404, f"File {name} not found.")
        del self.files[name]
        self.deleted_files.append(name)
        return self._response(200, {})

    # -- batches ---------------------------------------------------------------------------------

    def _batch_create(self, request: Any, model: str) -> Any:
        if len(request.content) > MAX_BODY_BYTES:
            return self._error(400, f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")
        batch = json.loads(request.content).get("batch") or {}
        source = batch.get("inputConfig") or {}
        if "fileName" in source:
            file = self.files.get(source["fileName"])
            if file is None:
                return self._error(404, f"File {source['fileName']} not found.")
            lines, problem = _read_file(file["content"])
        else:
            lines, problem = _read_inline(source.get("requests", {}).get("requests"))
        if problem:
            return self._error(400, problem)
        name = f"batches/{next(self._ids)}-pb"
        # The server's clock: `find` compares it with the client's.
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        job = {
            "name": name,
            "metadata": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                "name": name,
                "displayName": batch.get("displayName", ""),
                "model": f"models/{model}",
                "state": "BATCH_STATE_PENDING",
                "createTime": now,
                "updateTime": now,
                "batchStats": {"requestCount": str(len(lines)), "pendingRequestCount": str(len(lines))},
            },
            "done": False,
        }
        self.batches[name] = job
        failure = self._batch_failures.pop(0) if self._batch_failures else None
        self._jobs[name] = _Job(model, lines, inline="fileName" not in source, failure=failure)
        return self._response(200, job)

    def _batch_get(self, request: Any, name: str) -> Any:
        if name not in self.batches:
            return self._error(404, f"Batch {name} not found.")
        self._advance(name)
        return self._response(200, self.batches[name])

    def _batch_list(self, request: Any) -> Any:
        """`GET /v1beta/batches`: the jobs newest first, `pageSize` (capped by list_page_size) a page,
        with a `nextPageToken` while more remain."""
        params = request.url.params
        size = min(int(params.get("pageSize") or self.list_page_size), self.list_page_size)
        start = int(params.get("pageToken") or 0)
        names = list(reversed(self.batches))
        page = [self.batches[name] for name in names[start : start + size]]
        body: dict[str, Any] = {"operations": page}
        if start + size < len(names):
            body["nextPageToken"] = str(start + size)
        return self._response(200, body)

    def _batch_cancel(self, request: Any, name: str) -> Any:
        if name not in self.batches:
            return self._error(404, f"Batch {name} not found.")
        # The REST API has no cancelling state: the job keeps its state until the cancel takes effect.
        if self.batches[name]["metadata"]["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            self._jobs[name].cancelled = True
            self._jobs[name].polls = 0
        return self._response(200, {})

    def _batch_delete(self, request: Any, name: str) -> Any:
        if self.batches.pop(name, None) is None:
            return self._error(404, f"Batch {name} not found.")
        return self._response(200, {})

    def _advance(self, name: str) -> None:
        job, meta = self._jobs[name], self.batches[name]["metadata"]
        state = meta["state"]
        if state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            return
        job.polls += 1
        if job.polls < (self.cancel_polls if job.cancelled else self.polls_per_state):
            return
        job.polls = 0
        if job.cancelled:
            self._finish(name, "BATCH_STATE_CANCELLED", done=int(len(job.lines) * self.cancel_completes))
        elif job.failure is not None:
            meta["state"] = "BATCH_STATE_FAILED"
            self.batches[name].update(done=True, error={"code": 3, "message": job.failure})
        elif state == "BATCH_STATE_PENDING":
            meta["state"] = "BATCH_STATE_RUNNING"
        else:
            expired = any(line["key"] in self.expire_keys for line in job.lines)
            self._finish(name, "BATCH_STATE_EXPIRED" if expired else "BATCH_STATE_SUCCEEDED", len(job.lines))

    def _finish(self, name: str, state: str, done: int) -> None:
        job, meta = self._jobs[name], self.batches[name]["metadata"]
        results = []
        for line in job.lines[:done]:
            key = line["key"]
            if key in self.expire_keys and state == "BATCH_STATE_EXPIRED":
                continue  # never ran: the job expired first
            if key in self.error_keys:
                result = error_body(400, "Invalid request in this line.")
            elif key in self.server_error_keys:
                result = error_body(500)
            else:
                result = {"response": self.generate(job.model, line["request"])}
            results.append((key, result))
        order = list(results)
        if self.shuffle and len(order) > 1:
            self._random.shuffle(order)
            if order == results:  # never hand back input order by luck
                order.reverse()
        if job.inline:
            inlined = [{**result, "metadata": {"key": key}} for key, result in order]
            meta["output"] = {"inlinedResponses": {"inlinedResponses": inlined}}
        else:
            data = b"".join(json.dumps({"key": key, **result}).encode() + b"\n" for key, result in order)
            meta["output"] = {"responsesFile": self._add_file(data, "application/jsonl")["name"]}
        failed = sum(1 for _, result in results if "error" in result)
        meta["batchStats"] = {
            "requestCount": str(len(job.lines)),
            "successfulRequestCount": str(len(results) - failed),
            "failedRequestCount": str(failed),
            "pendingRequestCount": str(len(job.lines) - len(results)),
        }
        meta["state"] = state
        self.batches[name]["done"] = True


@dataclass
class _Job:
    model: str
    lines: list[dict]  # {"key", "request"}
    inline: bool
    failure: str | None = None
    polls: int = 0
    cancelled: bool = False


def _retry_details(delay: float | None) -> list | None:
    if delay is None:
        return None
    return [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests"}],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay:g}s"},
    ]


def _check_request(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The body must be a JSON object."
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for content in contents:
        if not isinstance(content, dict) or content.get("role", "user") not in ("user", "model"):
            return "Please use a valid role: user, model."
        if not content.get("parts"):
            return "* GenerateContentRequest.contents.parts: contents.parts must not be empty."
    return _check_generation_config(body.get("generationConfig"))


def _check_generation_config(config: Any) -> str | None:
    """What the API says about a structured-output config it cannot take."""
    if not isinstance(config, dict):
        return None
    if "responseSchema" in config and "responseJsonSchema" in config:
        return "* GenerationConfig: response_schema and response_json_schema cannot both be set."
    schema = config.get("responseJsonSchema", config.get("responseSchema"))
    if schema is not None and config.get("responseMimeType") not in ("application/json", "text/x.enum"):
        return (
            "* GenerationConfig.response_mime_type: a response schema needs response_mime_type "
            "'application/json' or 'text/x.enum'."
        )
    if "responseJsonSchema" in config and not isinstance(config["responseJsonSchema"], dict):
        return "* GenerationConfig.response_json_schema: must be a JSON object."
    return None


def _read_inline(requests: Any) -> tuple[list[dict], str | None]:
    if not isinstance(requests, list) or not requests:
        return [], "* BatchGenerateContentRequest.batch.input_config: requests must not be empty."
    lines = []
    for n, item in enumerate(requests):
        problem = _check_request(item.get("request") if isinstance(item, dict) else None)
        if problem:
            return [], f"requests[{n}]: {problem}"
        key = (item.get("metadata") or {}).get("key") or str(n)
        lines.append({"key": key, "request": item["request"]})
    return lines, None


def _read_file(content: bytes) -> tuple[list[dict], str | None]:
    lines = []
    for n, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            return [], f"line {n} of the input file is not valid JSON."
        problem = _check_request(line.get("request") if isinstance(line, dict) else None)
        if problem or not isinstance(line.get("key"), str):
            return [], f"line {n} of the input file: {problem or 'a key is required.'}"
        lines.append(line)
    if not lines:
        return [], "The input file is empty."
    return lines, None


@pytest.fixture
def gemini_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[GeminiEmulator]:
    """A GeminiEmulator on generativelanguage.googleapis.com for one test, with a test GEMINI_API_KEY."""
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-test-emulator-key")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    with GeminiEmulator() as emulator:
        yield emulator
