"""The providers that plugins registered, and which of them serves a model name."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

from .config import settings
from .errors import ConfigError
from .plugins import load_plugins, pm, trace
from .providers import Provider


@dataclass
class Registered:
    provider: Provider
    plugin: str  # the name of the plugin that registered it
    aliases: tuple[str, ...] = ()


_providers: dict[str, Registered] | None = None
_aliases: dict[str, str] = {}
_announced = False
_lock = threading.Lock()  # the first lookups may come from several threads at once


def _registered() -> dict[str, Registered]:
    providers = _providers
    if providers is not None:
        return providers
    with _lock:
        return _providers if _providers is not None else _register()


def _register() -> dict[str, Registered]:
    global _providers
    load_plugins()
    providers: dict[str, Registered] = {}
    # Each plugin's hook is called on its own, so every provider knows the plugin it came from; in
    # registration order, so a later registration of a name wins (a test's over an installed one).
    for impl in pm.hook.register_providers.get_hookimpls():

        def register(provider: Provider, aliases: tuple[str, ...] = (), _plugin=impl.plugin_name) -> None:
            if not isinstance(provider, Provider):
                raise TypeError(f"plugin {_plugin!r} registered {provider!r}, which is not a Provider")
            providers[provider.name] = Registered(provider, _plugin, tuple(aliases))
            trace(f"register_providers: {_plugin} registered {provider.name!r}, aliases {list(aliases)}")

        trace(f"calling register_providers of {impl.plugin_name}")
        impl.function(**{name: register for name in impl.argnames})
    _aliases.clear()
    for entry in providers.values():
        for alias in entry.aliases:
            _aliases.setdefault(alias, entry.provider.name)
    _providers = providers
    return providers


def reset() -> None:
    """Forget the registrations, so the next lookup asks the plugins again (after pm.register in tests)."""
    global _providers, _announced
    _providers, _announced = None, False
    _resolved.clear()


def list_providers() -> list[Provider]:
    return [entry.provider for entry in _registered().values()]


def registrations() -> list[Registered]:
    return list(_registered().values())


def get_provider(name: str) -> Provider:
    try:
        return _registered()[name.lower()].provider
    except KeyError:
        raise ConfigError(
            f"unknown provider {name!r}; installed: {', '.join(sorted(_registered()))}"
        ) from None


def default_provider() -> Provider:
    """POCKETBATCH_PROVIDER, else the first with its key set (openai, anthropic, by name), else offline."""
    global _announced
    chosen = settings().provider
    if chosen:
        return get_provider(chosen)
    order = sorted(
        _registered().values(),
        key=lambda e: ({"openai": 0, "anthropic": 1}.get(e.provider.name, 2), e.provider.name),
    )
    keyed = [e.provider for e in order if e.provider.key_env_var and e.provider.has_key()]
    provider = keyed[0] if keyed else get_provider("offline")
    if not _announced:
        _announced = True
        why = f"{provider.key_env_var} is set" if keyed else "no provider chosen and no API key set"
        print(f"pocketbatch: using the {provider.name} provider ({why})", file=sys.stderr)
    return provider


_resolved: dict[str | None, tuple[Provider, str]] = {}
_resolved_under: object = None  # the settings the answers in _resolved were found under


def resolve(model: str | None = None) -> tuple[Provider, str]:
    """The provider and its own model name for "provider/model", a bare name or alias, or None.

    Answers are remembered until the settings or the registrations change: every call of a round asks
    for the same model, and finding the default provider reads the environment for every key.
    """
    global _resolved_under
    current = settings()
    if _resolved_under is not current or _providers is None:
        _resolved.clear()
        _resolved_under = current
    found = _resolved.get(model)
    if found is None:
        found = _resolved[model] = _resolve(model)
    return found


def _resolve(model: str | None) -> tuple[Provider, str]:
    model = model or settings().model
    if not model:
        provider = default_provider()
        return provider, provider.default_model
    registered = _registered()
    prefix, _, rest = model.partition("/")
    if rest and prefix.lower() in registered:
        provider, name = registered[prefix.lower()].provider, rest
    elif model in _aliases:
        provider, name = registered[_aliases[model]].provider, model
    elif settings().provider:
        provider, name = get_provider(settings().provider), model
    else:
        raise ConfigError(
            f"unknown model {model!r}: write it as provider/model or set POCKETBATCH_PROVIDER; installed "
            f"providers: {', '.join(sorted(registered))} (`pocketbatch providers` lists their models)"
        )
    if not provider.accepts(name):
        raise ConfigError(
            f"unknown model {name!r} for provider {provider.name}; its models: {', '.join(provider.models)}"
        )
    return provider, name


def key_status(provider: Provider) -> str:
    if provider.key_env_var is None:
        return "not needed"
    return "set" if os.environ.get(provider.key_env_var, "").strip() else "not set"
