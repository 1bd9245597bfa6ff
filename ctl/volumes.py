"""``rampool volume``: block devices made of exports on several memservers."""

from __future__ import annotations

import re
from typing import Any

import typer

from ctl import provision, render
from ctl.clicontext import open_from_context
from ctl.registry.model import REPLICA_CURRENT, Server, Volume
from memserver.slabs import parse_size

app = typer.Typer(help="Create and inspect volumes.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts.")
VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _name(value: str) -> str:
    if not VOLUME_NAME.match(value):
        raise typer.BadParameter(
            "use 1-63 characters: lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def describe(volume: Volume, servers: dict[str, Server]) -> dict[str, Any]:
    """A volume for scripts: every export with its memserver, state and URI."""
    data = volume.to_dict()
    for extent in data["extents"]:
        for replica in extent["replicas"]:
            server = servers.get(replica["server"])
            replica["uri"] = (
                provision.nbd_uri(server, replica["export"])
                if server is not None and replica["export"]
                else None
            )
            replica["zone"] = server.zone if server is not None else None
    data["degraded_extents"] = sum(
        1
        for extent in volume.extents
        if sum(r.state == REPLICA_CURRENT for r in extent.replicas) < volume.replicas
    )
    return data


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., callback=_name, help="The volume's name."),
    size: str = typer.Option(..., "--size", help="Size, e.g. 4G (whole 4 KiB)."),
    replicas: int = typer.Option(
        1, "--replicas", min=1, max=provision.MAX_REPLICAS, help="Copies of each byte."
    ),
    stripe: str = typer.Option(
        "1M", "--stripe", help="Stripe unit (power of two, at least 4K)."
    ),
    extents: int | None = typer.Option(
        None, "--extents", min=1, help="Stripe columns (default: servers/replicas)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a volume: place its replicas, reserve space, make the exports."""
    with render.reported_errors():
        registry = open_from_context(ctx)
        volume = provision.create_volume(
            registry,
            name,
            _size(size),
            replicas=replicas,
            stripe_unit=_size(stripe),
            extents=extents,
        )
        servers = {s.name: s for s in registry.list_servers()}
    if as_json:
        render.print_json(describe(volume, servers))
        return
    render.stdout.print(
        f"created volume {name}: {render.size(volume.size)}, "
        f"{len(volume.extents)} extent(s) x {volume.replicas} replica(s), "
        f"stripe {render.size(volume.stripe_unit)}"
    )


@app.command("list")
def list_volumes(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List volumes."""
    with render.reported_errors():
        registry = open_from_context(ctx)
        volumes = registry.list_volumes()
        servers = {s.name: s for s in registry.list_servers()}
    described = [describe(v, servers) for v in volumes]
    if as_json:
        render.print_json(described)
        return
    render.print_table(
        "volumes",
        ["name", "size", "replicas", "extents", "state", "degraded", "attached"],
        [
            [
                v["name"],
                render.size(v["size"]),
                v["replicas"],
                len(v["extents"]),
                v["state"],
                v["degraded_extents"],
                v["attached_to"] or "-",
            ]
            for v in described
        ],
    )


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The volume's name."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a volume's layout: every export, its memserver, state and NBD URI."""
    with render.reported_errors():
        registry = open_from_context(ctx)
        volume = registry.get_volume(name)
        servers = {s.name: s for s in registry.list_servers()}
    data = describe(volume, servers)
    if as_json:
        render.print_json(data)
        return
    render.stdout.print(
        f"volume {name}: {render.size(volume.size)}, {volume.replicas} replica(s), "
        f"stripe {render.size(volume.stripe_unit)}, epoch {volume.epoch}, "
        f"{volume.state}, attached to {volume.attached_to or 'nothing'}"
    )
    render.print_table(
        "exports",
        ["extent", "size", "server", "zone", "state", "uri"],
        [
            [
                extent["index"],
                render.size(extent["size"]),
                replica["server"],
                replica["zone"] or "-",
                replica["state"],
                replica["uri"] or "-",
            ]
            for extent in data["extents"]
            for replica in extent["replicas"]
        ],
    )


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The volume's name."),
) -> None:
    """Delete a volume and free its memory (refused while attached)."""
    with render.reported_errors():
        provision.delete_volume(open_from_context(ctx), name)
    render.stdout.print(f"deleted volume {name}")
