"""SDK clients are closed when the event loop they belong to ends, not dropped with open connections."""

import asyncio
import os
import subprocess
import sys
import threading

import pytest

from pocketbatch.llm import _end_sync_loop
from pocketbatch.providers import close_with_loop


class Client:
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        await asyncio.sleep(0)  # closing awaits, as an SDK client's does: the loop must still run
        self.closed += 1


def test_clients_close_when_asyncio_run_ends():
    clients = [Client(), Client()]

    async def use() -> None:
        before = [c.closed for c in clients]
        for client in clients:
            close_with_loop(client)
        await asyncio.sleep(0)
        assert [c.closed for c in clients] == before  # open while the loop runs

    asyncio.run(use())
    assert [c.closed for c in clients] == [1, 1]
    asyncio.run(use())  # a new loop: registered again, closed again, each once per loop
    assert [c.closed for c in clients] == [2, 2]


def test_the_sync_loop_closes_its_clients_at_exit():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    client = Client()

    async def use() -> None:
        close_with_loop(client)

    asyncio.run_coroutine_threadsafe(use(), loop).result()
    assert client.closed == 0
    _end_sync_loop(loop)  # what atexit does for call_llm's loop
    assert client.closed == 1
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


# A flow whose calls go through the real openai and anthropic SDK clients, to the plugins' emulators
# (their respx routes) served on a loopback socket: respx alone opens no connection, so a client left
# open would never warn. Two asyncio.run loops, so the first loop's clients end with it.
FLOW_OVER_REAL_CONNECTIONS = """
import asyncio
import gc
import os
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import respx

warnings.simplefilter("error", ResourceWarning)
routes = respx.Router(assert_all_mocked=True)
lock = threading.Lock()


class Serve(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the clients' pooled connections stay open between calls

    def answer(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        url = f"http://{self.headers['host']}{self.path}"
        request = httpx.Request(self.command, url, headers=dict(self.headers), content=body)
        with lock:
            response = routes.handler(request)
            content = response.read()
        self.send_response(response.status_code)
        for name, value in response.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"
os.environ.update(OPENAI_BASE_URL=f"{base}/v1", ANTHROPIC_BASE_URL=base)

if sys.argv[1:] == ["--without-close-with-loop"]:  # to show that this check catches a client left open
    import pocketbatch_anthropic
    import pocketbatch_openai

    pocketbatch_openai.close_with_loop = pocketbatch_anthropic.close_with_loop = lambda client: None

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, call_llm_async
from pocketbatch_anthropic.testing import AnthropicEmulator
from pocketbatch_openai.testing import OpenAIEmulator

routes.route(path__startswith="/v1/chat").mock(side_effect=OpenAIEmulator(f"{base}/v1")._handle)
AnthropicEmulator(base).install(routes)


class Ask(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return shared["prompts"]

    async def exec_async(self, prompt):
        first = await call_llm_async(prompt, model="openai/gpt-4o-mini")
        return first + await call_llm_async(prompt, model="anthropic/claude-haiku-4-5")

    async def post_async(self, shared, prep, replies):
        shared["replies"] = replies


for run in range(2):
    shared = {"prompts": [f"say {i}" for i in range(3)]}
    asyncio.run(AsyncFlow(start=Ask()).run_async(shared))
    assert shared["replies"][0] == "Echo: say 0reply to: say 0", shared["replies"]
gc.collect()  # whatever was dropped open warns now, not at an exit that may skip it
print("ran both loops")
"""


@pytest.mark.parametrize("close_with_loop", [True, False], ids=["clients-closed", "check-is-sensitive"])
def test_no_unclosed_warnings_from_real_sdk_clients_across_two_loops(tmp_path, close_with_loop):
    script = tmp_path / "flow.py"
    script.write_text(FLOW_OVER_REAL_CONNECTIONS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "PYTHON"))}
    env.update(
        OPENAI_API_KEY="sk-test",
        ANTHROPIC_API_KEY="sk-ant-test",
        POCKETBATCH_JOURNAL="off",
        PYTHONWARNINGS="error::ResourceWarning",  # tracemalloc stays off: PYTHONTRACEMALLOC is not passed
    )
    args = [] if close_with_loop else ["--without-close-with-loop"]
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "ran both loops" in done.stdout, done.stderr
    # A warning raised in a finalizer cannot propagate: Python reports it on stderr ("Exception ignored").
    unclosed = "unclosed" in done.stderr or "Exception ignored" in done.stderr
    assert unclosed is not close_with_loop, done.stderr
