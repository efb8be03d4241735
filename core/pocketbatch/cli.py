"""The `pocketbatch` command. A configuration error is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys
from importlib import metadata

import click
from rich.console import Console
from rich.table import Table

from . import registry
from .errors import ConfigError, PocketBatchError
from .plugins import DEFAULT_PLUGINS, distributions, load_errors, load_plugins, pm


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
                "plugin": dist.metadata["Name"] if dist else entry.plugin,
                "version": dist.version if dist else metadata.version("pocketbatch"),
                "default_model": p.default_model,
                "models": list(p.models),
                "aliases": list(entry.aliases),
                "key_env_var": p.key_env_var,
                "key": registry.key_status(p),
                "batch": p.batch is not None,
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
    rows += [{"name": name, "error": why} for name, why in load_errors.items()]
    click.echo(json.dumps(rows, indent=2))


@cli.command()
def demo() -> None:
    """Run the seed example (parallel summaries) on the offline provider; no key needed."""
    from .demo import run

    run()


def main() -> None:
    try:
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
