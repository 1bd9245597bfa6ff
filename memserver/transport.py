"""asyncio transport around the NBD state machine, inside a worker process.

One :class:`NBDProtocol` per client connection.  It receives into a scratch
buffer, or, while a write's payload is streaming in, straight into the export's
memory, so large writes are never copied in user space.  Replies are gathered
while a batch of requests is processed and sent with as few system calls as
possible; reads of 64 KiB or more go out as views of the export, uncopied.

The per-request path logs nothing above DEBUG and allocates little: an event
object, a reply header, a view.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from memserver.nbd import proto
from memserver.nbd.errors import ProtocolError
from memserver.nbd.server import (
    Aborted,
    Command,
    Disconnect,
    ExportInfo,
    HandshakeDone,
    Limits,
    Phase,
    Rejected,
    ServerConnection,
    Write,
    WriteData,
    WriteDone,
)
from memserver.stats import RequestStats

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 256 * 1024
# Replies of at least this size are sent as views of the export; smaller
# ones are joined with their neighbours into one send.
ZERO_COPY_THRESHOLD = 64 * 1024
WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_ZERO_VIEW = memoryview(bytes(1024 * 1024))


class Mapping(Protocol):
    """The memory behind an export, as the worker mapped it."""

    @property
    def view(self) -> memoryview: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class ServedExport:
    """An export as one worker serves it: its info, memory and connections."""

    info: ExportInfo
    mapping: Mapping
    connections: set[NBDProtocol] = field(default_factory=set)


@dataclass
class WorkerContext:
    """What every connection of a worker shares."""

    exports: dict[str, ServedExport]
    stats: RequestStats
    limits: Limits
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int = 1024
    connections: set[NBDProtocol] = field(default_factory=set)
    shutting_down: bool = False

    def lookup(self, name: str) -> ExportInfo | None:
        served = self.exports.get(name)
        return served.info if served is not None else None

    def catalogue(self) -> list[ExportInfo]:
        return [served.info for served in self.exports.values()]


class NBDProtocol(asyncio.BufferedProtocol):
    """One NBD client connection."""

    def __init__(self, context: WorkerContext) -> None:
        self.context = context
        self.conn = ServerConnection(
            context.lookup, limits=context.limits, catalogue=context.catalogue
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.served: ServedExport | None = None
        self._view: memoryview | None = None
        self._buffer = memoryview(bytearray(RECEIVE_BUFFER))
        self._direct = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._started_ns = 0
        self._registered = False

    # asyncio callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        context = self.context
        self.peer = _peer_name(transport)
        stats = context.stats
        if context.shutting_down or len(context.connections) >= context.max_connections:
            stats.error("connection_refused")
            log.warning(
                "refusing connection peer=%s open=%d limit=%d shutting_down=%s",
                self.peer,
                len(context.connections),
                context.max_connections,
                context.shutting_down,
            )
            transport.abort()
            return
        context.connections.add(self)
        self._registered = True
        stats.connections += 1
        stats.connections_total += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            context.handshake_timeout, self._handshake_expired
        )
        log.debug("connection opened peer=%s", self.peer)
        transport.write(self.conn.initiate())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not self._registered:
            return
        self._registered = False
        self.context.connections.discard(self)
        self.context.stats.connections -= 1
        if self.served is not None:
            self.served.connections.discard(self)
        self.served = None
        self._view = None
        log.debug("connection closed peer=%s error=%s", self.peer, exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._view is not None:
            target = self.conn.payload_target()
            if target is not None:
                offset, length = target
                self._direct = True
                return self._view[offset : offset + length]
        self._direct = False
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct:
                self.conn.payload_received(nbytes)
            else:
                self.conn.receive_data(self._buffer[:nbytes])
            self._process()
        except ProtocolError as e:
            self._drop(str(e))

    def eof_received(self) -> bool:
        if self.conn.phase is Phase.TRANSMISSION and self.conn.payload_target():
            self.context.stats.error("truncated_payload")
            log.warning("client vanished mid-payload peer=%s", self.peer)
        return False

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.transport is not None and self._registered:
            self.transport.resume_reading()
            try:
                self._process()
            except ProtocolError as e:
                self._drop(str(e))

    # Request processing.

    def _process(self) -> None:
        """Handle every complete event, then send the replies in one go."""
        conn = self.conn
        transport = self.transport
        assert transport is not None
        out: list[bytes | memoryview] = []
        small = bytearray()
        queued = 0  # bytes of large reads waiting in ``out``
        stats = self.context.stats
        while not self._writing_paused:
            event = conn.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is Command:
                assert isinstance(event, Command)
                queued += self._execute(event, small, out)
            elif kind is WriteData:
                assert isinstance(event, WriteData) and self._view is not None
                data = event.data
                self._view[event.offset : event.offset + len(data)] = data
                data.release()
            elif kind is Write:
                self._started_ns = time.perf_counter_ns()
            elif kind is WriteDone:
                assert isinstance(event, WriteDone)
                small += conn.reply_ok(event.handle)
                stats.record(
                    proto.CMD_WRITE,
                    event.length,
                    time.perf_counter_ns() - self._started_ns,
                )
            elif kind is Rejected:
                assert isinstance(event, Rejected)
                stats.request_error(event.error)
                log.debug(
                    "request refused peer=%s command=%s error=%d reason=%s",
                    self.peer,
                    proto.CMD_NAMES.get(event.cmd, event.cmd),
                    event.error,
                    event.message,
                )
                small += conn.reply_error(event.handle, event.error, event.message)
            elif kind is HandshakeDone:
                assert isinstance(event, HandshakeDone)
                self._attach(event)
                small += conn.data_to_send()
            elif kind is Disconnect:
                log.debug("client disconnected peer=%s", self.peer)
                self._send(small, out)
                transport.close()
                self._view = None
                return
            elif kind is Aborted:
                small += conn.data_to_send()
                self._send(small, out)
                transport.close()
                return
            if len(small) + queued > WRITE_HIGH_WATER:
                # Bound what one batch can queue: send now, and let the
                # transport's flow control pause this loop if it must.
                self._send(small, out)
                small = bytearray()
                out = []
                queued = 0
        if conn.phase is Phase.HANDSHAKE:
            small += conn.data_to_send()
        self._send(small, out)
        if self._writing_paused:
            transport.pause_reading()

    def _execute(
        self, command: Command, small: bytearray, out: list[bytes | memoryview]
    ) -> int:
        """Run one command; return how many bytes it queued in ``out``."""
        started = time.perf_counter_ns()
        conn = self.conn
        view = self._view
        assert view is not None
        cmd = command.cmd
        queued = 0
        offset = command.offset
        length = command.length
        if cmd == proto.CMD_READ:
            small += conn.reply_read(command.handle, offset, length)
            if length >= ZERO_COPY_THRESHOLD:
                out.append(bytes(small))
                small.clear()
                out.append(view[offset : offset + length])
                queued = length
            else:
                small += view[offset : offset + length]
        else:
            if cmd in (proto.CMD_TRIM, proto.CMD_WRITE_ZEROES):
                # Trimmed ranges read back as zeroes too: the memory is
                # already ours, and stale data is never worth keeping.
                _zero(view, offset, length)
            small += conn.reply_ok(command.handle)
        self.context.stats.record(cmd, length, time.perf_counter_ns() - started)
        return queued

    def _send(self, small: bytearray, out: list[bytes | memoryview]) -> None:
        transport = self.transport
        assert transport is not None
        for piece in out:
            transport.write(piece)
        if small:
            transport.write(small)

    # Lifecycle.

    def _attach(self, event: HandshakeDone) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        served = self.context.exports.get(event.export.name)
        if served is None:
            # Deleted between the lookup and now: nothing to serve.
            raise ProtocolError("export vanished during the handshake")
        served.connections.add(self)
        self.served = served
        self._view = served.mapping.view
        log.debug(
            "handshake done peer=%s export=%s structured=%s",
            self.peer,
            event.export.name,
            event.structured,
        )

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self.context.stats.error("handshake_timeout")
        log.warning(
            "handshake not finished in %.1fs, closing peer=%s",
            self.context.handshake_timeout,
            self.peer,
        )
        self._abort()

    def _drop(self, reason: str) -> None:
        self.context.stats.error("protocol")
        log.warning("dropping connection peer=%s reason=%s", self.peer, reason)
        self._abort()

    def _abort(self) -> None:
        self._view = None
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> None:
        """Cut this connection off its export (the export is going away)."""
        self._abort()
        self.served = None


def _zero(view: memoryview, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        step = min(len(_ZERO_VIEW), end - offset)
        view[offset : offset + step] = _ZERO_VIEW[:step]
        offset += step


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


ProtocolFactory = Callable[[], NBDProtocol]
