"""``rampool pool``: the pool as a whole."""

from __future__ import annotations

import typer

from ctl import render
from ctl.clicontext import open_from_context
from ctl.volumes import describe

app = typer.Typer(help="The pool as a whole.", no_args_is_help=True)


@app.command("status")
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Servers, capacity used and free, volumes, degraded extents."""
    with render.reported_errors():
        registry = open_from_context(ctx)
        servers = registry.list_servers()
        volumes = registry.list_volumes()
    by_name = {s.name: s for s in servers}
    described = [describe(v, by_name) for v in volumes]
    summary = {
        "servers": len(servers),
        "servers_by_state": {
            state: sum(s.state == state for s in servers)
            for state in sorted({s.state for s in servers})
        },
        "capacity_bytes": sum(s.capacity for s in servers),
        "reserved_bytes": sum(s.reserved for s in servers),
        "free_bytes": sum(s.free for s in servers),
        "volumes": len(volumes),
        "degraded_extents": sum(v["degraded_extents"] for v in described),
        "rebuilds": 0,  # TODO(#3): rebuilds are reported once the plugin runs them
    }
    if as_json:
        render.print_json(summary)
        return
    render.print_table(
        "pool",
        ["servers", "capacity", "reserved", "free", "volumes", "degraded extents"],
        [
            [
                summary["servers"],
                render.size(summary["capacity_bytes"]),
                render.size(summary["reserved_bytes"]),
                render.size(summary["free_bytes"]),
                summary["volumes"],
                summary["degraded_extents"],
            ]
        ],
    )
