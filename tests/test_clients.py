"""Clients we did not write, against a running memserver.

Each test drives one export with an independent NBD implementation (libnbd's
nbdinfo, nbdsh and nbdcopy; QEMU's qemu-io and qemu-img; fio's nbd engine),
once over TCP and once over the unix socket, and checks every byte that comes
back against a model the test keeps itself.  One daemon serves the whole
module; every test gets fresh exports and deletes them.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.memserver_process import (
    MemserverProcess,
    client_env,
    first_difference,
    nbdsh,
    read_export,
    run_tool,
    write_export,
)

MiB = 1024 * 1024
EXPORT_SIZE = 16 * MiB


@dataclass(frozen=True)
class Target:
    """An export under test and the URI a client reaches it by."""

    server: MemserverProcess
    name: str
    size: int
    label: str
    uri: str


def uri_for(server: MemserverProcess, record: dict[str, Any], transport: str) -> str:
    name = str(record["name"])
    if transport == "unix":
        return server.unix_uri(name)
    uri = str(record["uri"])
    assert uri == f"nbd://{server.nbd_address}/{name}", uri
    return uri


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemserverProcess]:
    process = MemserverProcess(tmp_path_factory.mktemp("clients")).start()
    try:
        yield process
    finally:
        status = process.stop()
    assert status == 0, f"memserver exited with {status}:\n{process.log}"


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(
    server: MemserverProcess, transport: str, request: pytest.FixtureRequest
) -> Iterator[Target]:
    label = f"clients/{request.node.name}"
    record = server.create_export(EXPORT_SIZE, label)
    yield Target(
        server=server,
        name=record["name"],
        size=record["size"],
        label=label,
        uri=uri_for(server, record, transport),
    )
    server.delete_export(record["name"])


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_export_equals(uri: str, expected: bytes | bytearray) -> None:
    actual = read_export(uri)
    offset = first_difference(actual, bytes(expected))
    assert offset is None, (
        f"export differs from the model at offset {offset} "
        f"(read {len(actual)} bytes, expected {len(expected)}): "
        f"got {actual[offset : offset + 16].hex()} "
        f"want {bytes(expected[offset : offset + 16]).hex()}"
    )


# nbdinfo


def test_nbdinfo_reports_the_export(target: Target) -> None:
    result = run_tool(["nbdinfo", "--json", target.uri], timeout=30)
    info = json.loads(result.stdout)

    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    [export] = info["exports"]
    assert export["export-name"] == target.name
    assert export["description"] == target.label
    assert export["export-size"] == EXPORT_SIZE
    assert export["is_read_only"] is False
    assert export["is_rotational"] is False
    for flag in (
        "can_multi_conn",
        "can_fua",
        "can_flush",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
    ):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_fails_for_an_unknown_export(server: MemserverProcess) -> None:
    # Names are access keys: a wrong one must not open anything.
    result = subprocess.run(
        ["nbdinfo", "--size", f"nbd://{server.nbd_address}/no-such-export"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
    )
    assert result.returncode != 0
    assert result.stdout == ""


# nbdsh

ODD_RANGES = [
    (1, 4097),
    (4099, 3),
    (8191, 65537),
    (MiB - 1, MiB + 2),
    (3 * MiB + 12345, 70001),
    (5 * MiB + 1, 4 * MiB + 7),
    (EXPORT_SIZE - 514, 513),
    (EXPORT_SIZE - 1, 1),
]

_WRITE_RANGES = """
src = open({path!r}, "rb").read()
ranges = {ranges!r}
for i, (offset, length) in enumerate(ranges):
    flags = nbd.CMD_FLAG_FUA if i % 2 else 0
    h.pwrite(src[offset : offset + length], offset, flags)
for offset, length in ranges:
    got = h.pread(length, offset)
    assert got == src[offset : offset + length], (offset, length)
print("structured", h.get_structured_replies_negotiated())
"""


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_nbdsh_writes_and_reads_at_odd_offsets(
    target: Target, tmp_path: Path, structured: bool
) -> None:
    src = random_bytes(EXPORT_SIZE, seed=1)
    path = tmp_path / "src.bin"
    path.write_bytes(src)

    out = nbdsh(
        target.uri,
        _WRITE_RANGES.format(path=str(path), ranges=ODD_RANGES),
        structured=structured,
    )

    assert out.decode().split() == ["structured", str(structured)]
    model = bytearray(EXPORT_SIZE)
    for offset, length in ODD_RANGES:
        model[offset : offset + length] = src[offset : offset + length]
    assert_export_equals(target.uri, model)


ZEROED = [
    # (offset, length, libnbd flag names)
    (3, 5000, []),
    (100001, 70001, ["CMD_FLAG_NO_HOLE"]),
    (262144, 4096, ["CMD_FLAG_FAST_ZERO"]),
    (300001, 12345, ["CMD_FLAG_NO_HOLE", "CMD_FLAG_FUA"]),
    (2 * MiB - 7, 2 * MiB + 9, ["CMD_FLAG_FAST_ZERO", "CMD_FLAG_NO_HOLE"]),
]
TRIMMED = [(500000, 8192, []), (600001, 3, ["CMD_FLAG_FUA"])]

_ZERO_TRIM = """
zeroed = {zeroed!r}
trimmed = {trimmed!r}
def flags(names):
    value = 0
    for name in names:
        value |= getattr(nbd, name)
    return value
for offset, length, names in zeroed:
    h.zero(length, offset, flags(names))
for offset, length, names in trimmed:
    h.trim(length, offset, flags(names))
h.cache({mib}, 0)
h.cache(12345, h.get_size() - 12345)
h.flush()
h.pwrite(b"\\xa5" * 4099, {fua_offset}, nbd.CMD_FLAG_FUA)
h.flush()
print("done")
"""
FUA_OFFSET = 9 * MiB + 1


def test_nbdsh_zero_trim_cache_flush_fua(target: Target) -> None:
    src = random_bytes(EXPORT_SIZE, seed=2)
    write_export(target.uri, src)

    script = _ZERO_TRIM.format(
        zeroed=ZEROED, trimmed=TRIMMED, mib=MiB, fua_offset=FUA_OFFSET
    )
    out = nbdsh(target.uri, script)

    assert out == b"done\n"
    model = bytearray(src)
    # The memserver zeroes trimmed ranges too (see memserver/transport.py):
    # no tenant reads stale bytes, so the model treats trim like zero.
    for offset, length, _ in ZEROED + TRIMMED:
        model[offset : offset + length] = bytes(length)
    model[FUA_OFFSET : FUA_OFFSET + 4099] = b"\xa5" * 4099
    assert_export_equals(target.uri, model)


_OUT_OF_RANGE = """
# Let the requests reach the server: libnbd would refuse them itself.
h.set_strict_mode(0)
size = h.get_size()
for name, call in [
    ("read", lambda: h.pread(10, size - 5)),
    ("write", lambda: h.pwrite(b"x" * 70000, size - 4096)),
    ("zero", lambda: h.zero(8192, size - 4096)),
    ("trim", lambda: h.trim(4096, size)),
    ("cache", lambda: h.cache(4097, size - 4096)),
]:
    try:
        call()
    except nbd.Error as e:
        print(name, e.errno)
    else:
        print(name, "accepted")
# The refused write's payload was skipped: the stream is still in step.
h.pwrite(b"after", size - 5)
print("tail", h.pread(5, size - 5).decode())
print("head", h.pread(4, 0).hex())
"""


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_nbdsh_out_of_range_requests_fail_and_the_connection_goes_on(
    target: Target, structured: bool
) -> None:
    out = nbdsh(target.uri, _OUT_OF_RANGE, structured=structured)

    assert out.decode().splitlines() == [
        "read EINVAL",
        "write ENOSPC",
        "zero ENOSPC",
        "trim ENOSPC",
        "cache EINVAL",
        "tail after",
        "head 00000000",
    ]


_MULTI_CONN = """
handles = [h]
for _ in range(3):
    extra = nbd.NBD()
    extra.connect_uri({uri!r})
    handles.append(extra)
assert all(handle.can_multi_conn() for handle in handles)
chunk = 1 << 20
for i, handle in enumerate(handles):
    handle.pwrite(bytes([i + 1]) * chunk + b"tail", i * 3 * chunk + 1)
    handle.flush()
for reader in handles:
    for i in range(len(handles)):
        got = reader.pread(chunk + 4, i * 3 * chunk + 1)
        assert got == bytes([i + 1]) * chunk + b"tail", (i, got[:8])
for extra in handles[1:]:
    extra.shutdown()
print(len(handles))
"""


def test_nbdsh_multi_conn_sees_every_connections_writes(target: Target) -> None:
    out = nbdsh(target.uri, _MULTI_CONN.format(uri=target.uri))

    assert out == b"4\n"
    model = bytearray(EXPORT_SIZE)
    for i in range(4):
        start = i * 3 * MiB + 1
        model[start : start + MiB + 4] = bytes([i + 1]) * MiB + b"tail"
    # A third process, on yet another connection, reads the same bytes.
    assert_export_equals(target.uri, model)


# qemu-io and qemu-img

QEMU_IO_COMMANDS = [
    "write -P 0xab 1 4097",
    "read -P 0xab 1 4097",
    "write -P 0x5c 65535 131073",
    "read -P 0x5c 65535 131073",
    "writev -P 0x5a 300001 1000 2000 517",
    "readv -P 0x5a 300001 1000 2000 517",
    "aio_write -P 0x11 1048576 64k",
    "aio_write -P 0x22 1114112 65537",
    "aio_flush",
    "aio_read -P 0x11 1048576 64k",
    "aio_read -P 0x22 1114112 65537",
    "aio_flush",
    "write -P 0x77 2097152 16384",
    "write -z 2101249 4095",
    "read -P 0x77 2097152 4097",
    "read -P 0 2101249 4095",
    "read -P 0x77 2105344 8192",
    "flush",
    f"read -P 0 {EXPORT_SIZE - 65536} 65536",
]


def test_qemu_io_pattern_writes_verify(target: Target) -> None:
    argv = ["qemu-io", "-f", "raw", target.uri]
    for command in QEMU_IO_COMMANDS:
        argv += ["-c", command]

    out = run_tool(argv, timeout=60).stdout.decode()

    assert "verification failed" not in out, out
    verbs = [command.split()[0] for command in QEMU_IO_COMMANDS]
    lines = out.splitlines()
    writes = sum(verb in ("write", "writev", "aio_write") for verb in verbs)
    reads = sum(verb in ("read", "readv", "aio_read") for verb in verbs)
    assert sum(line.startswith("wrote ") for line in lines) == writes, out
    assert sum(line.startswith("read ") for line in lines) == reads, out
    model = bytearray(EXPORT_SIZE)
    for offset, length, byte in [
        (1, 4097, 0xAB),
        (65535, 131073, 0x5C),
        (300001, 3517, 0x5A),
        (1048576, 65536, 0x11),
        (1114112, 65537, 0x22),
        (2097152, 16384, 0x77),
        (2101249, 4095, 0x00),
    ]:
        model[offset : offset + length] = bytes([byte]) * length
    assert_export_equals(target.uri, model)


def test_qemu_io_read_pattern_detects_wrong_data(target: Target) -> None:
    # The check the test above relies on must be able to fail.
    write_export(target.uri, b"\xab" * 4097, offset=1)
    result = subprocess.run(
        ["qemu-io", "-f", "raw", target.uri, "-c", "read -P 0xcd 1 4097"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
    )
    assert result.returncode != 0
    assert "Pattern verification failed at offset 1" in result.stdout


def image_with_holes(size: int, seed: int) -> bytes:
    data = bytearray(random_bytes(size, seed))
    data[2 * MiB : 3 * MiB] = bytes(MiB)  # a zero run for zero detection
    data[size - MiB :] = bytes(MiB)
    data[5 * MiB + 3 : 5 * MiB + 4100] = bytes(4097)
    return bytes(data)


def test_qemu_img_convert_onto_export_and_compare(
    target: Target, tmp_path: Path
) -> None:
    image = tmp_path / "source.img"
    source = image_with_holes(EXPORT_SIZE, seed=3)
    image.write_bytes(source)
    # Old bytes everywhere, so zero runs must really be written as zeros.
    write_export(target.uri, b"\xff" * EXPORT_SIZE)

    run_tool(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), target.uri]
    )
    compared = run_tool(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), target.uri]
    )

    assert compared.stdout.decode().strip() == "Images are identical."
    assert_export_equals(target.uri, source)

    write_export(target.uri, bytes([source[3 * MiB + 7] ^ 1]), offset=3 * MiB + 7)
    mismatch = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), target.uri],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=60,
    )
    assert mismatch.returncode == 1, mismatch
    assert "Content mismatch at offset" in mismatch.stdout


# nbdcopy


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_nbdcopy_round_trip_with_four_connections(
    target: Target, transport: str, tmp_path: Path
) -> None:
    source = image_with_holes(EXPORT_SIZE, seed=4)
    src_path = tmp_path / "source.img"
    src_path.write_bytes(source)
    write_export(target.uri, b"\x5a" * EXPORT_SIZE)
    copy = ["nbdcopy", "--connections=4", "--requests=16"]

    run_tool([*copy, str(src_path), target.uri])
    run_tool([*copy, "--request-size=65536", target.uri, str(tmp_path / "back.img")])

    assert sha256((tmp_path / "back.img").read_bytes()) == sha256(source)

    # Export to export, both ends over the network.
    other = target.server.create_export(EXPORT_SIZE, "clients/nbdcopy-copy")
    try:
        other_uri = uri_for(target.server, other, transport)
        run_tool([*copy, target.uri, other_uri])
        run_tool(["nbdcopy", "--connections=4", other_uri, str(tmp_path / "b2.img")])
        assert sha256((tmp_path / "b2.img").read_bytes()) == sha256(source)
        assert sha256(read_export(other_uri)) == sha256(source)
    finally:
        target.server.delete_export(other["name"])


# fio

FIO_JOBS = 4
FIO_SPAN = EXPORT_SIZE // FIO_JOBS


def fio(target: Target, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Each job writes its own quarter, so no job overwrites blocks another
    # job verifies.
    argv = [
        "fio",
        "--name=rampool",
        "--ioengine=nbd",
        f"--uri={target.uri}",
        "--rw=randwrite",
        "--bs=4k",
        f"--size={FIO_SPAN}",
        f"--offset_increment={FIO_SPAN}",
        f"--numjobs={FIO_JOBS}",
        "--iodepth=16",
        "--verify=crc32c",
        # fio would leave a state file per job in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
        f"--output={output}",
        *extra,
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, env=client_env(), timeout=120
    )


def fio_jobs(output: Path) -> list[dict[str, Any]]:
    jobs = json.loads(output.read_text())["jobs"]
    assert len(jobs) == FIO_JOBS
    return list(jobs)


def test_fio_random_writes_verify(target: Target, tmp_path: Path) -> None:
    written = fio(target, tmp_path / "write.json", "--do_verify=1")
    assert written.returncode == 0, written.stderr
    assert "verify:" not in written.stderr, written.stderr
    for job in fio_jobs(tmp_path / "write.json"):
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == FIO_SPAN
        # The verify pass reads back every block written.
        assert job["read"]["io_bytes"] == FIO_SPAN

    checked = fio(target, tmp_path / "verify.json", "--verify_only=1")
    assert checked.returncode == 0, checked.stderr
    assert "verify:" not in checked.stderr, checked.stderr
    for job in fio_jobs(tmp_path / "verify.json"):
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] == FIO_SPAN

    # One damaged block in the third job's quarter must be caught.
    write_export(target.uri, bytes(4096), offset=2 * FIO_SPAN + 7 * 4096)
    damaged = fio(target, tmp_path / "damaged.json", "--verify_only=1")
    assert damaged.returncode != 0
    assert "verify: bad magic header" in damaged.stderr, damaged.stderr


# Isolation


def test_two_exports_never_see_each_others_bytes(
    target: Target, transport: str
) -> None:
    server = target.server
    other = server.create_export(EXPORT_SIZE, "clients/neighbour")
    try:
        other_uri = uri_for(server, other, transport)
        assert read_export(other_uri) == bytes(EXPORT_SIZE)

        mine = random_bytes(EXPORT_SIZE, seed=5)
        theirs = random_bytes(EXPORT_SIZE, seed=6)
        write_export(target.uri, mine)
        write_export(other_uri, theirs)
        assert_export_equals(target.uri, mine)
        assert_export_equals(other_uri, theirs)

        # Writes that run past the end of one export are refused and leave
        # the neighbour (most likely the next slabs) untouched.
        out = nbdsh(
            target.uri,
            "h.set_strict_mode(0)\n"
            "for offset in (h.get_size() - 1, h.get_size()):\n"
            "    try:\n"
            "        h.pwrite(b'\\xee' * 8192, offset)\n"
            "    except nbd.Error as e:\n"
            "        print(e.errno)\n",
        )
        assert out.split() == [b"ENOSPC", b"ENOSPC"]
        assert_export_equals(target.uri, mine)
        assert_export_equals(other_uri, theirs)

        # Deleting a third export wipes its slabs, and only its slabs.
        scratch = server.create_export(EXPORT_SIZE, "clients/scratch")
        write_export(uri_for(server, scratch, transport), b"\x33" * EXPORT_SIZE)
        server.delete_export(scratch["name"])
        assert_export_equals(target.uri, mine)
        assert_export_equals(other_uri, theirs)
    finally:
        server.delete_export(other["name"])
