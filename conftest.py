"""Test isolation for the whole repository: no installed plugin, no user setting, no user file leaks in."""

import os
import sys

import pytest

from pocketbatch import config as settings_module
from pocketbatch import registry


def pytest_configure(config):
    sys._called_from_test = True  # plugins.load_plugins() then skips entry points, as llm's tests do


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("POCKETBATCH_") or name.endswith(("_API_KEY", "_BASE_URL")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("POCKETBATCH_JOURNAL", str(tmp_path / "journal.sqlite3"))
    monkeypatch.setenv("POCKETBATCH_OFFLINE_DIR", str(tmp_path / "offline"))
    monkeypatch.setenv("POCKETBATCH_OFFLINE_LATENCY", "0")
    settings_module.reload()
    registry.reset()
    yield
    monkeypatch.undo()
    settings_module.reload()
    registry.reset()


class RedisServer:
    """A real redis-server on a free port, persistence off, in its own directory."""

    def __init__(self, directory, port: int | None = None) -> None:
        self.directory, self.port, self.proc = directory, port or _free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.directory)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return self
            except OSError:
                time.sleep(0.01)
        self.stop()
        pytest.fail(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; tests keep apart by their own keys (or flush it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's redis-server, emptied for this test: its URL."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def new_redis_server(tmp_path):
    """Start another redis-server (e.g. to kill and restart it in one test); stopped after the test."""
    servers = []

    def start() -> RedisServer:
        servers.append(RedisServer(tmp_path).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
