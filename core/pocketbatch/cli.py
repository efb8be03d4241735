"""The `pocketbatch` command. A configuration error is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from importlib import metadata

import click
from rich.console import Console
from rich.table import Column, Table

from . import config, registry
from .config import MODES
from .engine import events
from .engine.batch import CancelPolicy, cancel_policy, follow
from .errors import ConfigError, PocketBatchError
from .jobs import OrderedWriter, RunItems, read_items
from .journal import OPEN_STATES, journal
from .plugins import DEFAULT_PLUGINS, distributions, load_errors, load_plugins, pm
from .progress import progress, summary_table


@click.group()
@click.version_option(metadata.version("pocketbatch"), prog_name="pocketbatch")
def cli() -> None:
    """Run PocketFlow-style LLM pipelines through concurrent calls or batch APIs."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def providers(as_json: bool) -> None:
    """List the installed providers, their models, keys and batch support."""
    rows = []
    for entry in registry.registrations():
        p = entry.provider
        dist = distributions.get(entry.plugin)
        rows.append(
            {
                "name": p.name,
                "plugin": dist.metadata["Name"] if dist else _builtin_or(entry.plugin),
                "version": dist.version if dist else metadata.version("pocketbatch"),
                "default_model": p.default_model,
                "models": list(p.models),
                "aliases": list(entry.aliases),
                "key_env_var": p.key_env_var,
                "key": registry.key_status(p),
                "batch": p.batch is not None,
                # USD per million tokens, and the day the plugin's price table was checked
                "prices": {model: list(price) for model, price in p.prices.items()},
                "cache_prices": {model: list(price) for model, price in p.cache_prices.items()},
                "prices_date": p.prices_date,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("provider", "plugin", "models", "key", "batch API")
    for r in rows:
        models = ", ".join(r["models"]) or f"any ({r['default_model']} by default)"
        key = f"{r['key_env_var']} ({r['key']})" if r["key_env_var"] else "not needed"
        table.add_row(r["name"], f"{r['plugin']} {r['version']}", models, key, "yes" if r["batch"] else "no")
    Console().print(table)


def _builtin_or(plugin: str) -> str:
    return "pocketbatch (built in)" if plugin in DEFAULT_PLUGINS else plugin


@cli.command()
def plugins() -> None:
    """List the loaded plugins as JSON: name, version, hooks, and load errors."""
    load_plugins()
    rows = []
    for name, plugin in pm.list_name_plugin():
        if name.startswith("undo-"):
            continue
        dist = distributions.get(name)
        rows.append(
            {
                "name": dist.metadata["Name"] if dist else name,
                "version": dist.version if dist else metadata.version("pocketbatch"),
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or ()),
                "builtin": name in DEFAULT_PLUGINS,
            }
        )
    for name, why in load_errors.items():
        dist = distributions.get(name)
        if dist is None:  # named by POCKETBATCH_LOAD_PLUGINS, not installed
            rows.append({"name": name, "error": why})
        else:  # named as installed (what `pip uninstall` takes), and by its entry point
            rows.append(
                {"name": dist.metadata["Name"], "version": dist.version, "entry_point": name, "error": why}
            )
    click.echo(json.dumps(rows, indent=2))


@cli.command()
@click.argument("input_file", metavar="IN.jsonl", type=click.File("r", encoding="utf-8"))
@click.option(
    "-o",
    "--output",
    "output_file",
    metavar="OUT.jsonl",
    required=True,
    type=click.File("w", encoding="utf-8", lazy=True),
    help="Where results go, one JSON line per input line ('-' for stdout).",
)
@click.option("--model", "-m", help="Model for lines that name none, as provider/model or an alias.")
@click.option(
    "--mode", type=click.Choice(MODES), help="How the calls run (default: POCKETBATCH_MODE, else auto)."
)
@click.option("--system", "-s", help="System prompt for lines that give none.")
@click.option(
    "--fresh", is_flag=True, help="Submit anew instead of reusing journaled batch jobs and results."
)
@click.option(
    "--schema",
    "schema_file",
    metavar="FILE.json",
    type=click.File("r", encoding="utf-8"),
    help="A JSON schema for lines that give none: each answer is validated, its object written as parsed.",
)
def run(input_file, output_file, model, mode, system, fresh, schema_file) -> None:
    """Run every prompt of IN.jsonl and write OUT.jsonl in the same order.

    Each input line is a JSON string or an object {"id", "prompt", "model"?, "system"?, "max_tokens"?,
    "temperature"?, "schema"?}. Exit 0 when every item succeeded, 1 when some failed, 2 on bad input or
    settings.
    """
    if fresh:
        os.environ["POCKETBATCH_REUSE"] = "0"
        config.reload()
    schema = _read_schema(schema_file) if schema_file else None
    items = read_items(input_file, model=model, system=system, schema=schema)
    writer = OrderedWriter(output_file, items)
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    policy = CancelPolicy()
    stopped = asyncio.run(_run(writer, mode, policy, interactive))
    if stopped:
        open_jobs = [j for j in (journal() or _NoJournal()).jobs() if j.state in OPEN_STATES]
        if policy.action == "leave" and open_jobs:
            ids = ", ".join(j.job_id for j in open_jobs)
            click.echo(f"Left batch jobs running: {ids}. Run the same command again to resume;", err=True)
            click.echo(f"  {shlex.join(['pocketbatch', *sys.argv[1:]])}", err=True)
        sys.exit(130)
    sys.exit(1 if writer.failed else 0)


def _read_schema(file) -> dict:
    try:
        schema = json.load(file)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--schema {file.name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"--schema {file.name}: a JSON schema is an object, not {type(schema).__name__}")
    return schema


class _NoJournal:
    def jobs(self):
        return []


async def _run(writer: OrderedWriter, mode: str | None, policy: CancelPolicy, interactive: bool) -> bool:
    """Run the items; True when Ctrl-C stopped the run."""
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopped = False

    def on_interrupt() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        if interactive:
            answer = click.prompt(
                "\nStop. Cancel the provider's batch jobs, or leave them running to resume later?",
                type=click.Choice(["cancel", "leave"]),
                default="leave",
                err=True,
            )
            policy.action = answer
        else:
            policy.action = "leave"
        main.cancel()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    cancel_policy.set(policy)
    console = Console(stderr=True)
    with events.summarize() as summary, progress(console, len(writer.items)):
        try:
            await RunItems(writer, mode).run_async({})
        except asyncio.CancelledError:
            if not stopped:
                raise
    if not stopped:
        console.print(summary_table(summary))
    return stopped


@cli.group()
def batches() -> None:
    """Batch jobs recorded in the journal (POCKETBATCH_JOURNAL)."""


@batches.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def batches_list(as_json: bool) -> None:
    """List journaled batch jobs, newest last."""
    jobs = _journal().jobs()
    if as_json:
        click.echo(json.dumps([_job_dict(j) for j in jobs], indent=2))
        return
    table = Table("provider/model", "requests", "state", "submitted")
    table.columns.insert(0, Column("job", no_wrap=True))  # ids are what people copy
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.submitted_at))
        table.add_row(j.job_id, f"{j.provider}/{j.model}", str(len(j.custom_ids)), j.state, when)
    Console().print(table)


@batches.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def batches_show(job_id: str, as_json: bool) -> None:
    """Show one job: the journal's record and the provider's current status."""
    job = _job(job_id)
    data = _job_dict(job)
    status = asyncio.run(registry.get_provider(job.provider).batch.status(job_id))
    data["provider_status"] = {"state": status.state, "counts": status.counts}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key}: {value}")


@batches.command("cancel")
@click.argument("job_id")
def batches_cancel(job_id: str) -> None:
    """Cancel a job at the provider (its finished lines stay available)."""
    job = _job(job_id)
    asyncio.run(registry.get_provider(job.provider).batch.cancel(job_id))
    _journal().set_state(job_id, "cancelling")
    click.echo(f"cancelling {job_id}")


@batches.command("resume")
@click.argument("job_id")
def batches_resume(job_id: str) -> None:
    """Wait for a job left running and keep its results in the journal for the next run to reuse."""
    job = _job(job_id)
    counts = asyncio.run(follow(job))
    click.echo(f"{job_id}: {json.dumps(counts)}; run the same `pocketbatch run` again to write them out")


@batches.command("prune")
@click.option(
    "--older-than",
    default="30d",
    show_default=True,
    help="Prune rounds last used longer ago than this: a number with s, m, h, d or w (days if none).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be pruned, and delete nothing.")
def batches_prune(older_than: str, dry_run: bool) -> None:
    """Delete ended rounds (their jobs and results) from the journal, and say how much that freed.

    A round with a job the provider may still run or deliver is never pruned."""
    cutoff = time.time() - _duration(older_than)
    store = _journal()
    done = store.prune(cutoff, dry_run=dry_run)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cutoff))
    what = (
        f"{done.rounds:,} round{'s' if done.rounds != 1 else ''} last used before {when} "
        f"({done.jobs:,} job{'s' if done.jobs != 1 else ''}, {done.outcomes:,} results, "
        f"{_bytes(done.records_bytes)} of records)"
    )
    kept = f"; kept {done.kept:,} with jobs still running or undelivered, or in use" if done.kept else ""
    click.echo(f"{'would prune' if dry_run else 'pruned'} {what}{kept}")
    if dry_run:
        click.echo(f"the journal is {_bytes(done.size_before)}: {store.path}")
    else:
        freed = max(0, done.size_before - done.size_after)
        click.echo(f"freed {_bytes(freed)}; the journal is now {_bytes(done.size_after)}: {store.path}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    value, unit = text.strip().lower(), "d"
    if value and value[-1] in _UNITS:
        value, unit = value[:-1], value[-1]
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise click.BadParameter(
            f"{text!r} is not a duration: a number with s, m, h, d or w (30d, 12h)", param_hint="--older-than"
        )
    return number * _UNITS[unit]


def _bytes(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} GB"


def _journal():
    store = journal()
    if store is None:
        raise ConfigError("the journal is off (POCKETBATCH_JOURNAL=off): no batch jobs are recorded")
    return store


def _job(job_id: str):
    job = _journal().job(job_id)
    if job is None:
        raise ConfigError(f"no batch job {job_id!r} in the journal at {_journal().path}")
    return job


def _job_dict(job) -> dict:
    return {
        "job_id": job.job_id,
        "provider": job.provider,
        "model": job.model,
        "requests": len(job.custom_ids),
        "state": job.state,
        "submitted_at": job.submitted_at,
        "ended_at": job.ended_at,
        "counts": job.counts,
        "round": job.round,
    }


@cli.command()
def demo() -> None:
    """Run the seed example (parallel summaries) on the offline provider; no key needed."""
    from .demo import run

    run()


def main() -> None:
    try:
        config.reload()  # every setting checked up front: a bad value stops the command before any call
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except ConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except PocketBatchError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
