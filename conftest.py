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
