"""pocketbatch: PocketFlow-compatible nodes and flows whose LLM calls pick concurrent calls or batch APIs."""

import os as _os

from .engine.gcpause import freeze_long_lived as _freeze_long_lived
from .errors import (
    BatchError,
    ConfigError,
    LLMError,
    PocketBatchError,
    RateLimitError,
    RefusalError,
    RequestError,
    SchemaError,
    TransientError,
    TruncationError,
)
from .flow import (
    AsyncBatchFlow,
    AsyncBatchNode,
    AsyncFlow,
    AsyncNode,
    AsyncParallelBatchFlow,
    AsyncParallelBatchNode,
    BatchFlow,
    BatchNode,
    Flow,
    Node,
)
from .hookspecs import hookimpl
from .llm import call_llm, call_llm_async
from .plugins import load_plugins as _load_plugins
from .providers import BatchAPI, BatchStatus, LLMRequest, LLMResponse, Provider, RateLimits, Usage
from .registry import get_provider, list_providers

__all__ = [
    "AsyncBatchFlow",
    "AsyncBatchNode",
    "AsyncFlow",
    "AsyncNode",
    "AsyncParallelBatchFlow",
    "AsyncParallelBatchNode",
    "BatchAPI",
    "BatchError",
    "BatchFlow",
    "BatchNode",
    "BatchStatus",
    "ConfigError",
    "Flow",
    "LLMError",
    "LLMRequest",
    "LLMResponse",
    "Node",
    "PocketBatchError",
    "Provider",
    "RateLimitError",
    "RateLimits",
    "RefusalError",
    "RequestError",
    "SchemaError",
    "TransientError",
    "TruncationError",
    "Usage",
    "call_llm",
    "call_llm_async",
    "get_provider",
    "hookimpl",
    "list_providers",
]

# Plugins load at import, not on the first call: importing a provider's SDK takes most of a second, which
# inside a running flow would hold its event loop and delay the first requests (docs/design-choices.md).
# Under pytest they stay lazy, so a test suite decides what is registered before anything loads.
if "PYTEST_VERSION" not in _os.environ:
    try:
        _load_plugins()
    except ConfigError:
        pass  # a broken plugin is reported, with its name, by the first call that needs a provider
    # The SDKs leave ~200,000 objects that live as long as the process. A full garbage collection walks
    # them all, holding a running flow's loop for ~100 ms, long enough for the requests the limiter spaced
    # out to leave together. Collect once now (~50 ms) and keep them out of later collections.
    _freeze_long_lived()
