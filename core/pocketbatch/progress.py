"""What a person watching a run sees: a progress bar fed by the engine's events, and the summary after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .engine import events


@contextmanager
def progress(console: Console, total: int) -> Iterator[None]:
    """A bar of items done (with retries, 429 waits and batch jobs) on a terminal; nothing otherwise."""
    if not console.is_terminal:
        yield
        return
    counts = {"done": 0, "failed": 0, "retried": 0, "rate_limited": 0, "batch": 0}
    bar = Progress(
        TextColumn("[bold]pocketbatch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task("run", total=total, detail="")

    def on_event(event: events.Event) -> None:
        if event.kind == events.DONE:
            counts["done"] += 1
            counts["batch"] += event.via == "batch"
        elif event.kind == events.REASKED:  # that answer did not count: its re-ask is on its way
            counts["done"] -= 1
        elif event.kind == events.REJECTED:
            counts["done"] -= 1
            counts["failed"] += 1
        elif event.kind in (events.FAILED, events.RETRIED, events.RATE_LIMITED):
            counts[event.kind] += 1
        else:
            return
        detail = (
            f"{counts['batch']} via batch, {counts['failed']} failed, "
            f"{counts['retried']} retries, {counts['rate_limited']} × 429"
        )
        bar.update(task, completed=counts["done"] + counts["failed"], detail=detail)

    with bar, events.listen(on_event):
        yield


def summary_table(summary: events.Summary, title: str = "pocketbatch run") -> Table:
    via = ", ".join(f"{n} {v}" for v, n in sorted(summary.via.items())) or "-"
    cost = "-" if summary.cost_usd is None else f"${summary.cost_usd:,.4f}"
    cells = {
        "items": str(summary.items),
        "ok": str(summary.ok),
        "failed": str(summary.failed),
        "via": via,
        "tokens in / out": f"{summary.input_tokens:,} / {summary.output_tokens:,}",
        "cost": cost,
        "retries": str(summary.retries),
        "429s": str(summary.rate_limited),
        "time": f"{summary.elapsed:.1f} s",
    }
    table = Table(title=title)
    for header in cells:
        table.add_column(header)
        if header == "retries" and summary.reasks:  # schema answers asked again, in runs that had some
            table.add_column("re-asks")
    row = list(cells.values())
    if summary.reasks:
        row.insert(list(cells).index("retries") + 1, str(summary.reasks))
    table.add_row(*row)
    return table
