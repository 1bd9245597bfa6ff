"""Provisioning: turning registry decisions into exports on memservers.

The order of every operation keeps the registry the truth about memory:

- create: place, reserve in the registry (atomic: racing creates never both
  get the last space), make the exports, then record them (epoch 2).  A
  failure on the way deletes the exports made so far and the reservation.
- delete: delete the exports, then the volume's record (which gives its
  space back).  A memserver that is unreachable lost its RAM with it, or will
  drop the export when it comes back empty; that is logged, not fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ctl.memserver_client import MemserverAPIError, MemserverClient
from ctl.placement import default_extent_count, layout_extents, place
from ctl.registry import InUseError, Registry
from ctl.registry.model import (
    REPLICA_CURRENT,
    VOLUME_CREATING,
    VOLUME_READY,
    Extent,
    Replica,
    Server,
    Volume,
)

log = logging.getLogger(__name__)

DEFAULT_STRIPE_UNIT = 1024 * 1024
MAX_REPLICAS = 3

ClientFactory = Callable[[Server], MemserverClient]


class ProvisionError(Exception):
    """A volume could not be provisioned; nothing it took is left behind."""


def memserver_client(server: Server) -> MemserverClient:
    return MemserverClient(server.control_url)


def nbd_uri(server: Server, export: str) -> str:
    return f"nbd://{server.nbd_address}/{export}"


def export_label(volume: str, extent: int, replica: int) -> str:
    return f"{volume}/e{extent}/r{replica}"


def create_volume(
    registry: Registry,
    name: str,
    size: int,
    *,
    replicas: int = 1,
    stripe_unit: int = DEFAULT_STRIPE_UNIT,
    extents: int | None = None,
    client: ClientFactory = memserver_client,
) -> Volume:
    """Place, reserve and allocate a volume; return it as recorded (ready)."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1 to {MAX_REPLICAS}, not {replicas}")
    servers = registry.list_servers()
    count = extents or default_extent_count(size, stripe_unit, replicas, servers)
    sizes = layout_extents(size, stripe_unit, count)
    placement = place(sizes, replicas, servers)
    volume = Volume(
        name=name,
        size=size,
        replicas=replicas,
        stripe_unit=stripe_unit,
        extents=[
            Extent(i, extent_size, [Replica(server) for server in chosen])
            for i, (extent_size, chosen) in enumerate(
                zip(sizes, placement, strict=True)
            )
        ],
        state=VOLUME_CREATING,
        created=time.time(),
    )
    volume = registry.create_volume(volume)
    by_name = {s.name: s for s in servers}
    made: list[tuple[Server, str]] = []
    try:
        for extent in volume.extents:
            for i, replica in enumerate(extent.replicas):
                server = by_name[replica.server]
                export = client(server).create_export(
                    extent.size, export_label(name, extent.index, i)
                )
                made.append((server, export["name"]))
                replica.export = export["name"]
                replica.state = REPLICA_CURRENT
        epoch = volume.epoch
        volume.state = VOLUME_READY
        volume = registry.update_volume(volume, epoch)
    except Exception as e:
        _delete_exports(made, client)
        registry.delete_volume(name)
        if isinstance(e, MemserverAPIError):
            raise ProvisionError(
                f"volume {name} not created: {e}; nothing was kept"
            ) from e
        raise
    log.info(
        "volume created volume=%s size=%d replicas=%d extents=%d epoch=%d",
        name,
        size,
        replicas,
        len(volume.extents),
        volume.epoch,
    )
    return volume


def delete_volume(
    registry: Registry, name: str, *, client: ClientFactory = memserver_client
) -> Volume:
    """Delete a volume's exports, then its record."""
    volume = registry.get_volume(name)
    if volume.attached_to:
        # The registry checks again, atomically, when the record goes.
        raise InUseError(
            f"volume {name} is attached to {volume.attached_to}; detach it first"
        )
    servers = {s.name: s for s in registry.list_servers()}
    exports = [
        (servers[r.server], r.export)
        for extent in volume.extents
        for r in extent.replicas
        if r.export and r.server in servers
    ]
    _delete_exports(exports, client)
    deleted = registry.delete_volume(name)
    log.info("volume deleted volume=%s exports=%d", name, len(exports))
    return deleted


def _delete_exports(exports: list[tuple[Server, str]], client: ClientFactory) -> None:
    for server, export in exports:
        try:
            client(server).delete_export(export)
        except MemserverAPIError as e:
            if e.status == 404:
                continue  # already gone (the memserver restarted empty)
            log.warning(
                "could not delete export server=%s export=%s error=%s; a "
                "restarted memserver will not have it",
                server.name,
                export[:8],
                e,
            )
