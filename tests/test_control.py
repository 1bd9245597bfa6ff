"""The memserver's HTTP control API, its metrics and its lifecycle.

Every test runs the real daemon (``rampool memserver run``) in a child
process and reaches it as an operator or a client would: HTTP for control,
libnbd (nbdsh, nbdinfo, and its Python binding in this process) for data,
signals for the lifecycle.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memserver import __version__
from tests.memserver_process import (
    VENV_BIN,
    MemserverProcess,
    client_env,
    first_difference,
    nbdsh,
    read_export,
    run_tool,
    write_export,
)

MiB = 1024 * 1024
# Small arenas with small slabs start fast and fill up quickly.
SMALL = {"size": "64M", "extra": ["--slab-size", "2M"]}
# Takes CAP_IPC_LOCK away (from the bounding and inheritable sets, so the
# exec'd daemon cannot get it back) and caps locked memory at 64 KiB.
NO_LOCK_RIGHTS = [
    "prlimit",
    "--memlock=65536:65536",
    "setpriv",
    "--inh-caps=-ipc_lock",
    "--bounding-set=-ipc_lock",
    "--",
]

Spawn = Callable[..., MemserverProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start memservers with chosen options; each must stop with status 0."""
    started: list[MemserverProcess] = []

    def start(**options: Any) -> MemserverProcess:
        directory = tmp_path / f"memserver{len(started)}"
        directory.mkdir()
        process = MemserverProcess(directory, **options)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        status = process.stop()
        assert status == 0, f"memserver exited with {status}:\n{process.log}"


def health(server: MemserverProcess) -> dict[str, Any]:
    status, body = server.request("GET", "/v1/health")
    assert status == 200, (status, body)
    return dict(body)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def connected(uri: str) -> Iterator[nbd.NBD]:
    """A libnbd handle connected to ``uri``, shut down afterwards if alive."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        yield handle
    finally:
        # A handle the server cut off cannot say goodbye; that is expected.
        with contextlib.suppress(nbd.Error):
            handle.shutdown()


def assert_export_equals(uri: str, expected: bytes) -> None:
    actual = read_export(uri)
    offset = first_difference(actual, expected)
    assert offset is None, f"export {uri} differs from the model at offset {offset}"


# Create, list, show, delete.


def test_create_list_show_delete(memserver: MemserverProcess) -> None:
    started = time.time()
    by_int = memserver.create_export(64 * MiB, "vol1/extent0")
    by_text = memserver.create_export("64M", "vol1/extent1")

    for record, label in ((by_int, "vol1/extent0"), (by_text, "vol1/extent1")):
        assert record["size"] == 64 * MiB
        assert record["label"] == label
        assert record["slabs"] == 4
        assert record["allocated_bytes"] == 64 * MiB
        assert started - 1 <= record["created"] <= time.time() + 1
        # The name is the key that opens the export: long and random.
        assert len(record["name"]) >= 32
        assert record["uri"] == f"nbd://{memserver.nbd_address}/{record['name']}"
    assert by_int["name"] != by_text["name"]

    status, listing = memserver.request("GET", "/v1/exports")
    assert status == 200
    assert sorted(listing["exports"], key=lambda r: r["label"]) == [by_int, by_text]
    status, shown = memserver.request("GET", f"/v1/exports/{by_int['name']}")
    assert (status, shown) == (200, by_int)
    info = json.loads(run_tool(["nbdinfo", "--json", by_text["uri"]]).stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB
    assert health(memserver)["slabs"]["used"] == 8

    memserver.delete_export(by_int["name"])

    status, shown = memserver.request("GET", f"/v1/exports/{by_int['name']}")
    assert status == 404
    assert "no export of that name" in shown["error"]
    status, body = memserver.request("DELETE", f"/v1/exports/{by_int['name']}")
    assert status == 404
    assert "no export of that name" in body["error"]
    status, listing = memserver.request("GET", "/v1/exports")
    assert [r["name"] for r in listing["exports"]] == [by_text["name"]]
    assert health(memserver)["slabs"]["used"] == 4
    gone = subprocess.run(
        ["nbdinfo", "--size", by_int["uri"]],
        capture_output=True,
        env=client_env(),
        timeout=30,
    )
    assert gone.returncode != 0


def test_unknown_export_is_404(memserver: MemserverProcess) -> None:
    for method in ("GET", "DELETE"):
        status, body = memserver.request(method, "/v1/exports/not-an-export")
        assert status == 404, (method, status, body)
        assert body == {"error": "no export of that name on this memserver"}


BAD_CREATE_BODIES: list[tuple[bytes, str]] = [
    (b"{not json", 'the body must be a JSON object like {"size": "64M"}'),
    (b"[1, 2]", 'the body must be a JSON object like {"size": "64M"}'),
    (b'"64M"', 'the body must be a JSON object like {"size": "64M"}'),
    (b'{"size": "12X"}', "invalid size '12X'"),
    (b'{"size": "64Q"}', "invalid size '64Q'"),
    (b'{"size": 0}', "positive multiple of 4096 bytes, got 0"),
    (b'{"size": -4096}', "positive multiple of 4096 bytes, got -4096"),
    (b'{"size": 4097}', "positive multiple of 4096 bytes, got 4097"),
    (b'{"size": "1.5K"}', "positive multiple of 4096 bytes, got 1536"),
    (b'{"size": true}', 'size must be a byte count or a string like "64M"'),
    (b'{"size": 4096.0}', 'size must be a byte count or a string like "64M"'),
    (b'{"label": "no size"}', 'size must be a byte count or a string like "64M"'),
    (b'{"size": "64M", "colour": "red"}', "unknown fields: colour"),
    (b'{"size": "64M", "label": 7}', "label must be a string"),
]


def test_bad_create_requests_are_400(memserver: MemserverProcess) -> None:
    wrong = []
    for raw, message in BAD_CREATE_BODIES:
        status, body = memserver.request("POST", "/v1/exports", raw=raw)
        if status != 400 or message not in body.get("error", ""):
            wrong.append((raw, status, body))
    assert wrong == [], "requests not refused with 400 and the right message"

    state = health(memserver)
    assert state["exports"] == 0
    assert state["slabs"]["used"] == 0


def test_pool_exhausted_is_507_with_free_bytes(memserver: MemserverProcess) -> None:
    # 256 MiB in 16 MiB slabs: 200 MiB takes 13 slabs and leaves 3.
    big = memserver.create_export("200M")
    assert big["slabs"] == 13

    status, body = memserver.request("POST", "/v1/exports", {"size": "64M"})

    assert status == 507
    assert body["free_bytes"] == 48 * MiB == health(memserver)["free_bytes"]
    assert "pool exhausted" in body["error"]
    assert "48 MiB" in body["error"]
    assert health(memserver)["exports"] == 1

    rest = memserver.create_export("48M")
    status, body = memserver.request("POST", "/v1/exports", {"size": 4096})
    assert status == 507
    assert body["free_bytes"] == 0
    assert "only 0 B (0 slabs) is free" in body["error"], body

    memserver.delete_export(big["name"])
    memserver.delete_export(rest["name"])
    assert health(memserver)["free_bytes"] == 256 * MiB


def test_exports_never_share_slabs(spawn: Spawn) -> None:
    server = spawn(**SMALL)  # 32 slabs of 2 MiB
    first = server.create_export("6M")
    hole = server.create_export("2M")
    odd = server.create_export(10 * MiB + 4096)
    assert odd["slabs"] == 6
    assert odd["allocated_bytes"] == 12 * MiB
    server.delete_export(first["name"])
    fragmented = server.create_export("8M")  # reuses freed slabs, and more
    server.delete_export(hole["name"])
    rest = server.create_export(health(server)["free_bytes"])
    status, body = server.request("POST", "/v1/exports", {"size": 4096})
    assert status == 507, body
    assert health(server)["slabs"]["free"] == 0

    # Distinct bytes in every export, all at once: any shared slab would
    # show one export's bytes in another.
    contents = {}
    for seed, record in enumerate((odd, fragmented, rest)):
        data = random.Random(seed).randbytes(record["size"])
        write_export(record["uri"], data)
        contents[record["name"]] = data
    for record in (odd, fragmented, rest):
        assert_export_equals(record["uri"], contents[record["name"]])


def test_freed_memory_is_wiped_before_reuse(spawn: Spawn) -> None:
    server = spawn(size="32M", extra=["--slab-size", "2M"])
    for size in ("32M", "8M"):
        # An export of the whole pool is certain to get the old slabs back.
        old = server.create_export("32M")
        write_export(old["uri"], b"\xee" * (32 * MiB))
        server.delete_export(old["name"])

        new = server.create_export(size)

        assert read_export(new["uri"]) == bytes(new["size"])
        server.delete_export(new["name"])


def test_delete_disconnects_only_that_exports_clients(
    memserver: MemserverProcess,
) -> None:
    doomed = memserver.create_export("16M")
    kept = memserver.create_export("16M")
    kept_data = random.Random(7).randbytes(16 * MiB)
    write_export(kept["uri"], kept_data)

    with (
        connected(doomed["uri"]) as over_tcp,
        connected(memserver.unix_uri(doomed["name"])) as over_unix,
        connected(kept["uri"]) as neighbour,
    ):
        over_tcp.pwrite(b"a" * 4096, 0)
        over_unix.pwrite(b"b" * 4096, 4096)

        memserver.delete_export(doomed["name"])

        for handle in (over_tcp, over_unix):
            with pytest.raises(nbd.Error):
                handle.pread(4096, 0)
        assert neighbour.pread(4096, 8 * MiB) == kept_data[8 * MiB : 8 * MiB + 4096]
        neighbour.pwrite(b"still here", 12345)
        neighbour.flush()

    memserver.wait_for_log(
        rf"export deleted export={re.escape(doomed['name'][:8])} .*clients_closed=2"
    )
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(doomed["uri"])
    expected = bytearray(kept_data)
    expected[12345 : 12345 + 10] = b"still here"
    assert_export_equals(kept["uri"], bytes(expected))


# Metrics.

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: MemserverProcess) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {key} in /metrics"
    return samples[key]


def errors(samples: Samples, kind: str) -> float:
    """Errors of one kind; a kind appears with its first error."""
    return samples.get(("rampool_memserver_errors_total", (("kind", kind),)), 0.0)


_KNOWN_IO = """
h.pwrite(b"a" * 4097, 1)
h.pwrite(b"b", 8191)
h.pwrite(b"c" * 65536, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(1000, 1) == b"a" * 1000
assert h.pread(131072, 0)[65536:] == b"c" * 65536
h.zero(8192, 1 << 20)
h.trim(4096, 2 << 20)
h.flush()
h.cache(4096, 0)
h.set_strict_mode(0)
size = h.get_size()
for call in (lambda: h.pread(10, size - 5), lambda: h.pwrite(b"x" * 10, size - 5)):
    try:
        call()
    except nbd.Error as e:
        print(e.errno)
"""

# command: (requests, bytes) that _KNOWN_IO adds.
KNOWN_IO_COUNTS = {
    "read": (2, 1000 + 131072),
    "write": (3, 4097 + 1 + 65536),
    "write_zeroes": (1, 8192),
    "trim": (1, 4096),
    "flush": (1, 0),
    "cache": (1, 4096),
}


def test_metrics_count_known_io(memserver: MemserverProcess) -> None:
    record = memserver.create_export("16M")
    before = scrape(memserver)

    out = nbdsh(record["uri"], _KNOWN_IO)

    assert out.split() == [b"EINVAL", b"ENOSPC"]
    after = scrape(memserver)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for command, (requests, size) in KNOWN_IO_COUNTS.items():
        assert moved("rampool_memserver_requests_total", command=command) == requests
        assert moved("rampool_memserver_request_bytes_total", command=command) == size
        assert (
            moved("rampool_memserver_request_duration_seconds_count", command=command)
            == requests
        )
    assert errors(after, "einval") - errors(before, "einval") == 1
    assert errors(after, "enospc") - errors(before, "enospc") == 1
    assert moved("rampool_memserver_connections_accepted_total") == 1


def test_metrics_pool_gauges_and_open_connections(memserver: MemserverProcess) -> None:
    samples = scrape(memserver)
    assert sample(samples, "rampool_memserver_slabs", state="used") == 0
    assert sample(samples, "rampool_memserver_slabs", state="free") == 16
    assert sample(samples, "rampool_memserver_slab_size_bytes") == 16 * MiB
    assert sample(samples, "rampool_memserver_arena_bytes") == 256 * MiB
    assert sample(samples, "rampool_memserver_arena_locked") == 1
    assert sample(samples, "rampool_memserver_exports") == 0
    assert sample(samples, "rampool_memserver_workers") == 2
    assert sample(samples, "rampool_memserver_connections") == 0

    record = memserver.create_export("40M")  # 3 slabs
    with connected(record["uri"]) as first, connected(record["uri"]) as second:
        first.pread(1, 0)
        second.pread(1, 0)
        samples = scrape(memserver)
        assert sample(samples, "rampool_memserver_connections") == 2
    assert sample(samples, "rampool_memserver_slabs", state="used") == 3
    assert sample(samples, "rampool_memserver_slabs", state="free") == 13
    assert sample(samples, "rampool_memserver_exports") == 1
    wait_until(
        lambda: sample(scrape(memserver), "rampool_memserver_connections") == 0,
        "the connections gauge to drop to 0",
    )

    memserver.delete_export(record["name"])
    samples = scrape(memserver)
    assert sample(samples, "rampool_memserver_slabs", state="used") == 0
    assert sample(samples, "rampool_memserver_slabs", state="free") == 16
    assert sample(samples, "rampool_memserver_exports") == 0


# Health and lifecycle.


def test_health_reports_the_daemon(spawn: Spawn) -> None:
    server = spawn(size="64M", extra=["--slab-size", "2M", "--zone", "rack-7"])
    assert server.process is not None

    state = health(server)

    assert state["status"] == "ok"
    assert state["version"] == __version__
    assert state["pid"] == server.process.pid
    assert 0 <= state["uptime_seconds"] < 120
    assert state["zone"] == "rack-7"
    assert state["nbd"] == server.nbd_address
    assert state["unix_socket"] == server.socket_path
    assert state["arena"]["bytes"] == 64 * MiB
    assert state["arena"]["locked"] is True
    assert "huge_pages" in state["arena"]
    assert state["slabs"] == {"size": 2 * MiB, "total": 32, "used": 0, "free": 32}
    assert state["free_bytes"] == 64 * MiB
    assert state["exports"] == 0
    assert state["workers"] == {"running": 2, "wanted": 2}

    server.create_export("5M")  # 3 slabs
    time.sleep(0.05)
    later = health(server)
    assert later["slabs"]["used"] == 3
    assert later["free_bytes"] == 58 * MiB
    assert later["exports"] == 1
    assert later["uptime_seconds"] > state["uptime_seconds"]


def test_sigterm_stops_cleanly_and_disconnects_clients(
    memserver: MemserverProcess,
) -> None:
    record = memserver.create_export("16M")
    workers = memserver.worker_pids()
    assert len(workers) == 2
    host, port = memserver.nbd_address.rsplit(":", 1)

    with (
        connected(record["uri"]) as over_tcp,
        connected(memserver.unix_uri(record["name"])) as over_unix,
    ):
        over_tcp.pwrite(b"x" * 4096, 0)
        over_unix.pread(4096, 0)

        status = memserver.stop()

        assert status == 0, memserver.log
        for handle in (over_tcp, over_unix):
            with pytest.raises(nbd.Error):
                handle.pread(4096, 0)

    log = memserver.log
    assert "memserver stopping exports=1" in log
    assert log.rstrip().splitlines()[-1].endswith("memserver stopped"), log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert not Path(memserver.socket_path).exists()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the master"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_killed_worker_is_restarted_and_exports_stay_served(
    memserver: MemserverProcess,
) -> None:
    record = memserver.create_export("16M")
    data = random.Random(8).randbytes(16 * MiB)
    write_export(record["uri"], data)
    survivor, victim = memserver.worker_pids()

    # Only a worker of the daemon this test started.
    os.kill(victim, signal.SIGKILL)

    memserver.wait_for_log(rf"worker exited index=\d pid={victim} code=-9")
    wait_until(
        lambda: health(memserver)["workers"]["running"] == 2,
        "the worker to be restarted",
    )
    state = health(memserver)
    assert state["status"] == "ok"
    assert state["workers"] == {"running": 2, "wanted": 2}
    pids = memserver.worker_pids()
    assert len(pids) == 2 and survivor in pids and victim not in pids
    [replacement] = set(pids) - {survivor}
    memserver.wait_for_log(rf"worker started index=\d pid={replacement}\b")

    # Several connections, so both workers serve some of them.
    for uri in (record["uri"], memserver.unix_uri(record["name"])) * 2:
        assert_export_equals(uri, data)
    # The new worker takes new exports too.
    other = memserver.create_export("16M")
    write_export(other["uri"], b"\x42" * (16 * MiB))
    for _ in range(3):
        assert_export_equals(other["uri"], b"\x42" * (16 * MiB))


def test_health_is_degraded_while_a_worker_is_down(
    memserver: MemserverProcess,
) -> None:
    victim = memserver.worker_pids()[0]

    os.kill(victim, signal.SIGKILL)

    # The master waits a second before it restarts a worker.
    wait_until(
        lambda: health(memserver)["status"] == "degraded",
        "health to report degraded",
        timeout=5,
    )
    assert health(memserver)["workers"]["wanted"] == 2
    wait_until(lambda: health(memserver)["status"] == "ok", "health back to ok")


# Command-line errors.


def run_cli(
    *args: str, wrapper: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(wrapper or []), str(VENV_BIN / "rampool"), "memserver", "run", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=60,
    )


def plain(text: str) -> str:
    """Text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


QUICK = ["--workers", "1", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "12X"], "invalid size '12X'"),
        (["--size", "0"], "smaller than one slab"),
        (
            ["--size", "32M", "--slab-size", "3M"],
            "slab size must be a power of two",
        ),
        (
            ["--size", "32M", "--slab-size", "2M", "--min-block-size", "3"],
            "--min-block-size: min_block must be a power of two, not 3",
        ),
        (["--size", "32M", "--listen", "127.0.0.1"], "is not HOST:PORT"),
    ],
    ids=["size", "zero-size", "slab-size", "min-block-size", "listen"],
)
def test_bad_options_exit_2_with_a_message(args: list[str], message: str) -> None:
    # The options under test come last, so they win over QUICK's.
    result = run_cli(*QUICK, *args)

    assert result.returncode == 2, result
    assert message in plain(result.stderr), result.stderr
    assert "memserver ready" not in result.stderr


@pytest.mark.parametrize("flag", ["--listen", "--control"])
def test_port_in_use_exits_1_naming_the_flag(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = ["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]
        others[others.index(flag) + 1] = f"127.0.0.1:{port}"

        result = run_cli(
            "--size", "32M", "--slab-size", "2M", "--workers", "1", *others
        )

    stderr = plain(result.stderr)
    assert result.returncode == 1, result
    assert f"127.0.0.1:{port}" in stderr
    assert "address already in use" in stderr.lower()
    assert f"pick another address with {flag}" in stderr
    assert "memserver ready" not in stderr


def test_refused_mlock_names_the_limit_and_no_mlock() -> None:
    result = run_cli(
        *QUICK, "--size", "32M", "--slab-size", "2M", wrapper=NO_LOCK_RIGHTS
    )

    stderr = plain(result.stderr)
    assert result.returncode == 1, result
    assert "cannot lock the arena" in stderr
    assert "RLIMIT_MEMLOCK" in stderr
    assert "soft=64 KiB hard=64 KiB" in stderr
    assert "--no-mlock" in stderr
    assert "memserver ready" not in stderr


def test_no_mlock_starts_without_lock_rights_and_warns(spawn: Spawn) -> None:
    server = spawn(
        size="32M",
        extra=["--slab-size", "2M", "--no-mlock"],
        wrapper=NO_LOCK_RIGHTS,
    )

    warning = server.wait_for_log(r"WARNING .*arena ready .*locked=no")
    assert "may be swapped" in warning
    assert health(server)["arena"]["locked"] is False
    assert sample(scrape(server), "rampool_memserver_arena_locked") == 0
    record = server.create_export("8M")
    data = random.Random(9).randbytes(8 * MiB)
    write_export(record["uri"], data)
    assert_export_equals(server.unix_uri(record["name"]), data)
