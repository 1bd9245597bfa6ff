"""The ``rampool`` command line.

One typer group per noun: ``memserver`` (the daemon that contributes a
host's RAM), ``server`` (memservers in the pool), ``volume``, ``pool``; and
``demo``.
"""

from __future__ import annotations

import os

import typer

from ctl import pool, servers, volumes
from ctl.registry import DEFAULT_REGISTRY, REGISTRY_ENV
from memserver import __version__
from memserver.slabs import DEFAULT_SLAB_SIZE, format_size, parse_size

app = typer.Typer(
    name="rampool",
    help="Pool the RAM of many Linux hosts and use it as swap or a RAM disk.",
    no_args_is_help=True,
    add_completion=False,
)
memserver_app = typer.Typer(
    help="Contribute this host's RAM to the pool.", no_args_is_help=True
)
app.add_typer(memserver_app, name="memserver")
app.add_typer(servers.app, name="server")
app.add_typer(volumes.app, name="volume")
app.add_typer(pool.app, name="pool")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise typer.BadParameter(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:10809)")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise typer.BadParameter(f"port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise typer.BadParameter(f"port {number} is out of range 0-65535")
    return host, number


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rampool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    registry: str | None = typer.Option(
        None,
        "--registry",
        envvar=REGISTRY_ENV,
        help=f"sqlite:///PATH or etcd://HOST:PORT (default {DEFAULT_REGISTRY}).",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """rampool: pooled memory for Linux."""
    ctx.ensure_object(dict)
    ctx.obj["registry_url"] = registry


@memserver_app.command("run")
def memserver_run(
    size: str = typer.Option(
        ..., "--size", help="RAM to contribute, e.g. 4G or 512M (whole slabs)."
    ),
    listen: str = typer.Option(
        "127.0.0.1:10809", "--listen", help="HOST:PORT for NBD clients."
    ),
    control: str = typer.Option(
        "127.0.0.1:10810", "--control", help="HOST:PORT of the HTTP control API."
    ),
    unix_socket: str | None = typer.Option(
        None, "--socket", help="Also serve NBD on this unix socket path."
    ),
    zone: str | None = typer.Option(
        None, "--zone", help="Failure-domain label (rack, room) for placement."
    ),
    slab_size: str = typer.Option(
        format_size(DEFAULT_SLAB_SIZE).replace(" ", ""),
        "--slab-size",
        help="Allocation unit of the arena (power of two, at least 2M).",
    ),
    workers: int = typer.Option(
        os.cpu_count() or 1, "--workers", min=1, help="NBD worker processes."
    ),
    no_mlock: bool = typer.Option(
        False,
        "--no-mlock",
        help="Do not lock the arena in RAM (it may then be swapped: unsafe for swap).",
    ),
    min_block_size: int = typer.Option(
        1,
        "--min-block-size",
        help="Refuse requests not aligned to this (power of two; 1 accepts all).",
    ),
    allow_list: bool = typer.Option(
        False,
        "--allow-list",
        help="Let NBD_OPT_LIST reveal export names (they are access keys).",
    ),
    max_connections: int = typer.Option(
        1024, "--max-connections", min=1, help="NBD connections at once, in all."
    ),
    handshake_timeout: float = typer.Option(
        10.0,
        "--handshake-timeout",
        min=0.1,
        help="Seconds a client may take to finish the handshake.",
    ),
    log_level: str = typer.Option(
        "INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."
    ),
) -> None:
    """Serve this host's RAM as NBD exports (foreground; stop with SIGTERM)."""
    from memserver.daemon import MemserverConfig
    from memserver.main import run

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise typer.BadParameter(
            "must be DEBUG, INFO, WARNING or ERROR", param_hint="--log-level"
        )
    try:
        config = MemserverConfig(
            size=_size(size),
            listen=_address(listen),
            control=_address(control),
            unix_socket=unix_socket,
            zone=zone,
            slab_size=_size(slab_size),
            workers=workers,
            lock=not no_mlock,
            min_block=min_block_size,
            allow_list=allow_list,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            log_level=level,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    raise typer.Exit(run(config))


@app.command("demo")
def demo_command(
    keep: bool = typer.Option(
        False, "--keep", help="Keep the memserver serving until Ctrl-C."
    ),
) -> None:
    """Start a memserver on loopback, make an export, check it with libnbd."""
    from ctl.demo import demo

    demo(keep)


def main() -> None:
    app()
