"""Run a flow over a Ray Dataset: `map_flow(ds, make_flow, batch_size=2000, actors=4)` (docs/scale.md).

Each actor of the pool builds the flow once (`make_flow()`); each Ray batch runs through it with
`shared = {"rows": [row dicts]}` as one round of LLM calls (so the automatic choice, the journal and the
deadline work per batch), and the flow leaves `shared["results"]`, one per row, in the same order. The
output rows are the input rows plus the result's columns (`result_columns`). Needs the `ray` extra
(`pip install pocketbatch[ray]`); the rest of pocketbatch never imports this module.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable
from typing import Any

from .flow import AsyncNode, BaseNode
from .providers import LLMResponse

LLM_COLUMNS = ("text", "via", "input_tokens", "output_tokens", "cost_usd", "error")

_warned_local_limits = False


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables every actor gets: POCKETBATCH_* and the providers' keys and endpoints."""
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in environ.items()
        if k.startswith(("POCKETBATCH_", "GOOGLE_")) or k.endswith(("_API_KEY", "_BASE_URL"))
    }


def map_flow(
    ds: Any,
    make_flow: Callable[[], BaseNode],
    *,
    batch_size: int = 2000,
    actors: int = 4,
    **ray_remote_args: Any,
) -> Any:
    """The dataset `ds` with each row run through the flow `make_flow()` builds, `batch_size` rows a round,
    on a pool of `actors` actors. Lazy, as every Ray Dataset transformation: nothing runs until the result
    is consumed (`write_json`, `take_all`, `materialize`...). `ray_remote_args` go to each actor
    (`num_cpus=...`); a `runtime_env` given there is merged with the forwarded variables."""
    import ray.data

    if not callable(make_flow):
        raise TypeError(f"make_flow must be a function that returns a Flow or a node, not {make_flow!r}")
    if batch_size < 1 or actors < 1:
        raise ValueError(f"batch_size and actors must be at least 1, not {batch_size} and {actors}")
    env = forwarded_env()
    global _warned_local_limits
    if "POCKETBATCH_REDIS_URL" not in env and not _warned_local_limits:
        _warned_local_limits = True
        warnings.warn(
            f"POCKETBATCH_REDIS_URL is not set: each of the {actors} actors keeps its own rate limit, so "
            "together they may send up to "
            f"{actors} times the provider's limit. Set POCKETBATCH_REDIS_URL=redis://host:6379/0 (and "
            "POCKETBATCH_JOURNAL=redis://host:6379/0 on a cluster of machines) to share one limit and one "
            "journal (docs/scale.md).",
            stacklevel=2,
        )
    runtime_env = dict(ray_remote_args.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return ds.map_batches(
        FlowRunner,
        fn_constructor_kwargs={"make_flow": make_flow},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        runtime_env=runtime_env,
        **ray_remote_args,
    )


class FlowRunner:
    """The callable class of `map_flow`: one per actor, the flow built once, one Ray batch per call."""

    def __init__(self, make_flow: Callable[[], BaseNode]) -> None:
        flow = make_flow()
        if not isinstance(flow, BaseNode):
            raise TypeError(
                "make_flow() must return a pocketbatch Flow or node (the flow to run on each batch), "
                f"not {type(flow).__name__}"
            )
        self.flow = flow

    async def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()  # plain Python values, as a row of the dataset
        shared: dict[str, Any] = {"rows": rows}
        try:
            if isinstance(self.flow, AsyncNode):
                await self.flow.run_async(shared)
            else:  # a sync flow's call_llm waits on its own loop; this one stays free meanwhile
                await asyncio.to_thread(self.flow.run, shared)
        except Exception as e:  # every row of the batch carries the failure; the Ray task does not fail
            failure = describe(e)
            return table([{**row, **dict.fromkeys(LLM_COLUMNS), "error": failure} for row in rows])
        results = shared.get("results")
        if not isinstance(results, (list, tuple)) or len(results) != len(rows):
            got = "none" if results is None else f"{type(results).__name__} of {_length(results)}"
            raise ValueError(
                f"the flow must leave shared['results'], a list with one result per row of "
                f"shared['rows'] ({len(rows)} rows in this batch), in the same order; it left {got}"
            )
        columns = [result_columns(r) for r in results]
        if any("parsed" in c for c in columns):  # one schema for the whole batch
            for c in columns:
                if "text" in c:
                    c.setdefault("parsed", None)
        return table([{**row, **c} for row, c in zip(rows, columns, strict=True)])


def table(rows: list[dict[str, Any]]) -> Any:
    """The output block: every row with every column (None where a row has none), as an Arrow table, or
    a pandas frame of Python objects when a column holds values Arrow cannot type."""
    import pandas as pd
    import pyarrow as pa

    names = list(dict.fromkeys(name for row in rows for name in row))
    full = [{name: row.get(name) for name in names} for row in rows]
    try:
        return pa.Table.from_pylist(full)
    except (pa.ArrowException, TypeError, ValueError):
        return pd.DataFrame(full, columns=names, dtype=object)


def result_columns(result: Any) -> dict[str, Any]:
    """The columns one result adds to its row."""
    if isinstance(result, LLMResponse):
        columns = {
            "text": str(result),
            "via": result.via,
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cost_usd": result.cost_usd,
            "error": None,
        }
        if result.parsed is not None:
            parsed = result.parsed
            columns["parsed"] = parsed.model_dump(mode="json") if hasattr(parsed, "model_dump") else parsed
        return columns
    if isinstance(result, BaseException):
        return {**dict.fromkeys(LLM_COLUMNS), "error": describe(result)}
    if isinstance(result, dict):
        return dict(result)
    return {"result": result}


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _length(value: Any) -> str:
    try:
        return str(len(value))
    except TypeError:
        return "no length"
