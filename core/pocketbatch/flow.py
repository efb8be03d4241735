"""Nodes and flows with pocketflow 0.0.3's semantics; docs/compat.md lists the deliberate differences."""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import time
import warnings
from collections.abc import Awaitable, Iterable
from typing import Any

from .config import MODES
from .engine.collector import map_parallel


class BaseNode:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.successors: dict[str, BaseNode] = {}

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def next(self, node: BaseNode, action: str = "default") -> BaseNode:
        if action in self.successors:
            warnings.warn(f"Overwriting successor for action '{action}'")
        self.successors[action] = node
        return node

    def prep(self, shared: Any) -> Any:
        pass

    def exec(self, prep_res: Any) -> Any:
        pass

    def post(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        pass

    def _exec(self, prep_res: Any) -> Any:
        return self.exec(prep_res)

    def _run(self, shared: Any) -> Any:
        p = self.prep(shared)
        e = self._exec(p)
        return self.post(shared, p, e)

    def run(self, shared: Any) -> Any:
        if self.successors:
            warnings.warn("Node won't run successors. Use Flow.")
        return self._run(shared)

    def __rshift__(self, other: BaseNode) -> BaseNode:
        return self.next(other)

    def __sub__(self, action: str) -> _ConditionalTransition:
        if isinstance(action, str):
            return _ConditionalTransition(self, action)
        raise TypeError("Action must be a string")


def _copy(node: BaseNode | None) -> Any:
    """copy.copy(node): a flow copies each node it visits, and a parallel node each item's. For a plain
    class this is what copy.copy does, without its __reduce_ex__ round trip (3× slower), attribute by
    attribute: the copy's own __dict__ is never made, 64 bytes less for each waiting item. A class with
    __slots__, descriptors that take assignment or its own way of copying goes through copy.copy."""
    cls = type(node)
    if _copies_plainly(cls):
        clone = cls.__new__(cls)
        for name, value in node.__dict__.items():
            setattr(clone, name, value)
        return clone
    return copy.copy(node)


@functools.cache
def _copies_plainly(cls: type) -> bool:
    return (
        issubclass(cls, BaseNode)
        and not hasattr(cls, "__copy__")
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__new__ is object.__new__
        and cls.__setattr__ is object.__setattr__
        and not any(
            "__slots__" in vars(k) or any(hasattr(v, "__set__") for n, v in vars(k).items() if n[:2] != "__")
            for k in cls.__mro__
        )
    )


class _ConditionalTransition:
    def __init__(self, src: BaseNode, action: str) -> None:
        self.src, self.action = src, action

    def __rshift__(self, tgt: BaseNode) -> BaseNode:
        return self.src.next(tgt, self.action)


class Node(BaseNode):
    def __init__(self, max_retries: int = 1, wait: float = 0) -> None:
        super().__init__()
        if max_retries < 1:  # pocketflow silently never calls exec
            raise ValueError(f"max_retries is the total number of attempts: at least 1, not {max_retries}")
        self.max_retries, self.wait = max_retries, wait

    def exec_fallback(self, prep_res: Any, exc: Exception) -> Any:
        raise exc

    def _exec(self, prep_res: Any) -> Any:
        for self.cur_retry in range(self.max_retries):
            try:
                return self.exec(prep_res)
            except Exception as e:
                if self.cur_retry == self.max_retries - 1:
                    return self.exec_fallback(prep_res, e)
                if self.wait > 0:
                    time.sleep(self.wait)


class BatchNode(Node):
    def _exec(self, items: Iterable[Any] | None) -> list[Any]:
        return [super(BatchNode, self)._exec(i) for i in (items or [])]


class Flow(BaseNode):
    def __init__(self, start: BaseNode | None = None) -> None:
        super().__init__()
        self.start_node = start

    def start(self, start: BaseNode) -> BaseNode:
        self.start_node = start
        return start

    def get_next_node(self, curr: BaseNode, action: str | None) -> BaseNode | None:
        nxt = curr.successors.get(action or "default")
        if not nxt and curr.successors:
            warnings.warn(f"Flow ends: '{action}' not found in {list(curr.successors)}")
        return nxt

    def _orch(self, shared: Any, params: dict[str, Any] | None = None) -> Any:
        curr, p, last_action = _copy(self.start_node), (params or {**self.params}), None
        while curr:
            curr.set_params(p)
            last_action = curr._run(shared)
            curr = _copy(self.get_next_node(curr, last_action))
        return last_action

    def _run(self, shared: Any) -> Any:
        p = self.prep(shared)
        o = self._orch(shared)
        return self.post(shared, p, o)

    def post(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        return exec_res


class BatchFlow(Flow):
    def _run(self, shared: Any) -> Any:
        pr = self.prep(shared) or []
        for bp in pr:
            self._orch(shared, {**self.params, **bp})
        return self.post(shared, pr, None)


class AsyncNode(Node):
    async def prep_async(self, shared: Any) -> Any:
        pass

    async def exec_async(self, prep_res: Any) -> Any:
        pass

    async def exec_fallback_async(self, prep_res: Any, exc: Exception) -> Any:
        raise exc

    async def post_async(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        pass

    async def _exec(self, prep_res: Any) -> Any:
        for self.cur_retry in range(self.max_retries):
            try:
                return await self.exec_async(prep_res)
            except Exception as e:
                if self.cur_retry == self.max_retries - 1:
                    return await self.exec_fallback_async(prep_res, e)
                if self.wait > 0:
                    await asyncio.sleep(self.wait)

    async def run_async(self, shared: Any) -> Any:
        if self.successors:
            warnings.warn("Node won't run successors. Use AsyncFlow.")
        return await self._run_async(shared)

    async def _run_async(self, shared: Any) -> Any:
        p = await self.prep_async(shared)
        e = await self._exec(p)
        return await self.post_async(shared, p, e)

    def _run(self, shared: Any) -> Any:
        raise RuntimeError("Use run_async.")


class AsyncBatchNode(AsyncNode, BatchNode):
    async def _exec(self, items: Iterable[Any] | None) -> list[Any]:
        return [await super(AsyncBatchNode, self)._exec(i) for i in (items or [])]


class _Parallel:
    """The keyword-only options of the parallel classes: items in flight, and how LLM calls run."""

    def _set_parallel(self, max_concurrency: int | None, mode: str | None) -> None:
        if max_concurrency is not None and max_concurrency < 0:
            raise ValueError(f"max_concurrency must be None or 0 (unbounded) or more, not {max_concurrency}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.max_concurrency, self.mode = max_concurrency, mode


class AsyncParallelBatchNode(_Parallel, AsyncNode, BatchNode):
    def __init__(
        self,
        max_retries: int = 1,
        wait: float = 0,
        *,
        max_concurrency: int | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(max_retries, wait)
        self._set_parallel(max_concurrency, mode)

    async def _exec(self, items: Iterable[Any] | None) -> list[Any]:
        # Each item runs on its own shallow copy (as a flow does per visit), so self.cur_retry is per item.
        own = getattr(self, "__dict__", {}).keys() & _HOOKS  # set on the node itself, not its class
        if self.max_retries == 1 and not own and _one_attempt_is_exec_async(type(self)):
            # One attempt and the default fallback (raise what exec_async raised): AsyncNode._exec would
            # only await exec_async and re-raise, so the item is exec_async's own coroutine, one frame
            # (0.3 KiB) less for each waiting item.
            def one(item: Any) -> Awaitable[Any]:
                node = _copy(self)
                node.cur_retry = 0
                return node.exec_async(item)

        else:

            def one(item: Any) -> Awaitable[Any]:
                return super(AsyncParallelBatchNode, _copy(self))._exec(item)

        return await map_parallel(one, items or [], self.max_concurrency, self.mode)


_HOOKS = frozenset(("_exec", "exec_async", "exec_fallback_async"))


def _one_attempt_is_exec_async(cls: type) -> bool:
    """Whether an item of this parallel node, given one attempt, is exactly `await exec_async(item)`: its
    items' attempts are AsyncNode's, its fallback re-raises, and exec_async is a coroutine function (so
    calling it runs none of its code before the item's task does). Looked at on each run, not cached,
    so that a class patched after its first run is seen as it is now."""
    after = cls.__mro__[cls.__mro__.index(AsyncParallelBatchNode) + 1 :]
    attempts = next(k for k in after if "_exec" in vars(k))
    return (
        attempts is AsyncNode
        and cls.exec_fallback_async is AsyncNode.exec_fallback_async
        and inspect.iscoroutinefunction(cls.exec_async)
    )


class AsyncFlow(Flow, AsyncNode):
    async def _orch_async(self, shared: Any, params: dict[str, Any] | None = None) -> Any:
        curr, p, last_action = _copy(self.start_node), (params or {**self.params}), None
        while curr:
            curr.set_params(p)
            if isinstance(curr, AsyncNode):
                last_action = await curr._run_async(shared)
            else:
                last_action = curr._run(shared)
            curr = _copy(self.get_next_node(curr, last_action))
        return last_action

    async def _run_async(self, shared: Any) -> Any:
        p = await self.prep_async(shared)
        o = await self._orch_async(shared)
        return await self.post_async(shared, p, o)

    async def post_async(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        return exec_res


class AsyncBatchFlow(AsyncFlow, BatchFlow):
    async def _run_async(self, shared: Any) -> Any:
        pr = await self.prep_async(shared) or []
        for bp in pr:
            await self._orch_async(shared, {**self.params, **bp})
        return await self.post_async(shared, pr, None)


class AsyncParallelBatchFlow(_Parallel, AsyncFlow, BatchFlow):
    def __init__(
        self,
        start: BaseNode | None = None,
        *,
        max_concurrency: int | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(start)
        self._set_parallel(max_concurrency, mode)

    async def _run_async(self, shared: Any) -> Any:
        pr = await self.prep_async(shared) or []

        def branch(bp: dict[str, Any]) -> Awaitable[Any]:
            return self._orch_async(shared, {**self.params, **bp})

        await map_parallel(branch, pr, self.max_concurrency, self.mode)
        return await self.post_async(shared, pr, None)
