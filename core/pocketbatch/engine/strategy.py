"""The automatic choice: a round's calls to one model go concurrent or to the provider's batch API."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..providers import LLMRequest, Provider, Usage

# What a reply is assumed to cost when the request sets no max_tokens: for the estimate only.
TYPICAL_OUTPUT_TOKENS = 256


@dataclass(frozen=True)
class Decision:
    mode: str  # "concurrent" | "batch"
    reason: str
    requests: int
    concurrent_seconds: float  # the estimate under the current (configured or learned) limits
    concurrent_cost: float | None  # USD, None where the model has no price
    batch_cost: float | None


def estimate_tokens(request: LLMRequest, output_tokens: float = TYPICAL_OUTPUT_TOKENS) -> tuple[int, int]:
    """(input, output) tokens a request is expected to use: about 4 characters a token, and its
    max_tokens or else `output_tokens` (what replies to the model have used so far) for the reply."""
    chars = len(request.system or "") + sum(len(str(m.get("content", ""))) for m in request.messages)
    return chars // 4 + 1, request.max_tokens or round(output_tokens)


def group_tokens(group: list[LLMRequest], output_tokens: float = TYPICAL_OUTPUT_TOKENS) -> tuple[int, int]:
    """estimate_tokens summed over a group: (input, output) tokens."""
    inp = out = 0
    for request in group:
        i, o = estimate_tokens(request, output_tokens)
        inp += i
        out += o
    return inp, out


def choose(
    group: list[LLMRequest],
    provider: Provider,
    settings: Settings,
    *,
    concurrent_seconds: float,
    mode: str | None = None,
    output_tokens: float = TYPICAL_OUTPUT_TOKENS,
    tokens: tuple[int, int] | None = None,
) -> Decision:
    """mode (the node's, else POCKETBATCH_MODE) "concurrent", "batch" or "auto"; the reason says why.
    `tokens`: the group's group_tokens, when the caller has counted them already."""
    mode = mode or settings.mode
    n = len(group)
    inp, out = tokens or group_tokens(group, output_tokens)
    model = group[0].model
    full = _cost(provider, model, inp, out, 1.0)
    factor = provider.batch.price_factor_for(model) if provider.batch else 1.0
    half = _cost(provider, model, inp, out, factor) if provider.batch else None
    head = f"{n:,} request{'s' if n != 1 else ''} to {provider.name}/{model}"
    at = f"concurrent would take {_duration(concurrent_seconds)}" + (f" ({_usd(full)})" if full else "")

    def decide(way: str, why: str) -> Decision:
        return Decision(way, f"{head}; {why}", n, concurrent_seconds, full, half)

    if mode == "concurrent":
        return decide("concurrent", f"mode is concurrent; {at}")
    if provider.batch is None:
        if mode == "batch":
            why = f"mode is batch but {provider.name} has no batch API: running concurrently"
            return decide("concurrent", why)
        return decide("concurrent", f"{provider.name} has no batch API; {at}")
    saving = f"{1 - factor:.0%} cheaper" if factor < 1 else "at no discount"
    saving += f" ({_usd(half)})" if half else ""
    if mode == "batch":
        return decide("batch", f"mode is batch; {at}; using the batch API, {saving}")
    if factor >= 1:  # a batch job would cost as much and take longer
        return decide(
            "concurrent", f"{provider.name} has no batch discount for {model}; {at}: running concurrently"
        )
    if n >= settings.batch_min_items:
        why = f"at least POCKETBATCH_BATCH_MIN_ITEMS={settings.batch_min_items}"
        return decide("batch", f"{at}; {why}: using the batch API, {saving}")
    if concurrent_seconds >= settings.batch_min_seconds:
        why = f"at least POCKETBATCH_BATCH_MIN_SECONDS={settings.batch_min_seconds:g}"
        return decide("batch", f"{at}, {why}: using the batch API, {saving}")
    return decide(
        "concurrent",
        f"{at}, under POCKETBATCH_BATCH_MIN_SECONDS={settings.batch_min_seconds:g} and fewer than "
        f"POCKETBATCH_BATCH_MIN_ITEMS={settings.batch_min_items}: running concurrently",
    )


def _cost(provider: Provider, model: str, inp: int, out: int, factor: float) -> float | None:
    return provider.cost(model, Usage(inp, out), factor)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.1f} min"
    return f"~{seconds / 3600:.1f} h"


def _usd(amount: float | None) -> str:
    return "?" if amount is None else f"~${amount:,.4f}" if amount < 1 else f"~${amount:,.2f}"
