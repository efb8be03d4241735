from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("pocketbatch")
hookimpl = HookimplMarker("pocketbatch")


@hookspec
def register_providers(register):
    """Register providers: call register(provider, aliases=(...)) once for each."""
