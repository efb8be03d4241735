"""pocketbatch: PocketFlow-compatible nodes and flows whose LLM calls pick concurrent calls or batch APIs."""

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
