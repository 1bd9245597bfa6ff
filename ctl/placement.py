"""Where a volume's bytes live: striping arithmetic and replica placement.

A volume is cut into stripe units; stripe ``s`` belongs to extent ``s % N``,
at offset ``(s // N) * stripe_unit`` inside it.  :func:`layout_extents` sizes
the extents, :func:`map_range` turns a volume byte range into pieces of
extents (the plugin calls it on every request), and :func:`place` picks the
memservers that hold each extent's replicas.

Placement rules, in order of strength:

1. The replicas of one extent are on distinct active servers.
2. When the active servers span at least as many zones as there are replicas,
   the replicas of one extent are also in distinct zones.  A server without a
   zone label is a zone of its own.
3. Among the servers that satisfy 1 and 2 and have room, two are drawn at
   random and the one with more free space wins ("power of two choices"): the
   pool fills evenly without every placement piling onto the single emptiest
   server.

Power of two choices can paint itself into a corner on a nearly full pool
(it may spend a server that a later extent needed).  When it does, placement
starts over taking, each time, the failure domain that can still hold the
most extents of that size; with extents of one size that choice finds a
placement whenever one exists.

Everything here is pure: no I/O and no registry calls.  The caller reserves
the space it was given through the registry, which settles races.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ctl.registry.errors import InsufficientCapacityError
from ctl.registry.model import SERVER_ACTIVE, Server, reserved_bytes
from memserver.slabs import format_size

log = logging.getLogger(__name__)

#: Sizes and stripe units are whole pages; smaller units would split the
#: kernel's block I/O across extents for no gain.
MIN_STRIPE_UNIT = 4096
VOLUME_ALIGNMENT = 4096

#: How many servers or zones an error message names before summarising.
_MAX_LISTED = 8


# Striping arithmetic.


def layout_extents(size: int, stripe_unit: int, extents: int) -> list[int]:
    """Size in bytes of each extent of a volume striped over ``extents``.

    Every extent is a whole number of stripe units.  When the stripes do not
    divide evenly, the first extents get one unit more; a last partial stripe
    (``size`` not a multiple of ``stripe_unit``) still takes a whole unit.

    Raises ValueError for a size that is not a positive multiple of 4096, a
    stripe unit that is not a power of two of at least 4096, or an extent
    count below 1 or above the number of stripe units.
    """
    stripes = _stripe_count(size, stripe_unit)
    if extents < 1:
        raise ValueError(f"a volume needs at least 1 extent, not {extents}")
    if extents > stripes:
        raise ValueError(
            f"a {format_size(size)} volume has only {_count(stripes, 'stripe unit')} "
            f"of {format_size(stripe_unit)}, too few for {extents} extents: use at "
            f"most {stripes} extents or a smaller stripe unit"
        )
    rows, extra = divmod(stripes, extents)
    return [(rows + (index < extra)) * stripe_unit for index in range(extents)]


def map_range(
    offset: int, length: int, stripe_unit: int, extents: int
) -> list[tuple[int, int, int, int]]:
    """Split a volume byte range into pieces of extents, in volume order.

    Each piece is ``(extent_index, extent_offset, length, volume_offset)``.
    A range touching k stripes gives k pieces (one, if the volume has a single
    extent, where consecutive stripes are contiguous).  The range is not
    checked against the volume's size: nbdkit refuses requests past the end
    before they reach the plugin.  An empty range gives no pieces.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"bad range: offset {offset}, length {length}")
    if stripe_unit < 1 or stripe_unit & (stripe_unit - 1):
        raise ValueError(f"stripe unit {stripe_unit} is not a power of two")
    if extents < 1:
        raise ValueError(f"a volume needs at least 1 extent, not {extents}")

    if extents == 1:
        return [(0, offset, length, offset)] if length else []

    pieces = []
    end = offset + length
    position = offset
    while position < end:
        stripe, within = divmod(position, stripe_unit)
        row, extent = divmod(stripe, extents)
        take = min(stripe_unit - within, end - position)
        pieces.append((extent, row * stripe_unit + within, take, position))
        position += take
    return pieces


def default_extent_count(
    size: int, stripe_unit: int, replicas: int, servers: Sequence[Server]
) -> int:
    """How many extents to stripe a new volume over when the operator did not say.

    One extent per group of ``replicas`` active servers, so that a pool of
    6 servers holds a 2-replica volume as 3 extents that can all be busy at
    once; at least 1, and never more than the volume has stripe units.
    """
    stripes = _stripe_count(size, stripe_unit)
    _check_replicas(replicas)
    active = sum(1 for server in servers if server.state == SERVER_ACTIVE)
    return min(max(1, active // replicas), stripes)


def _stripe_count(size: int, stripe_unit: int) -> int:
    if size <= 0 or size % VOLUME_ALIGNMENT:
        raise ValueError(
            f"volume size {size} is not a positive multiple of {VOLUME_ALIGNMENT} "
            "bytes: round it up to a whole number of 4 KiB pages"
        )
    if stripe_unit < MIN_STRIPE_UNIT or stripe_unit & (stripe_unit - 1):
        raise ValueError(
            f"stripe unit {stripe_unit} is not a power of two of at least "
            f"{MIN_STRIPE_UNIT} bytes (e.g. 65536 for 64 KiB)"
        )
    return -(-size // stripe_unit)


def _check_replicas(replicas: int) -> None:
    if replicas < 1:
        raise ValueError(f"a volume needs at least 1 replica, not {replicas}")


# Placement.


def place(
    extent_sizes: Sequence[int],
    replicas: int,
    servers: Sequence[Server],
    rng: random.Random | None = None,
) -> list[list[str]]:
    """Choose the servers for each replica of each extent.

    Returns, for each extent in order, the names of ``replicas`` distinct
    active servers (distinct zones too, when the active servers span enough
    zones; see the module's docstring).  Space that earlier extents of this
    call take is counted against later ones; nothing is reserved.  Given a
    seeded ``rng`` the answer is deterministic.

    Raises ValueError for bad arguments, and InsufficientCapacityError when
    the extents do not fit.  Its ``missing`` maps each active server that is
    short of room for the first extent that did not fit to the bytes it
    lacks (any of them gaining that much, or a new server, lets that extent
    fit); it is empty when there are too few active servers whatever their
    space.
    """
    _check_replicas(replicas)
    if not extent_sizes:
        raise ValueError("a volume needs at least 1 extent, none were given")
    for size in extent_sizes:
        if size <= 0:
            raise ValueError(f"extent size {size} is not positive")
    repeated = sorted(
        name for name, count in Counter(s.name for s in servers).items() if count > 1
    )
    if repeated:
        raise ValueError(
            f"server names must be unique; repeated: {', '.join(repeated)}"
        )

    active = sorted(
        (server for server in servers if server.state == SERVER_ACTIVE),
        key=lambda server: server.name,
    )
    if len(active) < replicas:
        inactive = [
            f"{server.name} is {server.state}"
            for server in sorted(servers, key=lambda server: server.name)
            if server.state != SERVER_ACTIVE
        ]
        raise InsufficientCapacityError(
            _too_few_servers_message(replicas, len(active), inactive)
        )
    pool = _Pool.of(active, replicas)

    try:
        chosen = pool.assign(extent_sizes, _TwoChoices(rng or random.Random()))
    except _ExtentDoesNotFit:
        log.debug(
            "placement two_choices=failed extents=%d replicas=%d retry=most_room",
            len(extent_sizes),
            replicas,
        )
    else:
        log.debug(
            "placement extents=%d replicas=%d by_zone=%s",
            len(extent_sizes),
            replicas,
            pool.by_zone,
        )
        return chosen

    try:
        return pool.assign(extent_sizes, _MostRoom())
    except _ExtentDoesNotFit as short:
        raise InsufficientCapacityError(short.message(), short.missing()) from None


def _too_few_servers_message(replicas: int, active: int, inactive: list[str]) -> str:
    have = "none is active" if active == 0 else f"only {active} {_be(active)} active"
    if replicas == 1:
        message = f"a replica needs an active server but {have}"
    else:
        message = f"replicas must be on {replicas} distinct servers but {have}"
    if inactive:
        message += f" ({_listing(inactive)})"
    return message + "; add memservers or ask for fewer replicas"


@dataclass
class _Pool:
    """The active servers and the failure domain each belongs to."""

    servers: list[Server]
    replicas: int
    by_zone: bool
    domain: dict[str, str]  # server name -> failure domain

    @classmethod
    def of(cls, active: list[Server], replicas: int) -> _Pool:
        # A server without a zone is a zone of its own; "\0" keeps its key
        # from ever equalling a zone label.
        zones = {
            server.name: server.zone if server.zone is not None else "\0" + server.name
            for server in active
        }
        labelled = any(server.zone is not None for server in active)
        by_zone = labelled and replicas > 1 and len(set(zones.values())) >= replicas
        domain = zones if by_zone else {server.name: server.name for server in active}
        return cls(active, replicas, by_zone, domain)

    def assign(self, extent_sizes: Sequence[int], chooser: _Chooser) -> list[list[str]]:
        taken = {server.name: 0 for server in self.servers}
        placement = []
        for index, size in enumerate(extent_sizes):
            chosen: list[Server] = []
            domains: set[str] = set()
            for _ in range(self.replicas):
                candidates = [
                    server
                    for server in self.servers
                    if self.domain[server.name] not in domains
                    and _left(server, taken) >= reserved_bytes(size, server.slab_size)
                ]
                if not candidates:
                    raise _ExtentDoesNotFit(self, extent_sizes, index, taken)
                server = chooser.choose(candidates, size, taken, self)
                chosen.append(server)
                domains.add(self.domain[server.name])
            # Charged only once the extent is whole, so that a failure is
            # explained with the space there was before this extent.
            for server in chosen:
                taken[server.name] += reserved_bytes(size, server.slab_size)
            placement.append([server.name for server in chosen])
        return placement


def _left(server: Server, taken: dict[str, int]) -> int:
    return server.free - taken[server.name]


class _Chooser(Protocol):
    def choose(
        self, candidates: list[Server], size: int, taken: dict[str, int], pool: _Pool
    ) -> Server: ...


class _TwoChoices(_Chooser):
    """Draw two candidates at random; keep the one with more space left."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(
        self, candidates: list[Server], size: int, taken: dict[str, int], pool: _Pool
    ) -> Server:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.rng.sample(candidates, 2)
        return second if _left(second, taken) > _left(first, taken) else first


class _MostRoom(_Chooser):
    """Take the domain with room for the most further extents of this size.

    A domain can hold each extent at most once, so spending the roomiest
    first is what keeps later extents placeable when space is tight.
    """

    def choose(
        self, candidates: list[Server], size: int, taken: dict[str, int], pool: _Pool
    ) -> Server:
        room: dict[str, int] = {}
        for server in pool.servers:
            fits = max(0, _left(server, taken)) // reserved_bytes(
                size, server.slab_size
            )
            domain = pool.domain[server.name]
            room[domain] = room.get(domain, 0) + fits
        # Ties go to the first candidate by name: candidates come sorted.
        return max(
            candidates,
            key=lambda s: (room[pool.domain[s.name]], _left(s, taken)),
        )


class _ExtentDoesNotFit(Exception):
    """An extent found no room; says where space is short and by how much."""

    def __init__(
        self,
        pool: _Pool,
        extent_sizes: Sequence[int],
        index: int,
        taken: dict[str, int],
    ) -> None:
        super().__init__(index)
        self.pool = pool
        self.count = len(extent_sizes)
        self.index = index
        self.size = extent_sizes[index]
        self.left = {server.name: _left(server, taken) for server in pool.servers}
        self.need = {
            server.name: reserved_bytes(self.size, server.slab_size)
            for server in pool.servers
        }
        self.zone = {server.name: server.zone for server in pool.servers}
        self.fitting = sorted(n for n in self.left if self.left[n] >= self.need[n])
        # Greedy choice never fails while enough domains have room, so this
        # extent failed because too few do; a server short of room matters
        # only if no other server of its domain has room.
        self.roomy_domains = {pool.domain[n] for n in self.fitting}
        self.short = sorted(
            n for n in self.left if pool.domain[n] not in self.roomy_domains
        )

    def missing(self) -> dict[str, int]:
        return {name: self.need[name] - self.left[name] for name in self.short}

    def message(self) -> str:
        if self.count == 1:
            what = f"a {format_size(self.size)} extent"
        else:
            what = f"extent {self.index} of {self.count} ({format_size(self.size)})"
        if self.pool.by_zone:
            what += f" in {self.pool.replicas} distinct zones"

        after = ""
        if self.index == 1:
            after = "after extent 0, "
        elif self.index > 1:
            after = f"after extents 0-{self.index - 1}, "

        needs = set(self.need.values())
        room = f"{format_size(needs.pop())} free" if len(needs) == 1 else "room for it"
        if self.pool.by_zone:
            have = f"{_only(len(self.roomy_domains), 'zone')} a server with"
            advice = "add a memserver in another zone or free space in one of these"
        else:
            have = _only(len(self.fitting), "active server")
            advice = (
                "add a memserver, free space on one of these, or use fewer replicas"
            )

        fits = [f"{self._label(n)}: {format_size(self.left[n])}" for n in self.fitting]
        shorts = [
            f"{self._label(n)} has {format_size(self.left[n])} free, short by "
            f"{format_size(self.need[n] - self.left[n])}"
            for n in self.short
        ]
        details = "; ".join(
            part for part in (_listing(fits, ", "), _listing(shorts, "; ")) if part
        )
        return (
            f"cannot place {_count(self.pool.replicas, 'replica')} of {what}: "
            f"{after}{have} {room} ({details}); {advice}"
        )

    def _label(self, name: str) -> str:
        if not self.pool.by_zone:
            return name
        zone = self.zone[name]
        return f"{name} (no zone)" if zone is None else f"{name} (zone {zone})"


# Wording.


def _listing(items: list[str], separator: str = ", ") -> str:
    if len(items) <= _MAX_LISTED:
        return separator.join(items)
    rest = len(items) - _MAX_LISTED
    return separator.join(items[:_MAX_LISTED]) + f" and {rest} more"


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _count(count: int, noun: str) -> str:
    return f"{count} {_plural(count, noun)}"


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _only(count: int, noun: str) -> str:
    """ "only 2 zones have", "only 1 zone has", "no zone has"."""
    if count == 0:
        return f"no {noun} has"
    return f"only {_count(count, noun)} {'has' if count == 1 else 'have'}"
