"""The registry contract, run against both backends.

Every test taking ``registry`` (or ``registry_address``) runs twice: on a
SQLite file in the test's directory, and on a real etcd (Debian's
etcd-server, started once for the session) under a key prefix of its own.
The concurrency tests race real processes, each with its own connection.
Tests named ``test_sqlite_*`` cover what only the SQLite file has: its path,
its schema, its connections.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.registry import (
    DEFAULT_REGISTRY,
    REGISTRY_ENV,
    AlreadyExistsError,
    EpochConflictError,
    InsufficientCapacityError,
    InUseError,
    NotFoundError,
    Registry,
    RegistryUnavailableError,
    open_registry,
    registry_url,
)
from ctl.registry.model import (
    REPLICA_CURRENT,
    REPLICA_STALE,
    SERVER_ACTIVE,
    SERVER_DRAINING,
    VOLUME_READY,
    Extent,
    Replica,
    Server,
    Volume,
)
from ctl.registry.sqlite import SCHEMA_VERSION, SQLiteRegistry

MiB = 1 << 20
SLAB = 16 * MiB
RACERS = 8


# Fixtures.


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real etcd for the session; tests keep apart by key prefix."""
    from tests.etcd_process import EtcdProcess

    process = EtcdProcess(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def registry_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty registry of each backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'registry.db'}"
    etcd = request.getfixturevalue("etcd")
    return f"{etcd.url}/test-{uuid.uuid4().hex}"


@pytest.fixture
def registry(registry_address: str, tmp_path: Path) -> Iterator[Registry]:
    """An empty registry of each backend, closed afterwards."""
    if registry_address.startswith("sqlite:"):
        opened: Registry = SQLiteRegistry(str(tmp_path / "registry.db"))
    else:
        opened = open_registry(registry_address)
    try:
        yield opened
    finally:
        opened.close()


# Records.


def make_server(
    name: str, capacity: int = 256 * MiB, *, slab: int = SLAB, zone: str | None = None
) -> Server:
    return Server(
        name=name,
        control_url=f"http://127.0.0.1:9000/{name}",
        nbd_address="127.0.0.1:10809",
        capacity=capacity,
        slab_size=slab,
        zone=zone,
    )


def make_volume(name: str, *extents: tuple[int, list[str]]) -> Volume:
    """A volume whose extents are (size, servers holding a replica)."""
    return Volume(
        name=name,
        size=sum(size for size, _ in extents),
        replicas=len(extents[0][1]) if extents else 1,
        stripe_unit=MiB,
        extents=[
            Extent(index, size, [Replica(server) for server in servers])
            for index, (size, servers) in enumerate(extents)
        ],
    )


def add_servers(registry: Registry, *servers: Server) -> None:
    for server in servers:
        registry.add_server(server)


def reserved(registry: Registry) -> dict[str, int]:
    return {server.name: server.reserved for server in registry.list_servers()}


def assert_accounting_consistent(registry: Registry) -> None:
    """Each server's ``reserved`` is what its stored volumes take, within capacity."""
    servers = {server.name: server for server in registry.list_servers()}
    expected = dict.fromkeys(servers, 0)
    for volume in registry.list_volumes():
        for name, size in volume.reservations(servers).items():
            expected[name] += size
    assert reserved(registry) == expected
    for server in servers.values():
        assert 0 <= server.reserved <= server.capacity, server


# Servers.


def test_add_server_starts_with_nothing_reserved(registry: Registry) -> None:
    given = make_server("ms1", zone="rack-a")
    given.reserved = 64 * MiB
    given.last_seen = 12.5

    stored = registry.add_server(given)

    assert stored.reserved == 0
    assert registry.get_server("ms1") == stored
    assert stored.to_dict() == {**given.to_dict(), "reserved": 0}


def test_add_server_twice_is_refused(registry: Registry) -> None:
    registry.add_server(make_server("ms1", 128 * MiB))

    with pytest.raises(AlreadyExistsError, match="ms1"):
        registry.add_server(make_server("ms1", 512 * MiB))

    assert registry.get_server("ms1").capacity == 128 * MiB


def test_get_unknown_server(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="ms9"):
        registry.get_server("ms9")


def test_list_servers_sorted_by_name(registry: Registry) -> None:
    assert registry.list_servers() == []
    add_servers(registry, make_server("ms3"), make_server("ms1"), make_server("ms2"))

    assert [server.name for server in registry.list_servers()] == ["ms1", "ms2", "ms3"]


def test_set_server_state(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))

    changed = registry.set_server_state("ms1", SERVER_DRAINING)
    assert changed.state == SERVER_DRAINING
    assert registry.get_server("ms1").state == SERVER_DRAINING

    registry.set_server_state("ms1", SERVER_ACTIVE)
    assert registry.get_server("ms1").state == SERVER_ACTIVE


def test_set_state_of_unknown_server(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="ms9"):
        registry.set_server_state("ms9", SERVER_DRAINING)


def test_set_server_state_rejects_unknown_states(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))

    with pytest.raises(ValueError, match="sleeping"):
        registry.set_server_state("ms1", "sleeping")

    assert registry.get_server("ms1").state == SERVER_ACTIVE


def test_touch_server_records_last_seen(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))

    registry.touch_server("ms1", 1_700_000_000.25)

    assert registry.get_server("ms1").last_seen == 1_700_000_000.25


def test_touch_unknown_server(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="ms9"):
        registry.touch_server("ms9", 1.0)


def test_remove_server(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))

    registry.remove_server("ms1")

    assert [server.name for server in registry.list_servers()] == ["ms2"]
    with pytest.raises(NotFoundError, match="ms1"):
        registry.get_server("ms1")
    with pytest.raises(NotFoundError, match="ms1"):
        registry.remove_server("ms1")


def test_remove_server_refused_while_it_holds_replicas(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"), make_server("ms3"))
    registry.create_volume(make_volume("alpha", (SLAB, ["ms1", "ms2"])))
    registry.create_volume(make_volume("beta", (SLAB, ["ms3"]), (SLAB, ["ms1"])))

    with pytest.raises(InUseError) as refused:
        registry.remove_server("ms1")

    assert "alpha" in str(refused.value)
    assert "beta" in str(refused.value)
    assert registry.get_server("ms1").reserved == 2 * SLAB

    registry.delete_volume("alpha")
    with pytest.raises(InUseError, match="beta") as refused:
        registry.remove_server("ms1")
    assert "alpha" not in str(refused.value)

    registry.delete_volume("beta")
    registry.remove_server("ms1")
    assert [server.name for server in registry.list_servers()] == ["ms2", "ms3"]


# Creating volumes.


def test_create_volume_reserves_every_replica(registry: Registry) -> None:
    add_servers(
        registry,
        make_server("ms1"),
        make_server("ms2", slab=4 * MiB),
        make_server("ms3"),
    )
    # 10 MiB takes a whole 16 MiB slab on ms1 and ms3, three 4 MiB slabs on ms2.
    volume = make_volume("data", (10 * MiB, ["ms1", "ms2"]), (10 * MiB, ["ms2", "ms3"]))
    volume.created = 1_700_000_000.5
    volume.extents[0].replicas[0].export = "e-1f2e"
    volume.extents[0].replicas[0].state = REPLICA_CURRENT

    stored = registry.create_volume(volume)

    assert stored.epoch == 1
    assert stored.to_dict() == {**volume.to_dict(), "epoch": 1}
    assert registry.get_volume("data") == stored
    assert reserved(registry) == {"ms1": 16 * MiB, "ms2": 24 * MiB, "ms3": 16 * MiB}
    assert_accounting_consistent(registry)


def test_create_volume_with_a_taken_name(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    registry.create_volume(make_volume("data", (SLAB, ["ms1"])))

    with pytest.raises(AlreadyExistsError, match="data"):
        registry.create_volume(make_volume("data", (SLAB, ["ms2"])))

    assert reserved(registry) == {"ms1": SLAB, "ms2": 0}
    assert registry.get_volume("data").extents[0].replicas[0].server == "ms1"


def test_create_volume_on_an_unknown_server(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))

    with pytest.raises(NotFoundError, match="ms7"):
        registry.create_volume(make_volume("data", (SLAB, ["ms1", "ms7"])))

    assert reserved(registry) == {"ms1": 0}
    assert registry.list_volumes() == []


def test_create_volume_on_a_draining_server(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    registry.set_server_state("ms2", SERVER_DRAINING)

    with pytest.raises(InsufficientCapacityError, match="ms2") as refused:
        registry.create_volume(make_volume("data", (SLAB, ["ms1", "ms2"])))

    assert "draining" in str(refused.value)
    assert set(refused.value.missing) == {"ms2"}
    assert reserved(registry) == {"ms1": 0, "ms2": 0}
    assert registry.list_volumes() == []


def test_create_volume_on_a_short_server_takes_nothing(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2", 64 * MiB))
    registry.create_volume(make_volume("filler", (48 * MiB, ["ms2"])))

    with pytest.raises(InsufficientCapacityError) as refused:
        registry.create_volume(make_volume("data", (48 * MiB, ["ms1", "ms2"])))

    message = str(refused.value)
    assert "ms2 is short by 32 MiB (has 16 MiB free, needs 48 MiB)" in message
    assert "ms1" not in message
    assert refused.value.missing == {"ms2": 32 * MiB}
    assert reserved(registry) == {"ms1": 0, "ms2": 48 * MiB}
    assert [volume.name for volume in registry.list_volumes()] == ["filler"]
    assert_accounting_consistent(registry)


def test_create_volume_names_every_short_server(registry: Registry) -> None:
    add_servers(
        registry,
        make_server("ms1", 32 * MiB),
        make_server("ms2"),
        make_server("ms3", 16 * MiB),
    )

    with pytest.raises(InsufficientCapacityError) as refused:
        registry.create_volume(
            make_volume("data", (64 * MiB, ["ms1", "ms2"]), (32 * MiB, ["ms2", "ms3"]))
        )

    message = str(refused.value)
    assert "ms1 is short by 32 MiB" in message
    assert "ms3 is short by 16 MiB" in message
    assert refused.value.missing == {"ms1": 32 * MiB, "ms3": 16 * MiB}
    assert reserved(registry) == {"ms1": 0, "ms2": 0, "ms3": 0}


def test_a_volume_may_fill_a_server_exactly(registry: Registry) -> None:
    registry.add_server(make_server("ms1", 64 * MiB))

    registry.create_volume(make_volume("all", (64 * MiB, ["ms1"])))

    assert registry.get_server("ms1").free == 0
    with pytest.raises(InsufficientCapacityError, match="ms1"):
        registry.create_volume(make_volume("more", (1, ["ms1"])))


# Reading volumes.


def test_get_unknown_volume(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="nothing"):
        registry.get_volume("nothing")


def test_list_volumes_sorted_by_name(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))
    assert registry.list_volumes() == []
    for name in ("gamma", "alpha", "beta"):
        registry.create_volume(make_volume(name, (MiB, ["ms1"])))

    volumes = registry.list_volumes()

    assert [volume.name for volume in volumes] == ["alpha", "beta", "gamma"]
    assert all(volume.epoch == 1 for volume in volumes)


# Updating volumes.


def test_update_volume_bumps_the_epoch(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))
    stored.state = VOLUME_READY
    stored.extents[0].replicas[0].export = "e-0a1b"
    stored.extents[0].replicas[0].state = REPLICA_CURRENT

    updated = registry.update_volume(stored, expected_epoch=1)

    assert updated.epoch == 2
    assert updated.to_dict() == {**stored.to_dict(), "epoch": 2}
    assert registry.get_volume("data") == updated
    assert reserved(registry) == {"ms1": SLAB}


def test_update_volume_with_a_stale_epoch(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))
    first = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))
    mine = Volume.from_dict(first.to_dict())
    theirs = Volume.from_dict(first.to_dict())
    theirs.attached_to = "host-a"
    registry.update_volume(theirs, expected_epoch=1)

    mine.attached_to = "host-b"
    with pytest.raises(EpochConflictError, match="data"):
        registry.update_volume(mine, expected_epoch=1)

    stored = registry.get_volume("data")
    assert (stored.epoch, stored.attached_to) == (2, "host-a")


def test_update_unknown_volume(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))

    with pytest.raises(NotFoundError, match="ghost"):
        registry.update_volume(make_volume("ghost", (SLAB, ["ms1"])), expected_epoch=1)

    assert registry.list_volumes() == []
    assert reserved(registry) == {"ms1": 0}


def test_update_volume_adding_a_replica_reserves(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))

    stored.extents[0].replicas.append(Replica("ms2"))
    registry.update_volume(stored, expected_epoch=1)

    assert reserved(registry) == {"ms1": SLAB, "ms2": SLAB}
    assert_accounting_consistent(registry)


def test_update_volume_removing_a_replica_releases(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    stored = registry.create_volume(make_volume("data", (2 * SLAB, ["ms1", "ms2"])))

    stored.extents[0].replicas = [
        r for r in stored.extents[0].replicas if r.server == "ms2"
    ]
    registry.update_volume(stored, expected_epoch=1)

    assert reserved(registry) == {"ms1": 0, "ms2": 2 * SLAB}
    assert_accounting_consistent(registry)


def test_update_volume_on_a_full_server_changes_nothing(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2", 32 * MiB))
    registry.create_volume(make_volume("filler", (32 * MiB, ["ms2"])))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))
    before = stored.to_dict()

    stored.extents[0].replicas.append(Replica("ms2"))
    with pytest.raises(InsufficientCapacityError) as refused:
        registry.update_volume(stored, expected_epoch=1)

    assert "ms2 is short by 16 MiB" in str(refused.value)
    assert refused.value.missing == {"ms2": SLAB}
    assert registry.get_volume("data").to_dict() == before
    assert reserved(registry) == {"ms1": SLAB, "ms2": 32 * MiB}


def test_update_volume_moving_a_replica_gives_back_and_takes(
    registry: Registry,
) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"), make_server("ms3"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1", "ms2"])))
    registry.set_server_state("ms1", SERVER_DRAINING)

    stored.extents[0].replicas[0] = Replica("ms3")
    moved = registry.update_volume(stored, expected_epoch=1)

    assert moved.epoch == 2
    assert reserved(registry) == {"ms1": 0, "ms2": SLAB, "ms3": SLAB}
    assert_accounting_consistent(registry)


def test_update_volume_keeps_replicas_on_a_draining_server(registry: Registry) -> None:
    # A draining server takes nothing new, but the volumes it already holds
    # must still change (a replica marked stale, a volume attached).
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1", "ms2"])))
    registry.set_server_state("ms1", SERVER_DRAINING)

    stored.extents[0].replicas[0].state = REPLICA_STALE
    stored.attached_to = "host-a"
    updated = registry.update_volume(stored, expected_epoch=1)
    assert updated.epoch == 2

    updated.extents.append(Extent(1, SLAB, [Replica("ms1")]))
    with pytest.raises(InsufficientCapacityError, match="ms1"):
        registry.update_volume(updated, expected_epoch=2)

    assert registry.get_volume("data").epoch == 2
    assert reserved(registry) == {"ms1": SLAB, "ms2": SLAB}


def test_update_volume_onto_an_unknown_server(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))

    stored.extents[0].replicas.append(Replica("ms7"))
    with pytest.raises(NotFoundError, match="ms7"):
        registry.update_volume(stored, expected_epoch=1)

    assert registry.get_volume("data").epoch == 1
    assert reserved(registry) == {"ms1": SLAB}


# Deleting volumes.


def test_delete_volume_gives_the_space_back(registry: Registry) -> None:
    add_servers(registry, make_server("ms1"), make_server("ms2"))
    created = registry.create_volume(make_volume("data", (SLAB, ["ms1", "ms2"])))
    registry.create_volume(make_volume("other", (SLAB, ["ms2"])))

    deleted = registry.delete_volume("data")

    assert deleted == created
    assert [volume.name for volume in registry.list_volumes()] == ["other"]
    assert reserved(registry) == {"ms1": 0, "ms2": SLAB}
    with pytest.raises(NotFoundError, match="data"):
        registry.get_volume("data")
    with pytest.raises(NotFoundError, match="data"):
        registry.delete_volume("data")


def test_delete_volume_refused_while_attached(registry: Registry) -> None:
    registry.add_server(make_server("ms1"))
    stored = registry.create_volume(make_volume("data", (SLAB, ["ms1"])))
    stored.attached_to = "host-a"
    attached = registry.update_volume(stored, expected_epoch=1)

    with pytest.raises(InUseError, match="host-a"):
        registry.delete_volume("data")
    assert registry.get_volume("data") == attached
    assert reserved(registry) == {"ms1": SLAB}

    attached.attached_to = None
    registry.update_volume(attached, expected_epoch=2)
    registry.delete_volume("data")
    assert registry.list_volumes() == []
    assert reserved(registry) == {"ms1": 0}


# Concurrency: real processes, each with its own connection to the registry.


def _racer(
    url: str,
    index: int,
    action: str,
    volume: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    """One racing process: open the registry, wait for every racer, act once.

    Puts (index, outcome, message, missing) on ``results``; the outcome is
    "ok" or the name of the exception raised.
    """
    try:
        registry = open_registry(url)
    except Exception as e:
        barrier.abort()
        results.put((index, type(e).__name__, str(e), {}))
        return
    try:
        barrier.wait(timeout=60)
        if action == "create":
            registry.create_volume(Volume.from_dict(volume))
        else:
            registry.update_volume(Volume.from_dict(volume), expected_epoch=1)
    except InsufficientCapacityError as e:
        results.put((index, type(e).__name__, str(e), e.missing))
    except Exception as e:
        results.put((index, type(e).__name__, str(e), {}))
    else:
        results.put((index, "ok", "", {}))
    finally:
        registry.close()


def race(
    url: str, action: str, volumes: list[Volume]
) -> dict[int, tuple[str, str, dict[str, int]]]:
    """Run one racing process per volume; return what each got, by index."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(volumes))
    results = context.Queue()
    processes = [
        context.Process(
            target=_racer,
            args=(url, index, action, volume.to_dict(), barrier, results),
        )
        for index, volume in enumerate(volumes)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = {}
        for _ in processes:
            index, outcome, message, missing = results.get(timeout=90)
            outcomes[index] = (outcome, message, missing)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.exitcode is None:
                process.kill()
    assert [process.exitcode for process in processes] == [0] * len(processes)
    return outcomes


def test_racing_creates_never_overallocate(
    registry: Registry, registry_address: str
) -> None:
    # Each racer wants 16 MiB on ms1, 32 MiB on ms2 and 16 MiB on ms3.  ms2,
    # with 112 MiB free, has room for 3 of them and ms1 (64 MiB) for 4: so
    # exactly 3 fit, whatever the order, and each of the 5 others finds ms2
    # with 16 MiB left.
    add_servers(
        registry,
        make_server("ms1", 512 * MiB),
        make_server("ms2", 512 * MiB),
        make_server("ms3", 512 * MiB),
    )
    registry.create_volume(
        make_volume(
            "filler", (448 * MiB, ["ms1"]), (400 * MiB, ["ms2"]), (256 * MiB, ["ms3"])
        )
    )
    # Extents of 8 MiB each take a whole 16 MiB slab.
    racers = [
        make_volume(f"race-{i}", (8 * MiB, ["ms1", "ms2"]), (8 * MiB, ["ms2", "ms3"]))
        for i in range(RACERS)
    ]

    outcomes = race(registry_address, "create", racers)

    created = sorted(i for i, (outcome, _, _) in outcomes.items() if outcome == "ok")
    refused = {i: o for i, o in outcomes.items() if i not in created}
    assert len(created) == 3, outcomes
    for outcome, message, missing in refused.values():
        assert outcome == "InsufficientCapacityError", message
        assert missing == {"ms2": 16 * MiB}, message
        assert "ms2 is short by 16 MiB (has 16 MiB free, needs 32 MiB)" in message
    assert [volume.name for volume in registry.list_volumes()] == [
        "filler",
        *(f"race-{i}" for i in created),
    ]
    assert reserved(registry) == {
        "ms1": 448 * MiB + 3 * SLAB,
        "ms2": 400 * MiB + 6 * SLAB,
        "ms3": 256 * MiB + 3 * SLAB,
    }
    assert_accounting_consistent(registry)


def test_racing_updates_of_one_epoch_let_one_win(
    registry: Registry, registry_address: str
) -> None:
    # Every racer read epoch 1 and adds a replica on a server of its own:
    # one update wins, and only its server has space reserved.
    add_servers(registry, *(make_server(f"ms{i}") for i in range(RACERS)))
    base = registry.create_volume(make_volume("data", (SLAB, [])))
    racers = []
    for i in range(RACERS):
        mine = Volume.from_dict(base.to_dict())
        mine.extents[0].replicas.append(Replica(f"ms{i}"))
        mine.attached_to = f"host-{i}"
        racers.append(mine)

    outcomes = race(registry_address, "update", racers)

    winners = [i for i, (outcome, _, _) in outcomes.items() if outcome == "ok"]
    assert len(winners) == 1, outcomes
    (winner,) = winners
    losers = {outcome for i, (outcome, _, _) in outcomes.items() if i != winner}
    assert losers == {"EpochConflictError"}, outcomes
    stored = registry.get_volume("data")
    assert stored.epoch == 2
    assert stored.attached_to == f"host-{winner}"
    assert reserved(registry) == {
        f"ms{i}": SLAB if i == winner else 0 for i in range(RACERS)
    }
    assert_accounting_consistent(registry)


# Choosing and opening a registry.


def test_registry_url_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REGISTRY_ENV, "sqlite:///from/env.db")

    assert registry_url("etcd://10.0.0.1:2379") == "etcd://10.0.0.1:2379"


def test_registry_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REGISTRY_ENV, "sqlite:///from/env.db")

    assert registry_url(None) == "sqlite:///from/env.db"


def test_registry_url_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)

    assert registry_url(None) == DEFAULT_REGISTRY
    assert DEFAULT_REGISTRY == "sqlite:///var/lib/rampool/registry.db"


def test_open_registry_sqlite_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "registry.db"

    opened = open_registry(f"sqlite://{path}")
    try:
        assert isinstance(opened, SQLiteRegistry)
        assert opened.url == f"sqlite://{path}"
        opened.add_server(make_server("ms1"))
    finally:
        opened.close()

    assert path.is_file()
    again = SQLiteRegistry(str(path))
    try:
        assert [server.name for server in again.list_servers()] == ["ms1"]
    finally:
        again.close()


def test_open_registry_etcd_host_and_port(etcd: Any) -> None:
    from ctl.registry.etcd import EtcdRegistry

    prefix = f"/test-{uuid.uuid4().hex}"
    first = open_registry(etcd.url + prefix)
    second = open_registry(etcd.url + prefix)
    other = open_registry(etcd.url + prefix + "-other")
    try:
        assert isinstance(first, EtcdRegistry)
        first.add_server(make_server("ms1"))
        assert [server.name for server in second.list_servers()] == ["ms1"]
        assert other.list_servers() == []
    finally:
        for opened in (first, second, other):
            opened.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "etcd://127.0.0.1",
        "etcd://:2379",
        "etcd://",
        "etcd://127.0.0.1:port",
        "etcd://127.0.0.1:99999",
        "mysql://127.0.0.1:3306/rampool",
        "/var/lib/rampool/registry.db",
        "",
    ],
)
def test_open_registry_bad_url(url: str) -> None:
    with pytest.raises(RegistryUnavailableError) as refused:
        open_registry(url)

    message = str(refused.value)
    assert "sqlite:///" in message or "etcd://" in message, message


# What only the SQLite file has.


def test_sqlite_file_is_wal_with_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SQLiteRegistry(str(path)).close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_sqlite_keeps_state_across_opens(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.db")
    first = SQLiteRegistry(path)
    first.add_server(make_server("ms1"))
    first.create_volume(make_volume("data", (SLAB, ["ms1"])))
    first.close()

    second = SQLiteRegistry(path)
    try:
        assert second.get_server("ms1").reserved == SLAB
        assert second.get_volume("data").epoch == 1
    finally:
        second.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SQLiteRegistry(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()

    with pytest.raises(RegistryUnavailableError, match=f"schema {SCHEMA_VERSION + 1}"):
        SQLiteRegistry(str(path))


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"not a database, just some bytes\n" * 200)

    with pytest.raises(RegistryUnavailableError, match=str(path)):
        SQLiteRegistry(str(path))


def test_sqlite_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(RegistryUnavailableError) as refused:
        SQLiteRegistry(str(tmp_path / "file" / "registry.db"))

    assert str(tmp_path / "file") in str(refused.value)
    assert "--registry" in str(refused.value)


def test_sqlite_unwritable_directory(tmp_path: Path) -> None:
    # The child drops the capability that lets root write anywhere, so this
    # runs the same as root or as anyone else.
    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o555)
    path = directory / "registry.db"
    program = (
        "import sys\n"
        "from ctl.registry import RegistryUnavailableError\n"
        "from ctl.registry.sqlite import SQLiteRegistry\n"
        "try:\n"
        "    SQLiteRegistry(sys.argv[1])\n"
        "except RegistryUnavailableError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    drop = "-dac_override,-dac_read_search"

    done = subprocess.run(
        [
            "setpriv",
            f"--inh-caps={drop}",
            f"--bounding-set={drop}",
            "--",
            sys.executable,
            "-c",
            program,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )

    assert done.returncode == 3, done
    assert str(path) in done.stdout
    assert "may write" in done.stdout
    assert not path.exists()


def test_sqlite_from_several_threads(tmp_path: Path) -> None:
    opened = SQLiteRegistry(str(tmp_path / "registry.db"))
    opened.add_server(make_server("ms1", 4 * SLAB))
    errors: list[BaseException] = []

    def create(index: int) -> None:
        try:
            opened.create_volume(make_volume(f"v{index}", (SLAB, ["ms1"])))
        except InsufficientCapacityError:
            pass
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    try:
        assert errors == []
        assert len(opened.list_volumes()) == 4
        assert opened.get_server("ms1").free == 0
        assert_accounting_consistent(opened)
    finally:
        opened.close()


def test_sqlite_in_a_forked_child(tmp_path: Path) -> None:
    # The child must not use the connection it inherited from the parent.
    opened = SQLiteRegistry(str(tmp_path / "registry.db"))
    opened.add_server(make_server("ms1"))

    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            opened.create_volume(make_volume("from-child", (SLAB, ["ms1"])))
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)

    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert [volume.name for volume in opened.list_volumes()] == ["from-child"]
        assert opened.get_server("ms1").reserved == SLAB
    finally:
        opened.close()


def _open_fresh(path: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=60)
    try:
        opened = SQLiteRegistry(path)
        opened.add_server(make_server(f"ms{os.getpid()}"))
        opened.close()
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_sqlite_new_file_opened_by_many_processes_at_once(tmp_path: Path) -> None:
    # Turning a new file to WAL needs it alone for a moment: the processes
    # that lose that race must wait, not fail.
    path = str(tmp_path / "registry.db")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(RACERS)
    results = context.Queue()
    processes = [
        context.Process(target=_open_fresh, args=(path, barrier, results))
        for _ in range(RACERS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=90) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    assert outcomes == ["ok"] * RACERS
    opened = SQLiteRegistry(path)
    try:
        assert len(opened.list_servers()) == RACERS
    finally:
        opened.close()
