"""Hostile NBD peers against a live memserver.

A scripted client on a raw socket sends what no sane client would: unknown
handshake flags, broken magics, unknown options and commands, requests past the
end or over the size limit, payloads cut off halfway, a flood of reads whose
replies it never collects.  Each test checks the exact bytes the NBD spec asks
for, or that the connection was closed, and then that nothing else was touched:

* a libnbd client (the ``nbd`` module of python3-libnbd) on its own connection
  keeps writing blocks and reading them back the whole time;
* the worker processes are the ones that were there before, the daemon says it
  is healthy and logged no ERROR;
* the open-connection gauge falls back to the libnbd client alone, so a
  dropped peer leaks nothing;
* /metrics counts each refusal under its kind (einval, enospc, eoverflow,
  protocol, handshake_timeout, connection_refused).

The default daemon runs one worker so that every connection shares one
process: anything a hostile peer does to that worker reaches the libnbd client
too.

The wire encoders below are written from doc/proto.md of the NBD project, not
taken from memserver.nbd, so the server's constants do not check themselves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.memserver_process import MemserverProcess
from tests.nbd_wire import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
)

MiB = 1024 * 1024
IO_TIMEOUT = 10.0

# Magic numbers and frame layouts (doc/proto.md); the option, reply, command
# and error codes come from tests.nbd_wire, also written from the spec.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
# Not assigned by the spec; a server must refuse it, not choke on it.
OPT_UNASSIGNED = 0x4242
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_TYPE_OFFSET_HOLE = 2

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
ERROR_PAYLOAD = struct.Struct(">IH")

# The largest request the memserver takes by default (32 MiB, the spec's
# suggested maximum block size) and one that is over it.
MAX_PAYLOAD = 32 * MiB
OVERSIZED = 33 * MiB

WITNESS_SIZE = 16 * MiB
VICTIM_SIZE = 64 * MiB
# A NBD_CMD_DISC request: hostile payloads are made of these, so a server that
# mistook skipped payload for requests would hang up on the spot.
DISC_FRAME = REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0xD15C, 0, 0)


def disc_filler(length: int) -> bytes:
    """``length`` bytes of back-to-back NBD_CMD_DISC requests."""
    return (DISC_FRAME * (length // len(DISC_FRAME) + 1))[:length]


# The raw peer.


class PeerClosed(AssertionError):
    """The server hung up while the peer still expected bytes."""


@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes


@dataclass
class GoResult:
    size: int
    flags: int
    block_sizes: tuple[int, int, int] | None


class Peer:
    """A raw NBD client socket that does exactly what a test scripts."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        self.structured = False

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(min(count - len(chunks), 4 * MiB))
            if not chunk:
                raise PeerClosed(
                    f"server closed after {len(chunks)} of {count} expected bytes"
                )
            chunks += chunk
        return bytes(chunks)

    def expect_closed(self, timeout: float = IO_TIMEOUT) -> None:
        """Assert the server hangs up without sending another byte."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s") from None
        finally:
            self.sock.settimeout(IO_TIMEOUT)
        assert data == b"", f"expected the server to hang up, got {data!r}"

    # Handshake.

    def greeting(self) -> int:
        """Read the server's greeting; return its handshake flags."""
        nbdmagic, ihaveopt, flags = GREETING.unpack(self.read_exact(GREETING.size))
        assert (nbdmagic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        assert flags & FLAG_FIXED_NEWSTYLE, f"no fixed newstyle in {flags:#x}"
        return int(flags)

    def start(self, flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> None:
        """Read the greeting and answer with the client flags."""
        self.greeting()
        self.send(struct.pack(">I", flags))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self) -> OptionReply:
        magic, option, reply, length = OPTION_REPLY.unpack(
            self.read_exact(OPTION_REPLY.size)
        )
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return OptionReply(option, reply, self.read_exact(length))

    def expect_option_error(self, option: int, reply: int) -> str:
        """Read one option reply, check it is ``reply``; return its message."""
        got = self.read_option_reply()
        assert (got.option, got.reply) == (option, reply), (
            f"expected option {option} reply {reply:#x}, got option "
            f"{got.option} reply {got.reply:#x} data {got.data[:200]!r}"
        )
        # Error replies carry a human-readable message (a UTF-8 string).
        return got.data.decode("utf-8")

    def negotiate_structured(self) -> None:
        self.send_option(OPT_STRUCTURED_REPLY)
        reply = self.read_exact(OPTION_REPLY.size)
        assert reply == OPTION_REPLY.pack(
            OPTION_REPLY_MAGIC, OPT_STRUCTURED_REPLY, REP_ACK, 0
        )
        self.structured = True

    def go(self, name: str) -> GoResult:
        """NBD_OPT_GO for ``name``; fail unless the server agrees."""
        encoded = name.encode()
        self.send_option(
            OPT_GO, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        )
        size = flags = -1
        block_sizes = None
        while True:
            reply = self.read_option_reply()
            assert reply.option == OPT_GO
            if reply.reply == REP_ACK:
                assert reply.data == b""
                break
            assert reply.reply == REP_INFO, (
                f"GO refused with {reply.reply:#x}: {reply.data!r}"
            )
            (info,) = struct.unpack_from(">H", reply.data)
            if info == INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", reply.data)
            elif info == INFO_BLOCK_SIZE:
                _, *sizes = struct.unpack(">HIII", reply.data)
                block_sizes = (sizes[0], sizes[1], sizes[2])
        assert size >= 0, "GO succeeded without NBD_INFO_EXPORT"
        return GoResult(size, flags, block_sizes)

    # Transmission.

    def request(
        self,
        cmd: int,
        handle: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        self.send(REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length))
        if payload:
            self.send(payload)

    def expect_error(self, handle: int, error: int) -> str:
        """Read the reply to ``handle``; it must be ``error``.

        Simple replies are compared byte for byte.  Structured ones must be a
        single NBD_REPLY_TYPE_ERROR chunk marked done, with a message, which
        is returned.
        """
        if not self.structured:
            got = self.read_exact(SIMPLE_REPLY.size)
            assert got == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle), (
                f"expected error {error} for handle {handle:#x}, got "
                f"{SIMPLE_REPLY.unpack(got)}"
            )
            return ""
        magic, flags, kind, got_handle, length = CHUNK_HEADER.unpack(
            self.read_exact(CHUNK_HEADER.size)
        )
        assert (magic, flags, kind, got_handle) == (
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
        ), (magic, flags, kind, got_handle)
        payload = self.read_exact(length)
        got_error, message_length = ERROR_PAYLOAD.unpack_from(payload)
        assert got_error == error, f"expected errno {error}, got {got_error}"
        assert message_length == length - ERROR_PAYLOAD.size > 0
        return payload[ERROR_PAYLOAD.size :].decode("utf-8")

    def expect_ok(self, handle: int) -> None:
        """Read a successful reply without data (write, flush, trim)."""
        magic = self.read_exact(4)
        if magic == struct.pack(">I", SIMPLE_REPLY_MAGIC):
            assert self.read_exact(12) == struct.pack(">IQ", 0, handle)
            return
        rest = self.read_exact(CHUNK_HEADER.size - 4)
        assert magic + rest == CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0
        )

    def expect_data(self, handle: int, offset: int, length: int) -> bytes:
        """Read a successful read reply; return its ``length`` bytes."""
        if not self.structured:
            header = self.read_exact(SIMPLE_REPLY.size)
            assert header == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), (
                SIMPLE_REPLY.unpack(header)
            )
            return self.read_exact(length)
        data = bytearray(length)
        while True:
            magic, flags, kind, got_handle, size = CHUNK_HEADER.unpack(
                self.read_exact(CHUNK_HEADER.size)
            )
            assert (magic, got_handle) == (STRUCTURED_REPLY_MAGIC, handle)
            payload = self.read_exact(size)
            if kind == REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                piece = payload[8:]
                data[at - offset : at - offset + len(piece)] = piece
            elif kind == REPLY_TYPE_OFFSET_HOLE:
                at, hole = struct.unpack(">QI", payload)
                data[at - offset : at - offset + hole] = bytes(hole)
            else:
                raise AssertionError(f"read failed: chunk type {kind} {payload!r}")
            if flags & REPLY_FLAG_DONE:
                return bytes(data)

    def write_and_read_back(self, handle: int, offset: int, data: bytes) -> None:
        """A valid write then read of the same range: the session works."""
        self.request(CMD_WRITE, handle, offset, len(data), payload=data)
        self.expect_ok(handle)
        self.request(CMD_READ, handle + 1, offset, len(data))
        assert self.expect_data(handle + 1, offset, len(data)) == data


def session(address: tuple[str, int], name: str, *, structured: bool) -> Peer:
    """A raw peer in the transmission phase on export ``name``."""
    peer = Peer(address)
    peer.start()
    if structured:
        peer.negotiate_structured()
    peer.go(name)
    return peer


# The well-behaved client.


class Witness:
    """A libnbd client that keeps writing blocks and reading them back.

    It runs in a thread on its own connection until stopped.  Each round
    writes a block stamped with the round number, reads it back, and reads
    back one block written earlier; any mismatch or error is kept in
    ``failure`` and ends the thread.
    """

    BLOCK = 64 * 1024
    PAUSE = 0.005  # leave the two cores to the daemon and the hostile peer

    def __init__(self, uri: str, size: int) -> None:
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.slots = size // self.BLOCK
        self.rounds = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        written: dict[int, bytes] = {}
        try:
            while not self._stop.is_set():
                n = self.rounds
                slot = n % self.slots
                data = (n.to_bytes(8, "big") + b"witness!") * (self.BLOCK // 16)
                self.handle.pwrite(data, slot * self.BLOCK)
                written[slot] = data
                earlier = (n * 7919) % len(written)
                for check in (slot, list(written)[earlier]):
                    got = self.handle.pread(self.BLOCK, check * self.BLOCK)
                    if got != written[check]:
                        self.failure = f"round {n}: block {check} read back wrong"
                        return
                self.rounds = n + 1
                time.sleep(self.PAUSE)
        except nbd.Error as e:
            self.failure = f"round {self.rounds}: libnbd error {e}"

    def assert_served(self, rounds: int = 3, timeout: float = 20.0) -> None:
        """Wait for ``rounds`` more good rounds; fail if they do not come."""
        target = self.rounds + rounds
        deadline = time.monotonic() + timeout
        while self.rounds < target and self.failure is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the well-behaved client stalled at round {self.rounds}"
                )
            time.sleep(0.01)
        assert self.failure is None, f"the well-behaved client failed: {self.failure}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT)
        assert not self._thread.is_alive(), "the well-behaved client hung"
        assert self.failure is None, f"the well-behaved client failed: {self.failure}"
        self.handle.shutdown()


# The daemon under attack.


def rss_anon_kib(pids: set[int]) -> int:
    """Anonymous resident memory of ``pids`` in KiB.

    RssAnon leaves out the arena, a shared memfd that every worker maps and
    that shows up as RssShmem.
    """
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1])
    return total


def scrape(server: MemserverProcess) -> tuple[dict[str, int], int]:
    """The error counters by kind, and the open NBD connections."""
    errors: dict[str, int] = {}
    connections = -1
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == "rampool_memserver_errors_total":
                errors[sample.labels["kind"]] = int(sample.value)
            elif sample.name == "rampool_memserver_connections":
                connections = int(sample.value)
    return errors, connections


def nbd_address(server: MemserverProcess) -> tuple[str, int]:
    host, port = server.nbd_address.rsplit(":", 1)
    return host, int(port)


@dataclass
class Rig:
    """A daemon, a well-behaved client on it, and an export to attack."""

    server: MemserverProcess
    witness: Witness
    witness_export: str
    victim: str
    victim_size: int
    pids: set[int] = field(default_factory=set)
    errors_before: dict[str, int] = field(default_factory=dict)
    log_lines_before: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return nbd_address(self.server)

    def session(self, *, structured: bool = False) -> Peer:
        return session(self.address, self.victim, structured=structured)

    def begin(self) -> None:
        self.witness.assert_served()
        self.pids = set(self.server.worker_pids())
        assert self.pids, "no worker processes found"
        self.errors_before, _ = scrape(self.server)
        self.log_lines_before = len(self.server.lines)

    def new_errors(self) -> dict[str, int]:
        """Error counters that rose since :meth:`begin`, by how much."""
        errors, _ = scrape(self.server)
        return {
            kind: count - self.errors_before.get(kind, 0)
            for kind, count in errors.items()
            if count != self.errors_before.get(kind, 0)
        }

    def assert_unharmed(self) -> None:
        """The daemon, its workers and the well-behaved client are all fine."""
        server = self.server
        assert server.process is not None and server.process.poll() is None, (
            f"the daemon exited:\n{server.log}"
        )
        self.witness.assert_served()
        pids = set(server.worker_pids())
        assert pids == self.pids, (
            f"workers changed from {self.pids} to {pids}:\n{server.log}"
        )
        status, health = server.request("GET", "/v1/health")
        assert status == 200 and health["status"] == "ok", health
        # Every hostile peer is gone: only the well-behaved client is left.
        deadline = time.monotonic() + IO_TIMEOUT
        while (open_now := scrape(server)[1]) != 1:
            assert time.monotonic() < deadline, f"{open_now} connections left open"
            time.sleep(0.05)
        new_lines = server.lines[self.log_lines_before :]
        bad = [
            line
            for line in new_lines
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line
        ]
        assert not bad, "".join(bad)


@contextlib.contextmanager
def running_rig(
    tmp_path: Path, *, workers: int = 1, extra: list[str] | None = None
) -> Iterator[Rig]:
    """A fresh daemon with ``extra`` flags, checked unharmed at the end."""
    server = MemserverProcess(tmp_path, size="256M", workers=workers, extra=extra)
    server.start()
    try:
        witness_export = server.create_export(WITNESS_SIZE, "witness")
        victim = server.create_export(VICTIM_SIZE, "victim")
        witness = Witness(witness_export["uri"], WITNESS_SIZE)
        try:
            rig = Rig(
                server, witness, witness_export["name"], victim["name"], VICTIM_SIZE
            )
            rig.begin()
            yield rig
            rig.assert_unharmed()
        finally:
            witness.stop()
    finally:
        status = server.stop()
    assert status == 0, f"memserver exited with {status}:\n{server.log}"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MemserverProcess, Witness, str]]:
    """One default daemon (one worker) and its well-behaved client."""
    server = MemserverProcess(
        tmp_path_factory.mktemp("hostile"), size="256M", workers=1
    ).start()
    try:
        export = server.create_export(WITNESS_SIZE, "witness")
        witness = Witness(export["uri"], WITNESS_SIZE)
        try:
            yield server, witness, export["name"]
        finally:
            witness.stop()
    finally:
        status = server.stop()
    assert status == 0, f"memserver exited with {status}:\n{server.log}"


@pytest.fixture
def rig(daemon: tuple[MemserverProcess, Witness, str]) -> Iterator[Rig]:
    """A fresh export on the default daemon; the daemon is checked afterwards."""
    server, witness, witness_export = daemon
    victim = server.create_export(VICTIM_SIZE, "victim")
    state = Rig(server, witness, witness_export, victim["name"], VICTIM_SIZE)
    try:
        state.begin()
        yield state
        state.assert_unharmed()
    finally:
        server.delete_export(victim["name"])


# Handshake.


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_close_the_connection(rig: Rig, flags: int) -> None:
    with Peer(rig.address) as peer:
        peer.start(flags)
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_bad_option_magic_closes_the_connection(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send(OPTION_HEADER.pack(IHAVEOPT ^ 1, OPT_GO, 0))
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_options_without_fixed_newstyle_close_the_connection(rig: Rig) -> None:
    # A client that refused fixed newstyle may only send NBD_OPT_EXPORT_NAME.
    with Peer(rig.address) as peer:
        peer.start(flags=0)
        peer.send_option(OPT_LIST)
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_truncated_option_header_then_close(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send(OPTION_HEADER.pack(IHAVEOPT, OPT_GO, 100)[:11])
        peer.sock.shutdown(socket.SHUT_WR)
        peer.expect_closed()
    # The next client is served as if nothing happened.
    with rig.session() as peer:
        peer.write_and_read_back(1, 0, os.urandom(4096))


def test_truncated_option_data_then_close(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send(OPTION_HEADER.pack(IHAVEOPT, OPT_GO, 1000) + b"\0\0\0\x2b")
        peer.sock.shutdown(socket.SHUT_WR)
        peer.expect_closed()


@pytest.mark.parametrize(
    "option", [OPT_UNASSIGNED, 4, 0xFFFFFFFF], ids=["0x4242", "peek", "max"]
)
def test_unknown_option_is_refused_and_the_session_goes_on(
    rig: Rig, option: int
) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(option, b"whatever the client fancies")
        assert peer.expect_option_error(option, REP_ERR_UNSUP)
        go = peer.go(rig.victim)
        assert go.size == rig.victim_size
        peer.write_and_read_back(1, 4096, os.urandom(8192))


def test_starttls_is_refused_and_the_session_goes_on(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(OPT_STARTTLS)
        # NOTLS mode: ERR_UNSUP (or ERR_POLICY) is what the spec permits.
        assert peer.expect_option_error(OPT_STARTTLS, REP_ERR_UNSUP)
        peer.go(rig.victim)
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_list_is_refused_by_default(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(OPT_LIST)
        message = peer.expect_option_error(OPT_LIST, REP_ERR_POLICY)
        # Export names are access keys: the refusal must not leak one.
        assert rig.victim not in message and rig.witness_export not in message
        peer.go(rig.victim)
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_list_names_every_export_with_allow_list(tmp_path: Path) -> None:
    with (
        running_rig(tmp_path, extra=["--allow-list"]) as rig,
        Peer(rig.address) as peer,
    ):
        peer.start()
        peer.send_option(OPT_LIST, b"junk")
        assert peer.expect_option_error(OPT_LIST, REP_ERR_INVALID)

        peer.send_option(OPT_LIST)
        names = []
        while (reply := peer.read_option_reply()).reply != REP_ACK:
            assert (reply.option, reply.reply) == (OPT_LIST, REP_SERVER), reply
            (length,) = struct.unpack_from(">I", reply.data)
            assert length <= len(reply.data) - 4, reply
            names.append(reply.data[4 : 4 + length].decode())
        assert reply == OptionReply(OPT_LIST, REP_ACK, b"")
        assert sorted(names) == sorted([rig.victim, rig.witness_export])
        peer.go(rig.victim)
        peer.write_and_read_back(1, 0, os.urandom(512))


@pytest.mark.parametrize("option", [OPT_GO, OPT_UNASSIGNED], ids=["go", "unknown"])
def test_oversized_option_data_is_refused_and_skipped(rig: Rig, option: int) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        # The data looks like more options: a server that parsed skipped
        # data would answer them, or choke on them.
        fake = OPTION_HEADER.pack(IHAVEOPT, OPT_LIST, 0)
        data = (fake * (MiB // len(fake) + 1))[:MiB]
        peer.send_option(option, data)
        assert peer.expect_option_error(option, REP_ERR_TOO_BIG)
        go = peer.go(rig.victim)
        assert go.size == rig.victim_size
        peer.write_and_read_back(1, 0, os.urandom(4096))


def test_option_declaring_4_gib_is_refused_before_its_data(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        # Only the header: the refusal must not wait for (or buffer) the data.
        peer.send(OPTION_HEADER.pack(IHAVEOPT, OPT_GO, 0xFFFFFFFF))
        assert peer.expect_option_error(OPT_GO, REP_ERR_TOO_BIG)
        peer.send(os.urandom(MiB))
    rig.witness.assert_served()


@pytest.mark.parametrize(
    ("option", "data"),
    [
        (OPT_GO, b"\0\0"),  # shorter than a name length and a count
        (OPT_GO, struct.pack(">I", 1000) + b"name\0\0"),  # name overruns
        (OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 3) + b"\0\0"),  # count
        (OPT_GO, struct.pack(">I", 2) + b"\xff\xfe\0\0"),  # name not UTF-8
        (OPT_STRUCTURED_REPLY, b"\1"),  # takes no data
    ],
    ids=["short", "overrun", "count", "utf8", "structured"],
)
def test_malformed_option_data_is_invalid_and_the_session_goes_on(
    rig: Rig, option: int, data: bytes
) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(option, data)
        assert peer.expect_option_error(option, REP_ERR_INVALID)
        peer.go(rig.victim)
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_oversized_export_name_closes_the_connection(rig: Rig) -> None:
    # EXPORT_NAME has no error reply: hanging up is the only refusal.
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(OPT_EXPORT_NAME, b"x" * MiB)
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_export_name_of_an_unknown_export_closes_the_connection(rig: Rig) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(OPT_EXPORT_NAME, rig.victim[:-1].encode())
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}
    # The same option with the right name enters transmission.
    with Peer(rig.address) as peer:
        peer.start()
        peer.send_option(OPT_EXPORT_NAME, rig.victim.encode())
        size, flags = struct.unpack(">QH", peer.read_exact(10))
        assert size == rig.victim_size and flags & 1
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_go_of_an_unknown_export_is_refused_and_the_session_goes_on(
    rig: Rig,
) -> None:
    with Peer(rig.address) as peer:
        peer.start()
        for name in ("", rig.victim[:-1], rig.victim + "x", "\u00e9" * 2000):
            encoded = name.encode()
            peer.send_option(
                OPT_GO, struct.pack(">I", len(encoded)) + encoded + b"\0\0"
            )
            message = peer.expect_option_error(OPT_GO, REP_ERR_UNKNOWN)
            assert rig.victim not in message
        peer.go(rig.victim)
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_endless_option_haggling_is_cut_off(rig: Rig) -> None:
    # The spec lets a server hang up on a client that only wastes its time.
    with Peer(rig.address) as peer:
        peer.start()
        refused = 0
        while refused < 5000:
            peer.send_option(OPT_UNASSIGNED)
            try:
                peer.expect_option_error(OPT_UNASSIGNED, REP_ERR_UNSUP)
            except (PeerClosed, ConnectionResetError):
                break
            refused += 1
        else:
            raise AssertionError("5000 refused options and the server still listens")
        assert refused > 20, f"cut off after only {refused} options"
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_idle_handshake_is_closed_after_the_timeout(tmp_path: Path) -> None:
    with running_rig(tmp_path, extra=["--handshake-timeout", "0.5"]) as rig:
        started = time.monotonic()
        silent = Peer(rig.address)
        stalling = Peer(rig.address)
        finished = Peer(rig.address)
        with silent, stalling, finished:
            silent.greeting()
            # A client that haggles a little and then stalls is no better.
            stalling.start()
            stalling.send_option(OPT_UNASSIGNED)
            stalling.expect_option_error(OPT_UNASSIGNED, REP_ERR_UNSUP)
            finished.start()
            finished.go(rig.victim)

            silent.expect_closed()
            stalling.expect_closed()
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 5, f"closed after {elapsed:.2f}s"
            # The timeout is for the handshake only.
            time.sleep(1.0)
            finished.write_and_read_back(1, 0, os.urandom(4096))
        assert rig.new_errors() == {"handshake_timeout": 2}


@pytest.mark.parametrize("workers", [1, 2])
def test_connections_over_the_limit_are_refused(tmp_path: Path, workers: int) -> None:
    limit = 4
    with running_rig(
        tmp_path, workers=workers, extra=["--max-connections", str(limit)]
    ) as rig:
        # The kernel hands each connection to whichever worker accepts first,
        # so the limit is tried several times over.
        for trial in range(10):
            peers = []
            try:
                # The well-behaved client holds one of the connections.
                for index in range(limit - 1):
                    peer = Peer(rig.address)
                    peers.append(peer)
                    try:
                        peer.greeting()
                    except (PeerClosed, ConnectionResetError):
                        said = [x for x in rig.server.lines if "refusing" in x]
                        raise AssertionError(
                            f"trial {trial}: connection {index + 2} of {limit} "
                            f"was refused; the daemon said: {said[-1:]}"
                        ) from None
                with Peer(rig.address) as extra:
                    extra.expect_closed()
                for handle, peer in enumerate(peers):
                    peer.send(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE))
                    peer.go(rig.victim)
                    peer.write_and_read_back(handle * 2, handle * 4096, b"%d" % trial)
            finally:
                for peer in peers:
                    peer.close()
            rig.witness.assert_served()
            deadline = time.monotonic() + IO_TIMEOUT
            while scrape(rig.server)[1] != 1:
                assert time.monotonic() < deadline, "closed peers still counted"
                time.sleep(0.02)
        assert rig.new_errors() == {"connection_refused": 10}


# Transmission.

MODES = pytest.mark.parametrize("structured", [False, True], ids=["simple", "sr"])


@MODES
def test_read_past_the_end_is_einval(rig: Rig, structured: bool) -> None:
    size = rig.victim_size
    with rig.session(structured=structured) as peer:
        for handle, (offset, length) in enumerate(
            [(size - 4096, 8192), (size, 1), (2**64 - 512, 1024), (2**63, 4096)],
            start=0xDEAD0000,
        ):
            peer.request(CMD_READ, handle, offset, length)
            message = peer.expect_error(handle, EINVAL)
            assert not structured or "past" in message
        peer.write_and_read_back(1, size - 4096, os.urandom(4096))
    assert rig.new_errors() == {"einval": 4}


@MODES
def test_write_past_the_end_is_enospc_and_its_payload_skipped(
    rig: Rig, structured: bool
) -> None:
    size = rig.victim_size
    with rig.session(structured=structured) as peer:
        peer.request(CMD_WRITE, 7, size - 4096, 8192, payload=disc_filler(8192))
        peer.expect_error(7, ENOSPC)
        peer.request(CMD_WRITE, 8, 2**63, 4096, payload=disc_filler(4096))
        peer.expect_error(8, ENOSPC)
        peer.request(CMD_TRIM, 9, size, 4096)
        peer.expect_error(9, ENOSPC)
        # The payload was skipped, not parsed: the next request is served.
        peer.write_and_read_back(10, size - 4096, os.urandom(4096))
    assert rig.new_errors() == {"enospc": 3}


@MODES
def test_oversized_read_is_eoverflow(rig: Rig, structured: bool) -> None:
    with rig.session(structured=structured) as peer:
        peer.request(CMD_READ, 1, 0, OVERSIZED)
        message = peer.expect_error(1, EOVERFLOW)
        assert not structured or str(MAX_PAYLOAD) in message
        peer.request(CMD_READ, 2, 0, 0xFFFFFFFF)
        peer.expect_error(2, EOVERFLOW)
        # The largest allowed read still works on the same connection.
        peer.request(CMD_READ, 3, 0, MAX_PAYLOAD)
        assert len(peer.expect_data(3, 0, MAX_PAYLOAD)) == MAX_PAYLOAD
    assert rig.new_errors() == {"eoverflow": 2}


@MODES
def test_oversized_write_is_eoverflow_and_writes_nothing(
    rig: Rig, structured: bool
) -> None:
    before = os.urandom(MiB)
    with rig.session(structured=structured) as peer:
        peer.write_and_read_back(1, 0, before)
        peer.request(CMD_WRITE, 3, 0, OVERSIZED, payload=disc_filler(OVERSIZED))
        peer.expect_error(3, EOVERFLOW)
        peer.request(CMD_READ, 4, 0, MiB)
        assert peer.expect_data(4, 0, MiB) == before, "refused write changed data"
        peer.write_and_read_back(5, MiB, os.urandom(MiB))
    assert rig.new_errors() == {"eoverflow": 1}


@MODES
def test_unknown_commands_are_einval(rig: Rig, structured: bool) -> None:
    commands = [CMD_BLOCK_STATUS, 8, 9, 0x1234, 0xFFFF]
    with rig.session(structured=structured) as peer:
        for cmd in commands:
            handle = 0xC0FFEE0000000000 | cmd
            peer.request(cmd, handle, 0, 4096)
            peer.expect_error(handle, EINVAL)
        peer.write_and_read_back(1, 0, os.urandom(4096))
    assert rig.new_errors() == {"einval": len(commands)}


@MODES
def test_bad_command_flags_are_einval(rig: Rig, structured: bool) -> None:
    with rig.session(structured=structured) as peer:
        peer.request(CMD_READ, 1, 0, 4096, flags=1 << 15)
        peer.expect_error(1, EINVAL)
        peer.request(CMD_READ, 2, 0, 4096, flags=CMD_FLAG_NO_HOLE)
        peer.expect_error(2, EINVAL)
        peer.request(CMD_FLUSH, 3, 0, 0, flags=0xFFFF)
        peer.expect_error(3, EINVAL)
        # A refused write's payload is skipped as well.
        peer.request(
            CMD_WRITE, 4, 0, 4096, flags=CMD_FLAG_NO_HOLE, payload=disc_filler(4096)
        )
        peer.expect_error(4, EINVAL)
        # FUA is valid on every command once the server advertises it.
        peer.request(CMD_FLUSH, 5, 0, 0, flags=CMD_FLAG_FUA)
        peer.expect_ok(5)
        peer.write_and_read_back(6, 0, os.urandom(4096))
    assert rig.new_errors() == {"einval": 4}


@MODES
def test_zero_length_requests_are_einval(rig: Rig, structured: bool) -> None:
    with rig.session(structured=structured) as peer:
        for handle, cmd in enumerate((CMD_READ, CMD_WRITE, CMD_TRIM), start=1):
            peer.request(cmd, handle, 4096, 0)
            peer.expect_error(handle, EINVAL)
        peer.write_and_read_back(9, 4096, os.urandom(4096))
    assert rig.new_errors() == {"einval": 3}


def test_misaligned_requests_are_einval(tmp_path: Path) -> None:
    with running_rig(tmp_path, extra=["--min-block-size", "512"]) as rig:
        for structured in (False, True):
            with rig.session(structured=structured) as peer:
                peer.request(CMD_READ, 1, 1, 512)
                peer.expect_error(1, EINVAL)
                peer.request(CMD_READ, 2, 0, 100)
                peer.expect_error(2, EINVAL)
                peer.request(CMD_WRITE, 3, 512, 100, payload=disc_filler(100))
                peer.expect_error(3, EINVAL)
                peer.request(CMD_TRIM, 4, 256, 512)
                peer.expect_error(4, EINVAL)
                peer.write_and_read_back(5, 512, os.urandom(1024))
        assert rig.new_errors() == {"einval": 8}
        # The constraint is announced, so well-behaved clients never hit it.
        with Peer(rig.address) as peer:
            peer.start()
            assert peer.go(rig.victim).block_sizes == (512, 4096, MAX_PAYLOAD)


@MODES
def test_bad_request_magic_closes_the_connection(rig: Rig, structured: bool) -> None:
    with rig.session(structured=structured) as peer:
        peer.write_and_read_back(1, 0, os.urandom(512))
        peer.send(REQUEST.pack(REQUEST_MAGIC ^ 0x100, 0, CMD_READ, 3, 0, 512))
        peer.expect_closed()
    assert rig.new_errors() == {"protocol": 1}


def test_truncated_request_header_then_close(rig: Rig) -> None:
    with rig.session() as peer:
        peer.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:17])
        peer.sock.shutdown(socket.SHUT_WR)
        peer.expect_closed()
    with rig.session() as peer:
        peer.write_and_read_back(1, 0, os.urandom(512))


def test_client_vanishing_mid_write_payload(rig: Rig) -> None:
    length = 4 * MiB
    with rig.session() as peer:
        peer.request(CMD_WRITE, 1, 0, length, payload=os.urandom(length // 2))
        peer.sock.shutdown(socket.SHUT_WR)
        peer.expect_closed()
    assert rig.new_errors() == {"truncated_payload": 1}
    # The half-written range is usable by the next client.
    with rig.session() as peer:
        peer.write_and_read_back(1, 0, os.urandom(length))


def test_flood_of_reads_never_collected_keeps_memory_bounded(rig: Rig) -> None:
    requests = 5000
    limit_kib = 200 * 1024
    pids = set(rig.server.worker_pids())
    with rig.session() as flood:
        baseline = rss_anon_kib(pids)
        # 5000 x 32 MiB = 160 GiB of replies nobody reads.  The requests
        # themselves are small enough to sit in the socket buffers.
        flood.send(
            b"".join(
                REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, handle, 0, MAX_PAYLOAD)
                for handle in range(requests)
            )
        )
        rounds = rig.witness.rounds
        peak = baseline
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            peak = max(peak, rss_anon_kib(pids))
            # Stop early rather than let an unbounded server eat the host.
            assert peak - baseline < limit_kib, (
                f"workers grew by {(peak - baseline) // 1024} MiB with the "
                "flood's replies unread"
            )
            time.sleep(0.05)
        # Everyone else is served meanwhile, new connections included.
        assert rig.witness.rounds - rounds >= 20, "the well-behaved client starved"
        rig.witness.assert_served()
        with rig.session(structured=True) as other:
            other.write_and_read_back(1, 32 * MiB, os.urandom(MiB))
        # And the flooding connection itself is answered in order.
        for handle in range(2):
            assert len(flood.expect_data(handle, 0, MAX_PAYLOAD)) == MAX_PAYLOAD
        peak = max(peak, rss_anon_kib(pids))
    assert peak - baseline < limit_kib
    print(f"worker RssAnon: baseline {baseline} KiB, peak {peak} KiB")


def test_deleting_an_export_ends_a_stalled_reader(rig: Rig) -> None:
    doomed = rig.server.create_export(VICTIM_SIZE, "doomed")
    with session(rig.address, doomed["name"], structured=False) as stalled:
        stalled.send(
            b"".join(
                REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, handle, 0, MAX_PAYLOAD)
                for handle in range(100)
            )
        )
        time.sleep(0.5)  # the server is now stuck on a full socket
        started = time.monotonic()
        rig.server.delete_export(doomed["name"])
        assert time.monotonic() - started < 5, "delete waited for a stalled client"
        # What was in flight drains, then the connection ends.
        received = 0
        stalled.sock.settimeout(IO_TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            while chunk := stalled.sock.recv(4 * MiB):
                received += len(chunk)
        assert received < 100 * MAX_PAYLOAD
