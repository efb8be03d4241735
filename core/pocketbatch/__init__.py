"""pocketbatch: PocketFlow-compatible nodes and flows whose LLM calls pick concurrent calls or batch APIs."""

from .errors import (
    BatchError,
    ConfigError,
    LLMError,
    PocketBatchError,
    RateLimitError,
    RequestError,
    TransientError,
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
from .providers import BatchAPI, BatchStatus, LLMRequest, LLMResponse, Provider, RateLimits, Usage

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
    "RequestError",
    "TransientError",
    "Usage",
    "hookimpl",
]
