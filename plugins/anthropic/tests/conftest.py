import pytest

import pocketbatch_anthropic
from pocketbatch_anthropic import AnthropicProvider


@pytest.fixture(autouse=True)
def anthropic_env(monkeypatch):
    """A fake key and no endpoint or max_tokens override from the developer's shell."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.delenv("POCKETBATCH_ANTHROPIC_MAX_TOKENS", raising=False)


@pytest.fixture
def provider():
    """The provider with strict clients, so a mock body the SDK cannot validate fails the test."""
    return AnthropicProvider(client_options={"_strict_response_validation": True})


@pytest.fixture
def registry():
    """The core's registry with this plugin registered, whether or not entry points were loaded."""
    from pocketbatch import registry
    from pocketbatch.plugins import load_plugins, pm

    load_plugins()
    added = not pm.is_registered(pocketbatch_anthropic)
    if added:
        pm.register(pocketbatch_anthropic, name="test-pocketbatch-anthropic")
    registry.reset()
    yield registry
    if added:
        pm.unregister(name="test-pocketbatch-anthropic")
    registry.reset()
