"""Packaging and registration: entry points, the hook, model names, prices and `pocketbatch providers`."""

import json
import os
import subprocess
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

import pytest

import pocketbatch_gemini
from pocketbatch import ConfigError, Provider, Usage
from pocketbatch_gemini import GeminiProvider, prices_on


@pytest.fixture
def registry():
    """The core's registry with this plugin registered, whether or not entry points were loaded."""
    from pocketbatch import registry
    from pocketbatch.plugins import load_plugins, pm

    load_plugins()
    added = not pm.is_registered(pocketbatch_gemini)
    if added:
        pm.register(pocketbatch_gemini, name="test-pocketbatch-gemini")
    registry.reset()
    yield registry
    if added:
        pm.unregister(name="test-pocketbatch-gemini")
    registry.reset()


def test_entry_points():
    (plugin,) = [ep for ep in metadata.entry_points(group="pocketbatch") if ep.name == "gemini"]
    assert plugin.load() is pocketbatch_gemini
    assert plugin.dist.name == "pocketbatch-gemini"
    (fixture,) = [ep for ep in metadata.entry_points(group="pytest11") if ep.name == "pocketbatch_gemini"]
    assert fixture.value == "pocketbatch_gemini.testing"


def test_the_hook_registers_one_provider_with_bare_model_aliases():
    calls = []
    pocketbatch_gemini.register_providers(lambda provider, aliases=(): calls.append((provider, aliases)))
    ((provider, aliases),) = calls
    assert isinstance(provider, GeminiProvider) and isinstance(provider, Provider)
    assert provider.name == "gemini" and provider.key_env_var == "GEMINI_API_KEY"
    assert provider.batch is not None and provider.batch.provider is provider
    assert provider.default_model in aliases and set(aliases) == set(pocketbatch_gemini.MODELS)
    assert hasattr(pocketbatch_gemini.register_providers, "pocketbatch_impl")


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gemini/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini/gemini-2.5-pro", "gemini-2.5-pro"),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        ("gemini/gemini-3.8-flash", "gemini-3.8-flash"),
        ("gemini-3.5-flash-lite", "gemini-3.5-flash-lite"),
    ],
)
def test_model_names_resolve(registry, model, name, monkeypatch):
    monkeypatch.delenv("POCKETBATCH_PROVIDER", raising=False)
    monkeypatch.delenv("POCKETBATCH_MODEL", raising=False)
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    provider, resolved = registry.resolve(model)
    assert (provider.name, resolved) == ("gemini", name)


def test_unknown_models_are_refused_before_any_call(registry, monkeypatch):
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="unknown model"):
        registry.resolve("gemini/gemini-9-ultra")
    with pytest.raises(ConfigError, match="unknown model"):  # shut down
        registry.resolve("gemini/gemini-2.0-flash")


@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("gemini-3.5-flash-lite", (0.30, 2.50)),
        ("gemini-3.5-flash", (1.50, 9.00)),
        ("gemini-3.1-pro-preview", (2.00, 12.00)),
        ("gemini-2.5-flash-lite", (0.10, 0.40)),
        ("gemini-2.5-flash", (0.30, 2.50)),  # billed as gemini-3.5-flash-lite, where it is routed
        ("gemini-2.0-flash-lite", None),
        ("gemini-1.5-flash", None),
    ],
)
def test_prices(model, price):
    assert GeminiProvider().price(model) == price


def test_gemini_3_8_flash_and_the_requests_routed_to_it_cost_double_from_2027():
    assert prices_on(date(2026, 12, 31))["gemini-3.8-flash"] == (0.75, 3.75)
    assert prices_on(date(2027, 1, 1))["gemini-3.8-flash"] == (1.50, 7.50)
    assert prices_on(date(2027, 1, 1))["gemini-2.5-pro"] == (1.50, 7.50)
    assert pocketbatch_gemini.PRICES == prices_on(date.today())


def test_every_priced_model_is_listed_and_the_batch_costs_half():
    provider = GeminiProvider()
    assert set(provider.prices) == set(pocketbatch_gemini.MODELS)
    usage = Usage(input_tokens=2_000_000, output_tokens=1_000_000)
    assert provider.cost("gemini-2.5-flash", usage) == pytest.approx(3.1)
    assert provider.cost("gemini-2.5-flash", usage, provider.batch.price_factor) == pytest.approx(1.55)


def test_pocketbatch_providers_lists_gemini(monkeypatch):
    # The installed command, as a user runs it: the plugin comes in through its entry point.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "GOOGLE_", "GEMINI_"))}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "pocketbatch"), "providers", "--json"],
        env={**env, "GEMINI_API_KEY": "k"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (row,) = [r for r in json.loads(out) if r["name"] == "gemini"]
    assert row["plugin"] == "pocketbatch-gemini" and row["batch"] is True
    assert (
        row["models"] == list(pocketbatch_gemini.MODELS) and row["default_model"] == "gemini-3.5-flash-lite"
    )
    assert (row["key_env_var"], row["key"]) == ("GEMINI_API_KEY", "set")


def test_pocketbatch_providers_shows_google_api_key_when_it_holds_the_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "GOOGLE_", "GEMINI_"))}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "pocketbatch"), "providers", "--json"],
        env={**env, "GOOGLE_API_KEY": "k"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (row,) = [r for r in json.loads(out) if r["name"] == "gemini"]
    assert (row["key_env_var"], row["key"]) == ("GOOGLE_API_KEY", "set")
