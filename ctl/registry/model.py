"""What the registry stores: memservers, volumes, their layouts.

A volume's bytes are striped, ``stripe_unit`` at a time, over its extents;
each extent is held by ``replicas`` exports, one per memserver.  The layout
(which export holds which extent, and whether it is current) changes under an
epoch: every change is a compare-and-swap of the epoch, so a writer that read
an older layout cannot overwrite a newer one.

All records convert to and from plain JSON-ready dicts (``to_dict`` and
``from_dict``); both registry backends store exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ctl.registry.errors import InsufficientCapacityError, InUseError
from memserver.slabs import format_size

# Server states.
SERVER_ACTIVE = "active"  # takes new replicas
SERVER_DRAINING = "draining"  # holds data, takes nothing new
SERVER_STATES = (SERVER_ACTIVE, SERVER_DRAINING)

# Replica states.
REPLICA_BUILDING = "building"  # allocated, being filled; written, never read
REPLICA_CURRENT = "current"  # holds every acknowledged write
REPLICA_STALE = "stale"  # missed a write: never read again until rebuilt
REPLICA_STATES = (REPLICA_BUILDING, REPLICA_CURRENT, REPLICA_STALE)

# Volume states.
VOLUME_CREATING = "creating"  # space reserved, exports being made
VOLUME_READY = "ready"
VOLUME_STATES = (VOLUME_CREATING, VOLUME_READY)


def reserved_bytes(extent_size: int, slab_size: int) -> int:
    """Space an extent takes on a memserver whose slabs are ``slab_size``."""
    return math.ceil(extent_size / slab_size) * slab_size


@dataclass
class Server:
    """A memserver as the registry knows it."""

    name: str
    control_url: str
    nbd_address: str  # host:port that clients connect to
    capacity: int  # bytes of arena, whole slabs
    slab_size: int
    zone: str | None = None
    state: str = SERVER_ACTIVE
    reserved: int = 0  # bytes promised to volumes' replicas
    last_seen: float = 0.0

    @property
    def free(self) -> int:
        return self.capacity - self.reserved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Server:
        return cls(**data)


@dataclass
class Replica:
    """One copy of an extent: an export on a memserver."""

    server: str
    export: str = ""  # the memserver's export name; "" until it exists
    state: str = REPLICA_BUILDING

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replica:
        return cls(**data)


@dataclass
class Extent:
    """A stripe column of a volume and its replicas."""

    index: int
    size: int
    replicas: list[Replica] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "size": self.size,
            "replicas": [r.to_dict() for r in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Extent:
        return cls(
            index=data["index"],
            size=data["size"],
            replicas=[Replica.from_dict(r) for r in data["replicas"]],
        )


@dataclass
class Volume:
    """A block device made of extents striped over memservers."""

    name: str
    size: int
    replicas: int
    stripe_unit: int
    extents: list[Extent] = field(default_factory=list)
    epoch: int = 0
    state: str = VOLUME_CREATING
    attached_to: str | None = None
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extents"] = [e.to_dict() for e in self.extents]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Volume:
        fields = dict(data)
        fields["extents"] = [Extent.from_dict(e) for e in data["extents"]]
        return cls(**fields)

    def uses(self, server: str) -> bool:
        """True if any replica of this volume is on ``server``."""
        return any(
            replica.server == server
            for extent in self.extents
            for replica in extent.replicas
        )

    def reservations(self, servers: dict[str, Server]) -> dict[str, int]:
        """Bytes this volume takes on each server, by server name.

        Every replica counts, whatever its state: a stale replica's export
        still holds memory until it is deleted.
        """
        taken: dict[str, int] = {}
        for extent in self.extents:
            for replica in extent.replicas:
                slab = servers[replica.server].slab_size
                taken[replica.server] = taken.get(replica.server, 0) + reserved_bytes(
                    extent.size, slab
                )
        return taken


def reservation_change(
    volume: str,
    servers: dict[str, Server],
    new: dict[str, int],
    old: dict[str, int],
) -> dict[str, int]:
    """Bytes each server's reservation grows (or shrinks) by going from
    ``old`` to ``new``.

    Raises InsufficientCapacityError, naming every server at fault, if a
    server that takes new space is not active or lacks the room.  A server
    the volume was on already is checked only if it grows, so that a replica
    which stays put is never refused; one new to the volume is checked even
    for nothing, since it takes a new replica.
    """
    change = {name: new.get(name, 0) - old.get(name, 0) for name in new.keys() | old}
    missing: dict[str, int] = {}
    reasons = []
    for name, growth in sorted(change.items()):
        server = servers[name]
        if growth <= 0 and name in old:
            continue
        if server.state != SERVER_ACTIVE:
            missing[name] = growth
            reasons.append(
                f"{name} is {server.state} and takes no new replicas "
                f"(needs {format_size(growth)})"
            )
        elif growth > server.free:
            missing[name] = growth - server.free
            reasons.append(
                f"{name} is short by {format_size(growth - server.free)} "
                f"(has {format_size(server.free)} free, needs {format_size(growth)})"
            )
    if reasons:
        raise InsufficientCapacityError(
            f"not enough free memory for volume {volume!r}: {'; '.join(reasons)}; "
            "add memservers or delete volumes to make room",
            missing,
        )
    return change


def check_server_unused(name: str, volumes: Iterable[Volume]) -> None:
    """Raise InUseError, naming the volumes, if any has a replica on ``name``."""
    users = sorted(volume.name for volume in volumes if volume.uses(name))
    if users:
        raise InUseError(
            f"server {name!r} holds replicas of volumes {', '.join(users)}: "
            "drain it first (rampool server drain)"
        )
