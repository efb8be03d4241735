import importlib
import os
import sys
import threading
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import ConfigError

DEFAULT_PLUGINS = ("pocketbatch.default_plugins.offline",)

pm = pluggy.PluginManager("pocketbatch")
pm.add_hookspecs(hookspecs)

_loaded = False
_lock = threading.RLock()  # one load; a thread that asks meanwhile waits for it instead of seeing none
load_errors: dict[str, str] = {}  # plugin name -> why it could not be loaded
distributions: dict[str, metadata.Distribution] = {}  # plugin name -> the distribution it came from
# (plugins that failed to load too: their distribution is what the user would uninstall)


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            # Only once check_pending passed (a misspelt hook fails every time it is asked), and every
            # plugin could be loaded whole (see _half_imported).
            _loaded = _load_all()


def _load_all() -> bool:
    allow = os.environ.get("POCKETBATCH_LOAD_PLUGINS")
    if allow is None and not hasattr(sys, "_called_from_test"):
        for ep in metadata.entry_points(group="pocketbatch"):
            _load(ep, ep.dist)
    elif allow:
        for name in filter(None, (n.strip() for n in allow.split(","))):
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                load_errors[name] = f"POCKETBATCH_LOAD_PLUGINS names {name}, which is not installed"
                continue
            for ep in dist.entry_points:
                if ep.group == "pocketbatch":
                    _load(ep, dist)
    complete = not _deferred
    _deferred.clear()
    for name in DEFAULT_PLUGINS:
        if not pm.has_plugin(name):
            pm.register(importlib.import_module(name), name)
    try:
        pm.check_pending()  # a misspelt hook name fails here, loudly
    except pluggy.PluginValidationError as e:
        raise ConfigError(f"plugin {pm.get_name(e.plugin)!r}: {e} (the hook is register_providers)") from None
    return complete


_deferred: list[str] = []  # plugins whose module was still being imported when pocketbatch loaded


def _half_imported(ep: metadata.EntryPoint) -> bool:
    """True when the plugin's module is being imported right now, and pocketbatch's own import (which
    loads the plugins) came from it: `import pocketbatch_openai` before `import pocketbatch`. Loading it
    now would register a module whose hooks are not defined yet; it is loaded on the first call instead."""
    module = sys.modules.get(ep.module)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _load(ep: metadata.EntryPoint, dist) -> None:
    # One broken plugin is reported with its name and does not take the others down.
    if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
        return
    if _half_imported(ep):
        _deferred.append(ep.name)
        return
    try:
        pm.register(ep.load(), name=ep.name)
    except Exception as e:
        load_errors[ep.name] = f"{type(e).__name__}: {e}"
        distributions[ep.name] = dist
        # Named as the user installed it (what `pip uninstall` takes), as well as by its entry point.
        where = f"plugin {ep.name!r} (entry point {ep.value})"
        name = _dist_name(dist)
        if name:
            where = f"plugin {name} {dist.version} (entry point {ep.name} = {ep.value})"
        print(f"pocketbatch: {where} failed to load: {e}", file=sys.stderr)
        if name:
            print(f"pocketbatch: `pip uninstall {name}` removes it", file=sys.stderr)
        return
    distributions[ep.name] = dist


def _dist_name(dist: metadata.Distribution | None) -> str | None:
    try:
        return dist.metadata["Name"] if dist is not None else None
    except Exception:  # a distribution without readable metadata
        return None


def trace(message: str) -> None:
    """Print what a hook did when POCKETBATCH_TRACE_PLUGINS is set, as datasette's tracing does."""
    if os.environ.get("POCKETBATCH_TRACE_PLUGINS", "").strip() not in ("", "0"):
        print(f"pocketbatch trace: {message}", file=sys.stderr)
