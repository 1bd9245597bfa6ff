"""``rampool server``: the memservers the pool may place data on."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import typer

from ctl import render
from ctl.clicontext import open_from_context
from ctl.memserver_client import MemserverAPIError, MemserverClient
from ctl.registry import Registry
from ctl.registry.model import SERVER_DRAINING, Server

app = typer.Typer(help="Register and watch memservers.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts.")


def _server_from_health(
    control_url: str, health: dict[str, Any], name: str | None, zone: str | None
) -> Server:
    nbd_host, _, nbd_port = health["nbd"].rpartition(":")
    if nbd_host in ("0.0.0.0", "::", "[::]"):
        # Listening everywhere: clients reach it where we reached its API.
        nbd_host = urlsplit(control_url).hostname or nbd_host
    nbd_address = f"{nbd_host}:{nbd_port}"
    slabs = health["slabs"]
    return Server(
        name=name or nbd_address,
        control_url=control_url.rstrip("/"),
        nbd_address=nbd_address,
        capacity=slabs["total"] * slabs["size"],
        slab_size=slabs["size"],
        zone=zone if zone is not None else health.get("zone"),
        last_seen=time.time(),
    )


def _volumes_on(registry: Registry, name: str) -> list[str]:
    return [volume.name for volume in registry.list_volumes() if volume.uses(name)]


@app.command("add")
def add(
    ctx: typer.Context,
    control_url: str = typer.Argument(
        ..., help="The memserver's control API, e.g. http://10.0.0.5:10810"
    ),
    name: str | None = typer.Option(
        None, "--name", help="Name in the pool (default: its NBD host:port)."
    ),
    zone: str | None = typer.Option(
        None, "--zone", help="Failure domain (default: the memserver's --zone)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a running memserver to the pool (it is asked for its capacity)."""
    if not control_url.startswith(("http://", "https://")):
        raise typer.BadParameter(
            "give the control API's URL, e.g. http://10.0.0.5:10810",
            param_hint="CONTROL_URL",
        )
    with render.reported_errors():
        health = MemserverClient(control_url).health()
        server = _server_from_health(control_url, health, name, zone)
        registry = open_from_context(ctx)
        registry.add_server(server)
    if as_json:
        render.print_json(server.to_dict())
        return
    render.stdout.print(
        f"added server {server.name}: {render.size(server.capacity)} in "
        f"{server.capacity // server.slab_size} slabs, zone {server.zone or '-'}, "
        f"NBD at {server.nbd_address}"
    )


@app.command("list")
def list_servers(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List the pool's memservers."""
    with render.reported_errors():
        servers = open_from_context(ctx).list_servers()
    if as_json:
        render.print_json([s.to_dict() for s in servers])
        return
    render.print_table(
        "servers",
        ["name", "zone", "state", "capacity", "reserved", "free", "nbd", "control"],
        [
            [
                s.name,
                s.zone or "-",
                s.state,
                render.size(s.capacity),
                render.size(s.reserved),
                render.size(s.free),
                s.nbd_address,
                s.control_url,
            ]
            for s in servers
        ],
    )


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The server's name in the pool."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one memserver: its record, its volumes and its live health."""
    with render.reported_errors():
        registry = open_from_context(ctx)
        server = registry.get_server(name)
        volumes = _volumes_on(registry, name)
    try:
        health: dict[str, Any] | None = MemserverClient(server.control_url).health()
        reachable = None
    except MemserverAPIError as e:
        health, reachable = None, str(e)
    if as_json:
        render.print_json(
            {
                **server.to_dict(),
                "volumes": volumes,
                "health": health,
                "unreachable": reachable,
            }
        )
        return
    render.print_table(
        f"server {server.name}",
        ["field", "value"],
        [
            ["control", server.control_url],
            ["nbd", server.nbd_address],
            ["zone", server.zone or "-"],
            ["state", server.state],
            ["capacity", render.size(server.capacity)],
            ["reserved", render.size(server.reserved)],
            ["free", render.size(server.free)],
            ["volumes", ", ".join(volumes) or "-"],
            [
                "health",
                health["status"] if health else f"unreachable: {reachable}",
            ],
        ],
    )


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The server's name in the pool."),
) -> None:
    """Forget a memserver; refused while it holds any volume's data."""
    with render.reported_errors():
        open_from_context(ctx).remove_server(name)
    render.stdout.print(f"removed server {name}")


@app.command("drain")
def drain(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The server's name in the pool."),
) -> None:
    """Stop placing data on a memserver and move its replicas elsewhere."""
    from ctl.drain import drain_server

    with render.reported_errors():
        registry = open_from_context(ctx)
        registry.set_server_state(name, SERVER_DRAINING)
        moved = drain_server(registry, name)
    render.stdout.print(
        f"drained server {name}: {moved} replica(s) moved; it takes no new data"
    )
