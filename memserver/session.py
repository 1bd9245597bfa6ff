"""Client sessions of a worker process: one thread per NBD connection.

Why threads and blocking sockets rather than an event loop: the expensive
parts of serving memory are system calls that move bytes, and a blocking call
moves a whole request at once with the GIL released.  A write's payload is
received straight into the export with one ``recv_into(MSG_WAITALL)``; a read
is answered with one ``sendmsg`` whose buffers are the reply header and a view
of the export, so large requests are never copied in user space and never
wait for an event loop.  Small requests are batched: everything one ``recv``
brought in is handled, and all the replies go out in one ``sendmsg``.
(Measured against an asyncio transport of the same state machine on this
kind of machine; see docs/performance.md.)

A blocked session costs a thread and nothing else: memory per connection is
bounded by the receive buffer, since replies are sent, never queued.

The per-request path logs nothing above DEBUG.  Counters are per session (one
writer each, no locks) and summed when the master asks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from memserver.admission import ConnectionTable
from memserver.nbd import proto
from memserver.nbd.errors import ProtocolError
from memserver.nbd.server import (
    Aborted,
    Command,
    Disconnect,
    ExportInfo,
    HandshakeDone,
    Limits,
    Rejected,
    ServerConnection,
    Write,
    WriteData,
    WriteDone,
)
from memserver.stats import RequestStats

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 256 * 1024
# Replies of at least this size go out as views of the export; smaller ones
# are joined with their neighbours.
ZERO_COPY_THRESHOLD = 64 * 1024
# sendmsg takes at most IOV_MAX (1024) buffers; flush well before.
MAX_IOVECS = 512
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_ZERO_VIEW = memoryview(bytes(1024 * 1024))


class Mapping(Protocol):
    """The memory behind an export, as the worker mapped it."""

    @property
    def view(self) -> memoryview: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class ServedExport:
    """An export as one worker serves it: its info, memory and sessions."""

    info: ExportInfo
    mapping: Mapping
    sessions: set[Session] = field(default_factory=set)


@dataclass
class WorkerContext:
    """What every session of a worker shares.

    ``lock`` guards the sets and the export table; sessions take it only to
    attach and detach, never per request.
    """

    exports: dict[str, ServedExport]
    limits: Limits
    admission: ConnectionTable
    index: int
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    sessions: set[Session] = field(default_factory=set)
    shutting_down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Counters of sessions that ended, and of refusals outside any session.
    retired: RequestStats = field(default_factory=RequestStats)
    connections_total: int = 0

    def lookup(self, name: str) -> ExportInfo | None:
        served = self.exports.get(name)
        return served.info if served is not None else None

    def catalogue(self) -> list[ExportInfo]:
        return [served.info for served in list(self.exports.values())]

    def snapshot(self) -> dict[str, object]:
        """Counters of every session, live and ended, summed."""
        with self.lock:
            total = RequestStats()
            total.add(self.retired)
            for session in self.sessions:
                total.add(session.stats)
            snapshot = total.snapshot()
            snapshot["connections"] = len(self.sessions)
            snapshot["connections_total"] = self.connections_total
        return snapshot

    def admit(self, sock: socket.socket, peer: str) -> Session | None:
        """Register a new connection, or refuse it (None) at the limit."""
        with self.lock:
            if self.shutting_down or not self.admission.admit(self.index):
                self.retired.error("connection_refused")
                refused = True
            else:
                session = Session(sock, self, peer)
                self.sessions.add(session)
                self.connections_total += 1
                refused = False
        if refused:
            log.warning(
                "refusing connection peer=%s open=%d limit=%d shutting_down=%s",
                peer,
                self.admission.total(),
                self.admission.limit,
                self.shutting_down,
            )
            return None
        return session

    def retire(self, session: Session) -> None:
        with self.lock:
            self.sessions.discard(session)
            self.admission.release(self.index)
            if session.served is not None:
                session.served.sessions.discard(session)
            self.retired.add(session.stats)


class Session:
    """One client connection, served by its own thread (:meth:`run`)."""

    def __init__(self, sock: socket.socket, context: WorkerContext, peer: str) -> None:
        self.sock = sock
        self.context = context
        self.peer = peer
        self.stats = RequestStats()
        self.conn = ServerConnection(
            context.lookup, limits=context.limits, catalogue=context.catalogue
        )
        self.served: ServedExport | None = None
        self.thread = threading.Thread(target=self.run, name=f"nbd {peer}", daemon=True)
        self._view: memoryview | None = None
        self._buffer = memoryview(bytearray(RECEIVE_BUFFER))
        self._write_started = 0

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        log.debug("connection opened peer=%s", self.peer)
        try:
            if self._handshake():
                self._transmission()
        except ProtocolError as e:
            self.stats.error("protocol")
            log.warning("dropping connection peer=%s reason=%s", self.peer, e)
        except TimeoutError:
            self.stats.error("handshake_timeout")
            log.warning(
                "handshake not finished in %.1fs, closing peer=%s",
                self.context.handshake_timeout,
                self.peer,
            )
        except OSError as e:
            # Reset by the peer, or shut down by the worker (export deleted,
            # worker stopping): either way this session is over.
            log.debug("connection ended peer=%s error=%s", self.peer, e)
        finally:
            self._view = None
            with contextlib.suppress(OSError):
                self.sock.close()
            self.context.retire(self)
            log.debug("connection closed peer=%s", self.peer)

    def shut_down(self) -> None:
        """Wake the session's thread and make it end (from another thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # Handshake: bounded in time, replies sent as they are produced.

    def _handshake(self) -> bool:
        sock = self.sock
        conn = self.conn
        deadline = time.monotonic() + self.context.handshake_timeout
        sock.sendall(conn.initiate())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            count = sock.recv_into(self._buffer)
            if count == 0:
                log.debug("client left during the handshake peer=%s", self.peer)
                return False
            conn.receive_data(self._buffer[:count])
            while (event := conn.next_event()) is not None:
                if isinstance(event, HandshakeDone):
                    sock.sendall(conn.data_to_send())
                    sock.settimeout(None)
                    return self._attach(event)
                if isinstance(event, Aborted):
                    sock.sendall(conn.data_to_send())
                    return False
            sock.sendall(conn.data_to_send())

    def _attach(self, event: HandshakeDone) -> bool:
        context = self.context
        with context.lock:
            served = context.exports.get(event.export.name)
            if served is None or context.shutting_down:
                # Deleted between the lookup and now: nothing to serve.
                raise ProtocolError("export went away during the handshake")
            served.sessions.add(self)
            self.served = served
            self._view = served.mapping.view
        log.debug("handshake done peer=%s structured=%s", self.peer, event.structured)
        return True

    # Transmission.

    def _transmission(self) -> None:
        sock = self.sock
        conn = self.conn
        buffer = self._buffer
        view = self._view
        assert view is not None
        while True:
            target = conn.payload_target()
            if target is not None:
                offset, length = target
                count = sock.recv_into(
                    view[offset : offset + length], length, socket.MSG_WAITALL
                )
                if count == 0:
                    self._vanished()
                    return
                conn.payload_received(count)
            else:
                count = sock.recv_into(buffer)
                if count == 0:
                    if conn.payload_target() is not None:
                        self._vanished()
                    return
                conn.receive_data(buffer[:count])
            if not self._process():
                return

    def _vanished(self) -> None:
        self.stats.error("truncated_payload")
        log.warning("client vanished mid-payload peer=%s", self.peer)

    def _process(self) -> bool:
        """Handle every complete event and send the replies; False to end."""
        conn = self.conn
        stats = self.stats
        out: list[bytes | bytearray | memoryview] = []
        small = bytearray()
        while (event := conn.next_event()) is not None:
            # Ordered by frequency: this loop is the per-request path.
            if isinstance(event, Command):
                self._execute(event, small, out)
            elif isinstance(event, Write):
                data = event.data
                if data is None:
                    self._write_started = time.perf_counter_ns()
                else:
                    started = time.perf_counter_ns()
                    self._store(event.offset, data)
                    small += conn.reply_ok(event.handle)
                    stats.record(
                        proto.CMD_WRITE, event.length, time.perf_counter_ns() - started
                    )
            elif isinstance(event, WriteData):
                self._store(event.offset, event.data)
            elif isinstance(event, WriteDone):
                small += conn.reply_ok(event.handle)
                stats.record(
                    proto.CMD_WRITE,
                    event.length,
                    time.perf_counter_ns() - self._write_started,
                )
            elif isinstance(event, Rejected):
                stats.request_error(event.error)
                log.debug(
                    "request refused peer=%s command=%s error=%d reason=%s",
                    self.peer,
                    proto.CMD_NAMES.get(event.cmd, event.cmd),
                    event.error,
                    event.message,
                )
                small += conn.reply_error(event.handle, event.error, event.message)
            elif isinstance(event, Disconnect):
                log.debug("client disconnected peer=%s", self.peer)
                self._send(out, small)
                return False
            if len(out) >= MAX_IOVECS:
                self._send(out, small)
                out = []
                small = bytearray()
        self._send(out, small)
        return True

    def _execute(
        self,
        command: Command,
        small: bytearray,
        out: list[bytes | bytearray | memoryview],
    ) -> None:
        started = time.perf_counter_ns()
        view = self._view
        assert view is not None
        cmd = command.cmd
        offset = command.offset
        length = command.length
        if cmd == proto.CMD_READ:
            small += self.conn.reply_read(command.handle, offset, length)
            if length >= ZERO_COPY_THRESHOLD:
                out.append(bytes(small))
                small.clear()
                out.append(view[offset : offset + length])
            else:
                small += view[offset : offset + length]
        else:
            if cmd in (proto.CMD_TRIM, proto.CMD_WRITE_ZEROES):
                # Trimmed ranges read back as zeroes too: the memory is
                # already ours, and stale data is never worth keeping.
                _zero(view, offset, length)
            small += self.conn.reply_ok(command.handle)
        self.stats.record(cmd, length, time.perf_counter_ns() - started)

    def _store(self, offset: int, data: memoryview) -> None:
        view = self._view
        assert view is not None
        view[offset : offset + len(data)] = data
        data.release()

    def _send(
        self, out: list[bytes | bytearray | memoryview], small: bytearray
    ) -> None:
        if small:
            out.append(small)
        if not out:
            return
        sock = self.sock
        sent = sock.sendmsg(out)
        total = sum(len(piece) for piece in out)
        if sent < total:
            # A signal or a full buffer cut the call short: send the rest.
            for piece in out:
                size = len(piece)
                if sent >= size:
                    sent -= size
                    continue
                sock.sendall(memoryview(piece)[sent:])
                sent = 0


def _zero(view: memoryview, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        step = min(len(_ZERO_VIEW), end - offset)
        view[offset : offset + step] = _ZERO_VIEW[:step]
        offset += step
