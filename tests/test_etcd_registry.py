"""What only the etcd backend does, against a real etcd.

tests/test_registry.py holds the contract both backends share; here are
the optimistic transactions retrying when another client commits first,
heartbeat leases, etcd being unreachable, and prefixes sharing one etcd.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ctl.registry import (
    EpochConflictError,
    InsufficientCapacityError,
    InUseError,
    NotFoundError,
    RegistryUnavailableError,
    open_registry,
)
from ctl.registry.etcd import EtcdRegistry
from ctl.registry.model import Extent, Replica, Server, Volume
from tests.etcd_process import EtcdProcess, free_port

MiB = 1 << 20


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for the module; each test keeps to a prefix of its own."""
    with EtcdProcess(tmp_path_factory.mktemp("etcd")) as process:
        yield process


@pytest.fixture
def url(etcd: EtcdProcess, request: pytest.FixtureRequest) -> str:
    """This test's registry URL: the shared etcd, under the test's name."""
    return f"{etcd.url}/{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)}"


def open_etcd(url: str) -> EtcdRegistry:
    registry = open_registry(url)
    assert isinstance(registry, EtcdRegistry)
    return registry


def server(name: str, capacity: int = 64 * MiB) -> Server:
    return Server(
        name=name,
        control_url=f"http://127.0.0.1:1/{name}",
        nbd_address="127.0.0.1:10809",
        capacity=capacity,
        slab_size=MiB,
    )


def volume(name: str, size: int, servers: list[str]) -> Volume:
    """One extent of ``size`` with a replica on each of ``servers``."""
    replicas = [Replica(server=s) for s in servers]
    return Volume(
        name=name,
        size=size,
        replicas=len(servers),
        stripe_unit=MiB,
        extents=[Extent(index=0, size=size, replicas=replicas)],
    )


def before_first_commit(
    monkeypatch: pytest.MonkeyPatch,
    registry: EtcdRegistry,
    action: Callable[[], object],
) -> list[bool]:
    """Run ``action`` (another client's change) between ``registry``'s first
    read and its first commit; return the outcome of every commit it makes."""
    outcomes: list[bool] = []
    commit = registry._commit

    def interleaved(compares: list[dict[str, Any]], ops: list[dict[str, Any]]) -> bool:
        if not outcomes:
            action()
        outcomes.append(commit(compares, ops))
        return outcomes[-1]

    monkeypatch.setattr(registry, "_commit", interleaved)
    return outcomes


def raw_get(etcd: EtcdProcess, key: str) -> dict[str, Any] | None:
    """A key's value as JSON, read over etcd's gateway without our client."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        etcd.client_url + "/v3/kv/range", data=body, method="POST"
    )
    with opener.open(request, timeout=5) as response:
        kvs = json.loads(response.read()).get("kvs", [])
    if not kvs:
        return None
    return dict(json.loads(base64.b64decode(kvs[0]["value"])))


# Conflicts: the other client commits between our read and our commit.


def test_a_conflicting_create_is_redone_on_fresh_reservations(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_etcd(url), open_etcd(url)
    first.add_server(server("ms1"))
    outcomes = before_first_commit(
        monkeypatch,
        first,
        lambda: second.create_volume(volume("other", 32 * MiB, ["ms1"])),
    )

    first.create_volume(volume("mine", 16 * MiB, ["ms1"]))

    assert outcomes == [False, True]
    # Both reservations count: the retry added to what the other client
    # committed instead of writing back the 0 it had read.
    assert second.get_server("ms1").reserved == 48 * MiB
    assert [v.name for v in second.list_volumes()] == ["mine", "other"]


def test_a_retry_checks_the_room_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_etcd(url), open_etcd(url)
    first.add_server(server("ms1"))
    outcomes = before_first_commit(
        monkeypatch,
        first,
        lambda: second.create_volume(volume("other", 56 * MiB, ["ms1"])),
    )

    with pytest.raises(InsufficientCapacityError) as refused:
        first.create_volume(volume("mine", 16 * MiB, ["ms1"]))

    # The first read saw 64 MiB free; only the retry saw the 8 MiB left.
    assert outcomes == [False]
    assert "ms1 is short by 8 MiB (has 8 MiB free, needs 16 MiB)" in str(refused.value)
    assert refused.value.missing == {"ms1": 8 * MiB}
    assert second.get_server("ms1").reserved == 56 * MiB
    with pytest.raises(NotFoundError):
        second.get_volume("mine")


def test_a_retry_checks_the_epoch_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_etcd(url), open_etcd(url)
    for name in ("ms1", "ms2", "ms3"):
        first.add_server(server(name))
    created = first.create_volume(volume("vol", 8 * MiB, ["ms1", "ms2"]))
    ours = volume("vol", 8 * MiB, ["ms1", "ms3"])
    theirs = volume("vol", 8 * MiB, ["ms2", "ms3"])
    outcomes = before_first_commit(
        monkeypatch, first, lambda: second.update_volume(theirs, created.epoch)
    )

    with pytest.raises(EpochConflictError, match="epoch 2, expected 1"):
        first.update_volume(ours, created.epoch)

    assert outcomes == [False]
    stored = second.get_volume("vol")
    assert stored.epoch == 2
    assert [r.server for r in stored.extents[0].replicas] == ["ms2", "ms3"]
    reserved = {s.name: s.reserved for s in second.list_servers()}
    assert reserved == {"ms1": 0, "ms2": 8 * MiB, "ms3": 8 * MiB}


def test_a_heartbeat_touch_does_not_undo_a_reservation(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_etcd(url), open_etcd(url)
    first.add_server(server("ms1"))
    created = first.create_volume(volume("vol", 8 * MiB, ["ms1"]))
    # touch_server rewrites the whole server record: it must retry on top of
    # the reservation a delete gives back, not write the stale one.
    outcomes = before_first_commit(
        monkeypatch, first, lambda: second.delete_volume(created.name)
    )

    first.touch_server("ms1", 1234.5)

    assert outcomes == [False, True]
    stored = second.get_server("ms1")
    assert (stored.reserved, stored.last_seen) == (0, 1234.5)


def test_remove_server_sees_a_volume_created_meanwhile(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = open_etcd(url), open_etcd(url)
    first.add_server(server("ms1"))
    # An empty extent reserves nothing, so ms1's own record does not change:
    # only the check that no volume appeared since the scan can catch it.
    outcomes = before_first_commit(
        monkeypatch,
        first,
        lambda: second.create_volume(volume("late", 0, ["ms1"])),
    )

    with pytest.raises(InUseError, match="late"):
        first.remove_server("ms1")

    assert outcomes == [False]
    assert second.get_server("ms1").reserved == 0


def test_endless_conflicts_give_up_with_a_clear_error(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_etcd(url)
    first.max_attempts = 3
    second = open_etcd(url)
    first.add_server(server("ms1"))
    commit = first._commit
    touches = iter(range(1, 100))

    def always_beaten(
        compares: list[dict[str, Any]], ops: list[dict[str, Any]]
    ) -> bool:
        second.touch_server("ms1", float(next(touches)))
        return commit(compares, ops)

    monkeypatch.setattr(first, "_commit", always_beaten)

    with pytest.raises(RegistryUnavailableError) as gave_up:
        first.create_volume(volume("vol", 8 * MiB, ["ms1"]))

    message = str(gave_up.value)
    assert "could not create volume vol" in message
    assert "3 attempts" in message
    assert second.get_server("ms1").reserved == 0
    assert second.list_volumes() == []


def test_parallel_creates_from_many_clients_never_over_reserve(url: str) -> None:
    setup = open_etcd(url)
    setup.add_server(server("ms1"))
    setup.add_server(server("ms2"))
    # Each volume takes 16 MiB on both servers: four fit, ten try at once.
    clients = 10
    start = threading.Barrier(clients)
    outcomes: dict[str, str] = {}

    def create(name: str) -> None:
        registry = open_etcd(url)
        start.wait()
        try:
            registry.create_volume(volume(name, 16 * MiB, ["ms1", "ms2"]))
            outcomes[name] = "created"
        except InsufficientCapacityError:
            outcomes[name] = "refused"

    threads = [threading.Thread(target=create, args=(f"v{i}",)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(outcomes) == clients, outcomes
    created = sorted(name for name, result in outcomes.items() if result == "created")
    assert len(created) == 4, outcomes
    assert [v.name for v in setup.list_volumes()] == created
    assert [s.reserved for s in setup.list_servers()] == [64 * MiB, 64 * MiB]


# Liveness through leases.


def test_a_heartbeat_lives_while_kept_alive_and_expires_after(url: str) -> None:
    registry = open_etcd(url)
    registry.add_server(server("ms1"))
    registry.add_server(server("ms2"))
    ttl = 2  # etcd's minimum on a single node
    lease = registry.heartbeat("ms1", ttl)
    assert registry.alive_servers() == {"ms1"}

    # Twice the ttl, renewed every half second: the key must stay.
    renewed_until = time.monotonic() + 2 * ttl
    while time.monotonic() < renewed_until:
        assert registry.keepalive(lease) >= ttl
        assert registry.alive_servers() == {"ms1"}
        time.sleep(0.5)

    # Without renewals etcd deletes the key by itself.
    stopped = time.monotonic()
    while registry.alive_servers() and time.monotonic() < stopped + 10:
        time.sleep(0.2)
    gone_after = time.monotonic() - stopped
    assert registry.alive_servers() == set()
    assert gone_after >= ttl - 0.5, f"expired after {gone_after:.1f} s"
    with pytest.raises(NotFoundError, match="call heartbeat again"):
        registry.keepalive(lease)
    # The lease only ever held liveness: the server's record stays.
    assert [s.name for s in registry.list_servers()] == ["ms1", "ms2"]


def test_stop_heartbeat_removes_the_alive_key_at_once(url: str) -> None:
    registry = open_etcd(url)
    leases = {name: registry.heartbeat(name, 30) for name in ("ms1", "ms2")}
    assert registry.alive_servers() == {"ms1", "ms2"}

    registry.stop_heartbeat(leases["ms1"])

    assert registry.alive_servers() == {"ms2"}
    registry.stop_heartbeat(leases["ms1"])  # gone already: not an error
    registry.stop_heartbeat(leases["ms2"])
    assert registry.alive_servers() == set()


def test_heartbeat_refuses_a_ttl_below_one_second(url: str) -> None:
    registry = open_etcd(url)
    with pytest.raises(ValueError, match="ttl"):
        registry.heartbeat("ms1", 0)
    assert registry.alive_servers() == set()


# etcd out of reach.


def test_nothing_listening_names_the_address_and_what_to_check() -> None:
    port = free_port()
    registry = open_registry(f"etcd://127.0.0.1:{port}")

    with pytest.raises(RegistryUnavailableError) as unreachable:
        registry.list_servers()

    message = str(unreachable.value)
    assert f"etcd at 127.0.0.1:{port} is unreachable" in message
    assert "--listen-client-urls" in message
    assert "RAMPOOL_REGISTRY" in message


def test_etcd_dying_under_a_client_is_reported(tmp_path: Path) -> None:
    with EtcdProcess(tmp_path) as etcd:
        registry = open_registry(etcd.url)
        registry.add_server(server("ms1"))
        etcd.kill()

        with pytest.raises(RegistryUnavailableError, match="is unreachable"):
            registry.get_server("ms1")
        with pytest.raises(RegistryUnavailableError, match="is unreachable"):
            registry.create_volume(volume("vol", MiB, ["ms1"]))


def test_a_web_server_that_is_not_etcd_is_recognised() -> None:
    class NotEtcd(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>no such page</html>")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), NotEtcd) as web:
        thread = threading.Thread(target=web.serve_forever, daemon=True)
        thread.start()
        try:
            registry = open_registry(f"etcd://127.0.0.1:{web.server_address[1]}")
            with pytest.raises(RegistryUnavailableError, match="is it etcd's client"):
                registry.list_volumes()
        finally:
            web.shutdown()


# Prefixes.


def test_prefixes_keep_pools_apart(etcd: EtcdProcess) -> None:
    # "/pool-a" is a string prefix of "/pool-ab": only the "/" after the
    # prefix in every key keeps them apart.
    a = open_registry(etcd.url + "/pool-a")
    ab = open_registry(etcd.url + "/pool-ab")
    assert isinstance(a, EtcdRegistry)
    assert isinstance(ab, EtcdRegistry)
    a.add_server(server("ms1", capacity=64 * MiB))
    ab.add_server(server("ms1", capacity=32 * MiB))
    a.create_volume(volume("vol", 16 * MiB, ["ms1"]))
    a.heartbeat("ms1", 30)

    assert [(s.name, s.capacity, s.reserved) for s in ab.list_servers()] == [
        ("ms1", 32 * MiB, 0)
    ]
    assert ab.list_volumes() == []
    assert ab.alive_servers() == set()
    with pytest.raises(NotFoundError):
        ab.get_volume("vol")
    # a's volume on its own ms1 does not hold ab's ms1.
    ab.remove_server("ms1")
    assert ab.list_servers() == []
    assert a.get_server("ms1").reserved == 16 * MiB
    assert a.alive_servers() == {"ms1"}


def test_records_are_json_of_to_dict_under_the_prefix(etcd: EtcdProcess) -> None:
    registry = open_registry(etcd.url)  # no path: the default prefix
    assert registry.url == etcd.url + "/rampool"
    stored = registry.add_server(server("layout-ms"))
    created = registry.create_volume(volume("layout-vol", 2 * MiB, ["layout-ms"]))

    held = replace(stored, reserved=2 * MiB)
    assert raw_get(etcd, "/rampool/servers/layout-ms") == held.to_dict()
    assert raw_get(etcd, "/rampool/volumes/layout-vol") == created.to_dict()

    root = open_registry(etcd.url + "/")
    assert root.url == etcd.url + "/"
    root.add_server(server("top"))
    assert raw_get(etcd, "/servers/top") == server("top").to_dict()
