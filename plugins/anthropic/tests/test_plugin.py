"""Packaging and registration: entry points, the hook, model names and prices as the core sees them."""

from importlib import metadata

import pytest

import pocketbatch_anthropic
from pocketbatch import ConfigError, Provider, Usage
from pocketbatch_anthropic import AnthropicProvider


def test_entry_points():
    (plugin,) = [ep for ep in metadata.entry_points(group="pocketbatch") if ep.name == "anthropic"]
    assert plugin.load() is pocketbatch_anthropic
    assert plugin.dist.name == "pocketbatch-anthropic"
    (fixture,) = [ep for ep in metadata.entry_points(group="pytest11") if ep.name == "pocketbatch_anthropic"]
    assert fixture.value == "pocketbatch_anthropic.testing"


def test_the_hook_registers_one_provider_with_bare_model_aliases():
    calls = []
    pocketbatch_anthropic.register_providers(lambda provider, aliases=(): calls.append((provider, aliases)))
    ((provider, aliases),) = calls
    assert isinstance(provider, AnthropicProvider) and isinstance(provider, Provider)
    assert provider.name == "anthropic" and provider.key_env_var == "ANTHROPIC_API_KEY"
    assert provider.batch is not None and provider.batch.provider is provider
    assert provider.default_model in aliases
    assert set(aliases) == set(AnthropicProvider.models)
    assert all(alias.startswith("claude-") and "/" not in alias for alias in aliases)
    assert hasattr(pocketbatch_anthropic.register_providers, "pocketbatch_impl")


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("anthropic/claude-haiku-4-5", "claude-haiku-4-5"),
        ("anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001"),
        ("anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"),
        ("anthropic/claude-opus-4-8", "claude-opus-4-8"),
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
    ],
)
def test_model_names_resolve(registry, model, name, monkeypatch):
    monkeypatch.delenv("POCKETBATCH_PROVIDER", raising=False)
    monkeypatch.delenv("POCKETBATCH_MODEL", raising=False)
    provider, resolved = registry.resolve(model)
    assert (provider.name, resolved) == ("anthropic", name)


@pytest.mark.parametrize("model", ["anthropic/gpt-4o-mini", "anthropic/claude-3-5-haiku-20241022"])
def test_unknown_and_retired_models_are_refused_before_any_call(registry, model):
    with pytest.raises(ConfigError, match="unknown model"):
        registry.resolve(model)


@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("claude-haiku-4-5", (1.0, 5.0)),
        ("claude-haiku-4-5-20251001", (1.0, 5.0)),
        ("claude-sonnet-4-5-20250929", (3.0, 15.0)),
        ("claude-opus-4-8", (5.0, 25.0)),
        ("claude-fable-5", (10.0, 50.0)),
        ("claude-fable-5-1", None),  # a newer model, not a snapshot of claude-fable-5
        ("claude-sonnet-5", None),
    ],
)
def test_prices(model, price):
    assert AnthropicProvider().price(model) == price


def test_every_priced_model_is_listed_and_the_batch_costs_half():
    provider = AnthropicProvider()
    assert set(provider.prices) <= set(provider.models)
    usage = Usage(input_tokens=2_000_000, output_tokens=1_000_000)
    assert provider.cost("claude-haiku-4-5", usage) == pytest.approx(7.0)
    assert provider.cost("claude-haiku-4-5", usage, provider.batch.price_factor) == pytest.approx(3.5)
