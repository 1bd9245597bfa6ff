"""Moving every replica off a memserver (``rampool server drain``).

For each replica on the server: place a new one on another active server
(not one already holding that extent, and in another zone where zones allow),
create its export, copy the extent with nbdcopy from the replica being moved
(it is current and still reachable), then swap the two in the volume's layout
with a compare-and-swap of its epoch, and only then delete the old export.
If the layout changed meanwhile, the new export is deleted and the move is
tried again from a fresh read.

The copy is only safe while nothing writes to the volume: TODO(#3) once
volumes are served by the plugin, a drain must go through its rebuild, which
keeps writes flowing to both replicas during the copy.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from rich.progress import Progress

from ctl.placement import place
from ctl.provision import (
    ClientFactory,
    ProvisionError,
    export_label,
    memserver_client,
    nbd_uri,
)
from ctl.registry import EpochConflictError, Registry
from ctl.registry.model import REPLICA_CURRENT, SERVER_ACTIVE, Replica, Volume

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


def replicas_on(volume: Volume, server: str) -> list[int]:
    """Indexes of the extents of ``volume`` with a replica on ``server``."""
    return [
        extent.index
        for extent in volume.extents
        if any(r.server == server for r in extent.replicas)
    ]


def drain_server(
    registry: Registry,
    name: str,
    *,
    client: ClientFactory = memserver_client,
    show_progress: bool = True,
) -> int:
    """Move every replica off server ``name``; return how many moved."""
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy is None:
        raise ProvisionError("nbdcopy is missing: install libnbd-bin")
    work = [
        (volume.name, index)
        for volume in registry.list_volumes()
        for index in replicas_on(volume, name)
    ]
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"draining {name}", total=len(work))
        for volume_name, index in work:
            _move_replica(registry, volume_name, index, name, nbdcopy, client)
            progress.advance(task)
    log.info("server drained server=%s replicas_moved=%d", name, len(work))
    return len(work)


def _move_replica(
    registry: Registry,
    volume_name: str,
    index: int,
    source_name: str,
    nbdcopy: str,
    client: ClientFactory,
) -> None:
    for _ in range(MAX_ATTEMPTS):
        volume = registry.get_volume(volume_name)
        extent = volume.extents[index]
        servers = {s.name: s for s in registry.list_servers()}
        holders = {r.server for r in extent.replicas}
        taken_zones = {
            servers[r.server].zone
            for r in extent.replicas
            if r.server != source_name and servers[r.server].zone is not None
        }
        candidates = [
            s
            for s in servers.values()
            if s.state == SERVER_ACTIVE and s.name not in holders
        ]
        away = [s for s in candidates if s.zone not in taken_zones]
        (target_name,) = place([extent.size], 1, away or candidates)[0]
        target = servers[target_name]
        position = next(
            i for i, r in enumerate(extent.replicas) if r.server == source_name
        )
        old = extent.replicas[position]
        export = client(target).create_export(
            extent.size, export_label(volume_name, index, position)
        )
        try:
            subprocess.run(
                [
                    nbdcopy,
                    nbd_uri(servers[source_name], old.export),
                    nbd_uri(target, export["name"]),
                ],
                check=True,
                capture_output=True,
                timeout=3600,
            )
            extent.replicas[position] = Replica(
                target_name, export["name"], REPLICA_CURRENT
            )
            registry.update_volume(volume, volume.epoch)
        except EpochConflictError:
            client(target).delete_export(export["name"])
            continue
        except subprocess.CalledProcessError as e:
            client(target).delete_export(export["name"])
            raise ProvisionError(
                f"copying extent {index} of {volume_name} from {source_name} to "
                f"{target_name} failed: {e.stderr.decode(errors='replace').strip()}"
            ) from e
        except BaseException:
            client(target).delete_export(export["name"])
            raise
        client(servers[source_name]).delete_export(old.export)
        log.info(
            "replica moved volume=%s extent=%d from=%s to=%s",
            volume_name,
            index,
            source_name,
            target_name,
        )
        return
    raise ProvisionError(
        f"volume {volume_name} kept changing while extent {index} was moved; "
        "try the drain again"
    )
