"""The ``rampool`` control plane commands against real memservers.

Three memservers with 64 MiB each (2 MiB slabs) run for the module; every
test gets its own SQLite registry, and the memservers are emptied between
tests so each starts from a clean pool.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctl.cli import app
from ctl.memserver_client import MemserverClient
from tests.memserver_process import (
    VENV_BIN,
    MemserverProcess,
    client_env,
    read_export,
    write_export,
)

MiB = 1024 * 1024
SERVER_SIZE = 64 * MiB


@pytest.fixture(scope="module")
def memservers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    started = []
    try:
        for zone in ("a", "b", "c"):
            tmp = tmp_path_factory.mktemp(f"ms-{zone}")
            started.append(
                MemserverProcess(
                    tmp,
                    size="64M",
                    workers=1,
                    extra=["--slab-size", "2M", "--zone", zone],
                ).start()
            )
        yield started
    finally:
        for server in started:
            assert server.stop() == 0, server.log


@pytest.fixture
def pool(memservers: list, tmp_path: Path) -> Iterator[tuple[list, str]]:
    """The memservers, emptied, and a fresh registry URL."""
    for server in memservers:
        client = MemserverClient(server.control_url)
        for export in client.list_exports():
            client.delete_export(export["name"])
    yield memservers, f"sqlite:///{tmp_path}/registry.db"


def rampool(registry: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, ["--registry", registry, *args], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def ok(registry: str, *args: str) -> str:
    code, out, err = rampool(registry, *args)
    assert code == 0, (args, out, err)
    return out


def add_all(registry: str, memservers: list) -> None:
    for server in memservers:
        ok(registry, "server", "add", server.control_url)


def exports_on(server: MemserverProcess) -> list[dict]:
    return MemserverClient(server.control_url).list_exports()


# Servers.


def test_server_add_list_show(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    first = memservers[0]
    out = ok(registry, "server", "add", first.control_url, "--name", "ms-a", "--json")
    added = json.loads(out)
    assert added["name"] == "ms-a"
    assert added["capacity"] == SERVER_SIZE
    assert added["slab_size"] == 2 * MiB
    assert added["zone"] == "a"  # from the memserver's --zone
    assert added["nbd_address"] == first.nbd_address
    assert added["reserved"] == 0

    ok(registry, "server", "add", memservers[1].control_url, "--zone", "other")
    listed = json.loads(ok(registry, "server", "list", "--json"))
    assert [s["name"] for s in listed] == sorted(["ms-a", memservers[1].nbd_address])
    assert {s["zone"] for s in listed} == {"a", "other"}
    table = ok(registry, "server", "list")
    assert "ms-a" in table and "64 MiB" in table

    shown = json.loads(ok(registry, "server", "show", "ms-a", "--json"))
    assert shown["health"]["status"] == "ok"
    assert shown["volumes"] == []
    assert "ok" in ok(registry, "server", "show", "ms-a")


def test_server_add_errors(pool: tuple[list, str], tmp_path: Path) -> None:
    memservers, registry = pool
    ok(registry, "server", "add", memservers[0].control_url, "--name", "ms-a")

    code, _, err = rampool(
        registry, "server", "add", memservers[0].control_url, "--name", "ms-a"
    )
    assert code == 1 and "ms-a" in err and "exists" in err

    code, _, err = rampool(registry, "server", "add", "10.0.0.5:10810")
    assert code == 2 and "http://" in err

    code, _, err = rampool(registry, "server", "add", "http://127.0.0.1:9")
    assert code == 1 and "unreachable" in err

    code, _, err = rampool(registry, "server", "show", "nope")
    assert code == 1 and "nope" in err

    code, _, err = rampool("ftp://x", "server", "list")
    assert code == 1 and "sqlite:///" in err


def test_registry_from_environment(pool: tuple[list, str], tmp_path: Path) -> None:
    memservers, registry = pool
    env = {"RAMPOOL_REGISTRY": registry}
    result = CliRunner().invoke(
        app, ["server", "add", memservers[0].control_url, "--name", "env"], env=env
    )
    assert result.exit_code == 0, result.stderr
    assert [
        s["name"] for s in json.loads(ok(registry, "server", "list", "--json"))
    ] == ["env"]


# Volumes.


def test_volume_create_show_list_delete(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    add_all(registry, memservers)
    out = ok(
        registry,
        "volume",
        "create",
        "vol1",
        "--size",
        "24M",
        "--replicas",
        "2",
        "--stripe",
        "1M",
        "--json",
    )
    volume = json.loads(out)
    assert volume["state"] == "ready" and volume["epoch"] == 2
    assert volume["degraded_extents"] == 0
    total = 0
    for extent in volume["extents"]:
        servers = [r["server"] for r in extent["replicas"]]
        zones = [r["zone"] for r in extent["replicas"]]
        assert len(set(servers)) == 2 and len(set(zones)) == 2
        total += extent["size"]
        for replica in extent["replicas"]:
            assert replica["state"] == "current"
            assert replica["uri"].startswith("nbd://")
            size = subprocess.run(
                ["nbdinfo", "--size", replica["uri"]],
                capture_output=True,
                text=True,
                check=True,
                env=client_env(),
            ).stdout
            assert int(size) == extent["size"]
    assert total >= 24 * MiB

    shown = json.loads(ok(registry, "volume", "show", "vol1", "--json"))
    assert shown == volume
    assert "nbd://" in ok(registry, "volume", "show", "vol1")
    listed = json.loads(ok(registry, "volume", "list", "--json"))
    assert [v["name"] for v in listed] == ["vol1"]
    assert "vol1" in ok(registry, "volume", "list")

    reserved = sum(
        s["reserved"] for s in json.loads(ok(registry, "server", "list", "--json"))
    )
    assert reserved == 2 * total
    assert sum(len(exports_on(s)) for s in memservers) == 2 * len(volume["extents"])

    ok(registry, "volume", "delete", "vol1")
    assert all(exports_on(s) == [] for s in memservers)
    assert json.loads(ok(registry, "volume", "list", "--json")) == []
    servers = json.loads(ok(registry, "server", "list", "--json"))
    assert all(s["reserved"] == 0 for s in servers)


def test_volume_create_errors_leave_nothing_behind(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    add_all(registry, memservers)

    code, _, err = rampool(
        registry, "volume", "create", "big", "--size", "100M", "--replicas", "2"
    )
    assert code == 1
    assert "short" in err or "only" in err, err
    assert all(exports_on(s) == [] for s in memservers)
    assert json.loads(ok(registry, "volume", "list", "--json")) == []
    assert all(
        s["reserved"] == 0 for s in json.loads(ok(registry, "server", "list", "--json"))
    )

    code, _, err = rampool(registry, "volume", "create", "Bad Name", "--size", "4M")
    assert code == 2 and "lowercase" in err
    code, _, err = rampool(registry, "volume", "create", "v", "--size", "12Q")
    assert code == 2 and "size" in err
    code, _, err = rampool(
        registry, "volume", "create", "v", "--size", "4M", "--replicas", "4"
    )
    assert code == 2
    code, _, err = rampool(
        registry, "volume", "create", "v", "--size", "4M", "--stripe", "3K"
    )
    assert code == 1 and "stripe" in err

    ok(registry, "volume", "create", "v", "--size", "4M")
    code, _, err = rampool(registry, "volume", "create", "v", "--size", "4M")
    assert code == 1 and "exists" in err
    code, _, err = rampool(registry, "volume", "show", "nope")
    assert code == 1 and "nope" in err
    code, _, err = rampool(registry, "volume", "delete", "nope")
    assert code == 1 and "nope" in err


def test_server_remove_refused_while_holding_data(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    ok(registry, "server", "add", memservers[0].control_url, "--name", "only")
    ok(registry, "volume", "create", "v", "--size", "8M")
    code, _, err = rampool(registry, "server", "remove", "only")
    assert code == 1 and "v" in err
    ok(registry, "volume", "delete", "v")
    ok(registry, "server", "remove", "only")
    assert json.loads(ok(registry, "server", "list", "--json")) == []


def test_pool_status(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    add_all(registry, memservers)
    ok(registry, "volume", "create", "v", "--size", "8M", "--replicas", "3")
    status = json.loads(ok(registry, "pool", "status", "--json"))
    assert status["servers"] == 3
    assert status["capacity_bytes"] == 3 * SERVER_SIZE
    assert status["reserved_bytes"] == 3 * 8 * MiB
    assert status["free_bytes"] == 3 * SERVER_SIZE - 3 * 8 * MiB
    assert status["volumes"] == 1 and status["degraded_extents"] == 0
    assert "192 MiB" in ok(registry, "pool", "status")


def test_drain_moves_data_and_stops_placement(pool: tuple[list, str]) -> None:
    memservers, registry = pool
    add_all(registry, memservers)
    volume = json.loads(
        ok(
            registry,
            "volume",
            "create",
            "v",
            "--size",
            "12M",
            "--extents",
            "3",
            "--json",
        )
    )
    patterns = {}
    for extent in volume["extents"]:
        (replica,) = extent["replicas"]
        data = bytes([extent["index"] + 1]) * extent["size"]
        write_export(replica["uri"], data)
        patterns[extent["index"]] = data
    victim = volume["extents"][0]["replicas"][0]["server"]

    out = ok(registry, "server", "drain", victim)
    assert "drained" in out
    drained = next(
        s
        for s in json.loads(ok(registry, "server", "list", "--json"))
        if s["name"] == victim
    )
    assert drained["state"] == "draining" and drained["reserved"] == 0
    victim_process = next(m for m in memservers if m.nbd_address == victim)
    assert exports_on(victim_process) == []

    moved = json.loads(ok(registry, "volume", "show", "v", "--json"))
    assert moved["epoch"] > volume["epoch"]
    for extent in moved["extents"]:
        (replica,) = extent["replicas"]
        assert replica["server"] != victim
        assert read_export(replica["uri"]) == patterns[extent["index"]]

    placed = json.loads(ok(registry, "volume", "create", "w", "--size", "4M", "--json"))
    assert all(r["server"] != victim for e in placed["extents"] for r in e["replicas"])


def test_racing_creates_never_over_allocate(pool: tuple[list, str]) -> None:
    """Eight `rampool volume create` processes race for room for five."""
    memservers, registry = pool
    ok(registry, "server", "add", memservers[0].control_url, "--name", "one")
    ok(registry, "volume", "create", "filler", "--size", "24M")  # 40 MiB stay free

    def create(i: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(VENV_BIN / "rampool"),
                "--registry",
                registry,
                "volume",
                "create",
                f"r{i}",
                "--size",
                "8M",
            ],
            capture_output=True,
            text=True,
            env=client_env(),
            timeout=120,
        )

    with ThreadPoolExecutor(8) as pool_:
        results = list(pool_.map(create, range(8)))
    won = [r for r in results if r.returncode == 0]
    lost = [r for r in results if r.returncode != 0]
    assert len(won) == 5, [r.stderr for r in results]
    assert all("short" in r.stderr or "only" in r.stderr for r in lost), [
        r.stderr for r in lost
    ]
    (server,) = json.loads(ok(registry, "server", "list", "--json"))
    assert server["reserved"] == 64 * MiB == server["capacity"]
    assert len(exports_on(memservers[0])) == 6


def test_installed_entry_point(tmp_path: Path) -> None:
    rampool_bin = str(VENV_BIN / "rampool")
    version = subprocess.run(
        [rampool_bin, "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("rampool ")
    status = subprocess.run(
        [rampool_bin, "pool", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RAMPOOL_REGISTRY": f"sqlite:///{tmp_path}/r.db"},
    )
    assert json.loads(status.stdout)["servers"] == 0
    bad = subprocess.run(
        [rampool_bin, "--registry", "bogus://", "pool", "status"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "error:" in bad.stderr
