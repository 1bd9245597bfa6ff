"""The server side of the NBD protocol as an I/O-free state machine.

Theory of operation
-------------------
A :class:`ServerConnection` is fed the bytes a client sent
(:meth:`~ServerConnection.receive_data`) and hands back events
(:meth:`~ServerConnection.next_event`).  It never touches a socket, a clock or
the export's memory, so it runs the same under asyncio, in a thread, or in a
unit test that wires it to a client in memory.

The connection goes through three phases:

``HANDSHAKE``
    The fixed newstyle negotiation.  The machine answers options itself,
    asking the ``lookup`` callable about export names; the answers are queued
    and collected with :meth:`~ServerConnection.data_to_send`.  It ends with a
    :class:`HandshakeDone` event naming the export, or an :class:`Aborted`
    event.

``TRANSMISSION``
    Each request header is checked against the export and the negotiated
    limits.  A valid request becomes a :class:`Command`; a bad one becomes a
    :class:`Rejected` carrying the spec's error, and the connection goes on.
    A write yields :class:`Write`, then its payload as :class:`WriteData`
    chunks, then :class:`WriteDone`.  The transport may instead move payload
    bytes itself, straight into the export (:meth:`payload_target` and
    :meth:`payload_received`), which spares a copy on large writes.

``CLOSED``
    After ``NBD_CMD_DISC``, an abort, or a protocol violation
    (:class:`~memserver.nbd.errors.ProtocolError`); nothing more is accepted.

Replies in the transmission phase are built by the encoders at the bottom of
the class; which shape a reply takes (simple or structured) depends only on
what was negotiated.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from memserver.nbd import proto
from memserver.nbd.errors import OptionError, ProtocolError

DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
DEFAULT_PREFERRED_BLOCK = 4096
# Option data above this is refused unread; the largest valid option (INFO or
# GO with a 4096-byte name and every info type) is far smaller.
MAX_OPTION_LENGTH = 16 * 1024
# A client that keeps haggling past this many options is not negotiating.
MAX_OPTIONS = 128

TRANSMISSION_FLAGS = (
    proto.FLAG_HAS_FLAGS
    | proto.FLAG_SEND_FLUSH
    | proto.FLAG_SEND_FUA
    | proto.FLAG_SEND_TRIM
    | proto.FLAG_SEND_WRITE_ZEROES
    | proto.FLAG_SEND_FAST_ZERO
    | proto.FLAG_SEND_CACHE
    | proto.FLAG_CAN_MULTI_CONN
)

# The command flags each supported command accepts.  FUA is valid on every
# command once SEND_FUA is advertised (the spec asks servers to accept it).
ALLOWED_FLAGS = {
    proto.CMD_READ: proto.CMD_FLAG_FUA,
    proto.CMD_WRITE: proto.CMD_FLAG_FUA,
    proto.CMD_DISC: proto.CMD_FLAG_FUA,
    proto.CMD_FLUSH: proto.CMD_FLAG_FUA,
    proto.CMD_TRIM: proto.CMD_FLAG_FUA,
    proto.CMD_CACHE: proto.CMD_FLAG_FUA,
    proto.CMD_WRITE_ZEROES: (
        proto.CMD_FLAG_FUA | proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FAST_ZERO
    ),
}

# Commands that change data report a range past the end as ENOSPC, the others
# as EINVAL, as the spec recommends.
WRITING_COMMANDS = frozenset({proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES})


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about an export."""

    name: str
    size: int
    description: str = ""


@dataclass(frozen=True)
class Limits:
    """Negotiation policy and the request limits a server enforces.

    ``min_block`` of 1 accepts any alignment (memory has no sectors); a larger
    power of two makes misaligned requests fail with EINVAL.  ``allow_list``
    lets ``NBD_OPT_LIST`` reveal export names, which are the capabilities that
    open them, so it is off unless an operator turns it on.
    """

    min_block: int = 1
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_payload: int = DEFAULT_MAX_PAYLOAD
    allow_list: bool = False

    def __post_init__(self) -> None:
        for name in ("min_block", "preferred_block", "max_payload"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, not {value}")
        if self.max_payload > 0xFFFFFFFF:
            # INFO_BLOCK_SIZE and the request length are 32-bit fields.
            raise ValueError(
                f"max_payload must be at most 2 GiB, not {self.max_payload}"
            )
        if not self.min_block <= self.preferred_block <= self.max_payload:
            raise ValueError("block sizes must satisfy min <= preferred <= max")


# Events.  Slots keep the per-request allocations small.


@dataclass(slots=True)
class HandshakeDone:
    """Negotiation finished; requests for ``export`` follow."""

    export: ExportInfo
    structured: bool


@dataclass(slots=True)
class Aborted:
    """The client ended the negotiation (NBD_OPT_ABORT)."""


@dataclass(slots=True)
class Command:
    """A valid request without payload: read, flush, trim, zero or cache."""

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int


@dataclass(slots=True)
class Write:
    """A valid write of ``length`` bytes at ``offset``.

    When the whole payload had already arrived, ``data`` holds it (valid only
    until the next call into the connection, like :class:`WriteData`) and the
    write is complete: acknowledge it.  Otherwise ``data`` is None and the
    payload follows as :class:`WriteData` events, then :class:`WriteDone`.
    """

    flags: int
    handle: int
    offset: int
    length: int
    data: memoryview | None = None


@dataclass(slots=True)
class WriteData:
    """Payload bytes of the current write, to be stored at ``offset``.

    ``data`` points into the connection's receive buffer and is valid only
    until the next call into the connection: copy it out, then let it go.
    """

    offset: int
    data: memoryview


@dataclass(slots=True)
class WriteDone:
    """All of a write's payload has arrived; acknowledge it."""

    flags: int
    handle: int
    offset: int
    length: int


@dataclass(slots=True)
class Rejected:
    """A request that fails with ``error``; its payload, if any, was skipped."""

    cmd: int
    handle: int
    error: int
    message: str


@dataclass(slots=True)
class Disconnect:
    """The client asked to end the session (NBD_CMD_DISC)."""


Event = (
    HandshakeDone
    | Aborted
    | Command
    | Write
    | WriteData
    | WriteDone
    | Rejected
    | Disconnect
)

Lookup = Callable[[str], ExportInfo | None]
Catalogue = Callable[[], list[ExportInfo]]


class ServerConnection:
    """One client's NBD session, from greeting to disconnect, without I/O.

    ``lookup`` resolves an export name to an :class:`ExportInfo` or ``None``;
    ``catalogue`` lists exports for ``NBD_OPT_LIST`` when ``limits`` allow it.
    """

    def __init__(
        self,
        lookup: Lookup,
        *,
        limits: Limits | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.phase = Phase.HANDSHAKE
        self.export: ExportInfo | None = None
        self.structured = False
        self._lookup = lookup
        self._catalogue = catalogue
        self._buffer = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._greeted = False
        self._fixed_newstyle = False
        self._no_zeroes = False
        self._options_seen = 0
        # Payload of the current write: bytes still to come, where they go,
        # and, for a refused write, the rejection to report once skipped.
        self._payload_left = 0
        self._payload_offset = 0
        self._payload_write: Write | None = None
        self._payload_rejected: Rejected | None = None
        self._transmission_flags = TRANSMISSION_FLAGS

    # Input.

    def initiate(self) -> bytes:
        """Return the server's greeting, the first bytes of every session."""
        return proto.GREETING.pack(
            proto.NBDMAGIC,
            proto.IHAVEOPT,
            proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES,
        )

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes that arrived from the client."""
        if self.phase is Phase.CLOSED:
            raise ProtocolError("data received after the session ended")
        if self._pos and self._pos == len(self._buffer):
            self._buffer.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def data_to_send(self) -> bytes:
        """Collect the handshake replies produced so far."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        """Return the next event, or None when more bytes are needed.

        Raises :class:`ProtocolError` when the client broke the protocol; the
        caller then drops the connection.
        """
        try:
            if self.phase is Phase.TRANSMISSION:
                return self._next_request_event()
            if self.phase is Phase.HANDSHAKE:
                return self._next_handshake_event()
            return None
        except ProtocolError:
            self.phase = Phase.CLOSED
            raise

    # Direct payload placement, for transports that receive into the export.

    def payload_target(self) -> tuple[int, int] | None:
        """Where the next payload bytes belong, if the transport may put them.

        Returns ``(offset, length)`` in the export when a valid write is
        waiting for payload and no buffered bytes come first; the transport
        may then receive up to ``length`` bytes straight into the export at
        ``offset`` and report them with :meth:`payload_received`.
        """
        if (
            self._payload_write is None
            or self._payload_left == 0
            or self._pos != len(self._buffer)
        ):
            return None
        return self._payload_offset, self._payload_left

    def payload_received(self, count: int) -> None:
        """Account for ``count`` payload bytes the transport placed itself."""
        target = self.payload_target()
        if target is None or not 0 < count <= target[1]:
            raise ValueError(f"no room for {count} payload bytes at this point")
        self._payload_left -= count
        self._payload_offset += count

    # Handshake.

    def _take(self, count: int) -> bytes | None:
        if len(self._buffer) - self._pos < count:
            return None
        chunk = bytes(self._buffer[self._pos : self._pos + count])
        self._pos += count
        return chunk

    def _next_handshake_event(self) -> Event | None:
        if not self._greeted:
            raw = self._take(proto.CLIENT_FLAGS.size)
            if raw is None:
                return None
            (flags,) = proto.CLIENT_FLAGS.unpack(raw)
            if flags & ~proto.KNOWN_CLIENT_FLAGS:
                raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
            self._greeted = True
            self._fixed_newstyle = bool(flags & proto.FLAG_C_FIXED_NEWSTYLE)
            self._no_zeroes = bool(flags & proto.FLAG_C_NO_ZEROES)
        while True:
            if self._payload_left:
                # Data of a refused, oversized option: drop what has come.
                dropped = min(self._payload_left, len(self._buffer) - self._pos)
                self._pos += dropped
                self._payload_left -= dropped
                if self._payload_left:
                    return None
            available = len(self._buffer) - self._pos
            if available < proto.OPTION_HEADER.size:
                return None
            magic, option, length = proto.OPTION_HEADER.unpack_from(
                self._buffer, self._pos
            )
            if magic != proto.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if (
                length <= MAX_OPTION_LENGTH
                and available < proto.OPTION_HEADER.size + length
            ):
                # Wait for the whole option before counting it: a client whose
                # option arrives in many pieces is still sending one option.
                return None
            self._options_seen += 1
            if self._options_seen > MAX_OPTIONS:
                raise ProtocolError(f"more than {MAX_OPTIONS} options in one session")
            if length > MAX_OPTION_LENGTH:
                if option == proto.OPT_EXPORT_NAME or not self._fixed_newstyle:
                    raise ProtocolError(f"option {option} of {length} bytes is too big")
                # Refuse without reading: the data is skipped as payload.
                self._pos += proto.OPTION_HEADER.size
                self._skip_option_data(length)
                self._reply_error(
                    option,
                    proto.REP_ERR_TOO_BIG,
                    f"option data of {length} bytes exceeds {MAX_OPTION_LENGTH}",
                )
                # Options already buffered behind the skipped data are due now.
                continue
            self._pos += proto.OPTION_HEADER.size
            data = self._take(length)
            assert data is not None
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _skip_option_data(self, length: int) -> None:
        available = len(self._buffer) - self._pos
        if length <= available:
            self._pos += length
            return
        self._pos = len(self._buffer)
        # The rest is dropped as it arrives, never buffered.
        self._payload_left = length - available

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if not self._fixed_newstyle and option != proto.OPT_EXPORT_NAME:
            raise ProtocolError(
                f"option {option} needs fixed newstyle, which the client refused"
            )
        try:
            if option == proto.OPT_EXPORT_NAME:
                return self._option_export_name(data)
            if option == proto.OPT_ABORT:
                self._reply(option, proto.REP_ACK)
                self.phase = Phase.CLOSED
                return Aborted()
            if option == proto.OPT_LIST:
                self._option_list(data)
            elif option in (proto.OPT_INFO, proto.OPT_GO):
                return self._option_info(option, data)
            elif option == proto.OPT_STRUCTURED_REPLY:
                if data:
                    raise OptionError(
                        proto.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data"
                    )
                self.structured = True
                self._reply(option, proto.REP_ACK)
            elif option == proto.OPT_STARTTLS:
                raise OptionError(
                    proto.REP_ERR_UNSUP, "TLS is not configured on this memserver"
                )
            else:
                raise OptionError(proto.REP_ERR_UNSUP, f"option {option} unsupported")
        except OptionError as e:
            self._reply_error(option, e.reply, e.message)
        return None

    def _option_export_name(self, data: bytes) -> Event:
        name = _decode_name(data)
        export = self._lookup(name) if name is not None else None
        if export is None:
            # EXPORT_NAME has no way to report an error but hanging up.
            raise ProtocolError("client asked for an unknown export")
        self._out += proto.EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags)
        if not self._no_zeroes:
            self._out += proto.EXPORT_NAME_PADDING
        return self._enter_transmission(export)

    def _option_list(self, data: bytes) -> None:
        if data:
            raise OptionError(proto.REP_ERR_INVALID, "LIST takes no data")
        if not self.limits.allow_list or self._catalogue is None:
            raise OptionError(
                proto.REP_ERR_POLICY, "listing exports is disabled on this server"
            )
        for export in self._catalogue():
            name = export.name.encode()
            payload = len(name).to_bytes(4, "big") + name
            self._reply(proto.OPT_LIST, proto.REP_SERVER, payload)
        self._reply(proto.OPT_LIST, proto.REP_ACK)

    def _option_info(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            raise OptionError(proto.REP_ERR_INVALID, "INFO/GO data is truncated")
        name_length = int.from_bytes(data[:4], "big")
        if name_length > len(data) - 6:
            raise OptionError(proto.REP_ERR_INVALID, "INFO/GO name overruns the data")
        name = _decode_name(data[4 : 4 + name_length])
        if name is None:
            raise OptionError(proto.REP_ERR_INVALID, "export name is not valid UTF-8")
        rest = data[4 + name_length :]
        count = int.from_bytes(rest[:2], "big")
        if len(rest) != 2 + 2 * count:
            raise OptionError(
                proto.REP_ERR_INVALID, "INFO/GO request list does not match its count"
            )
        requested = {
            int.from_bytes(rest[i : i + 2], "big") for i in range(2, len(rest), 2)
        }
        export = self._lookup(name)
        if export is None:
            raise OptionError(proto.REP_ERR_UNKNOWN, "no such export on this server")

        self._reply(
            option,
            proto.REP_INFO,
            proto.INFO_EXPORT_REPLY.pack(
                proto.INFO_EXPORT, export.size, self._transmission_flags
            ),
        )
        if proto.INFO_NAME in requested:
            self._reply(
                option,
                proto.REP_INFO,
                proto.INFO_NAME.to_bytes(2, "big") + export.name.encode(),
            )
        if proto.INFO_DESCRIPTION in requested and export.description:
            self._reply(
                option,
                proto.REP_INFO,
                proto.INFO_DESCRIPTION.to_bytes(2, "big") + _clip(export.description),
            )
        # Block sizes go out whether asked or not: a client that ignores them
        # still gets correct service, since min_block defaults to 1.
        limits = self.limits
        self._reply(
            option,
            proto.REP_INFO,
            proto.INFO_BLOCK_SIZE_REPLY.pack(
                proto.INFO_BLOCK_SIZE,
                limits.min_block,
                limits.preferred_block,
                limits.max_payload,
            ),
        )
        self._reply(option, proto.REP_ACK)
        if option == proto.OPT_GO:
            return self._enter_transmission(export)
        return None

    def _enter_transmission(self, export: ExportInfo) -> Event:
        self.export = export
        self.phase = Phase.TRANSMISSION
        return HandshakeDone(export, self.structured)

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += proto.OPTION_REPLY.pack(
            proto.OPTION_REPLY_MAGIC, option, reply, len(payload)
        )
        self._out += payload

    def _reply_error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode())

    # Transmission.

    def _next_request_event(self) -> Event | None:
        if self._payload_left:
            return self._next_payload_event()
        if self._payload_write is not None:
            write, self._payload_write = self._payload_write, None
            return WriteDone(write.flags, write.handle, write.offset, write.length)
        if self._payload_rejected is not None:
            rejected, self._payload_rejected = self._payload_rejected, None
            return rejected
        if len(self._buffer) - self._pos < proto.REQUEST.size:
            return None
        magic, flags, cmd, handle, offset, length = proto.REQUEST.unpack_from(
            self._buffer, self._pos
        )
        self._pos += proto.REQUEST.size
        if magic != proto.REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd == proto.CMD_DISC:
            self.phase = Phase.CLOSED
            return Disconnect()

        problem = self._check_request(cmd, flags, offset, length)
        if cmd == proto.CMD_WRITE:
            if problem is not None:
                self._payload_rejected = Rejected(cmd, handle, *problem)
                self._payload_left = length
                return self._next_request_event()
            start = self._pos
            if len(self._buffer) - start >= length:
                self._pos = start + length
                data = memoryview(self._buffer)[start : start + length]
                return Write(flags, handle, offset, length, data)
            write = Write(flags, handle, offset, length)
            self._payload_write = write
            self._payload_left = length
            self._payload_offset = offset
            return write
        if problem is not None:
            return Rejected(cmd, handle, *problem)
        return Command(cmd, flags, handle, offset, length)

    def _next_payload_event(self) -> Event | None:
        available = len(self._buffer) - self._pos
        if available == 0:
            return None
        count = min(available, self._payload_left)
        start = self._pos
        self._pos += count
        self._payload_left -= count
        if self._payload_write is None:
            # A refused write's payload, or an oversized option's data.
            return self.next_event()
        offset = self._payload_offset
        self._payload_offset += count
        return WriteData(offset, memoryview(self._buffer)[start : start + count])

    def _check_request(
        self, cmd: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """Return ``(error, message)`` if the request must be refused."""
        # The common case, a plain read or write in range, in one test.
        if (
            cmd <= proto.CMD_WRITE
            and not flags
            and 0 < length <= self.limits.max_payload
            and not (offset | length) & (self.limits.min_block - 1)
            and self.export is not None
            and offset + length <= self.export.size
        ):
            return None
        name = proto.CMD_NAMES.get(cmd, f"command {cmd}")
        allowed = ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return proto.EINVAL, f"{name} is not supported"
        if flags & ~allowed:
            return proto.EINVAL, f"flags {flags:#x} are not valid for {name}"
        if cmd == proto.CMD_FLUSH:
            if offset or length:
                return proto.EINVAL, "flush must have offset and length 0"
            return None
        if length == 0:
            return proto.EINVAL, f"{name} of length 0"
        limits = self.limits
        if cmd in (proto.CMD_READ, proto.CMD_WRITE) and length > limits.max_payload:
            return (
                proto.EOVERFLOW,
                f"{name} of {length} bytes exceeds the {limits.max_payload} limit",
            )
        if (offset | length) & (limits.min_block - 1):
            return (
                proto.EINVAL,
                f"{name} is not aligned to {limits.min_block} bytes",
            )
        assert self.export is not None
        if offset + length > self.export.size:
            error = proto.ENOSPC if cmd in WRITING_COMMANDS else proto.EINVAL
            return error, f"{name} ends past the export's {self.export.size} bytes"
        return None

    # Reply encoders for the transmission phase.

    def reply_ok(self, handle: int) -> bytes:
        """Success reply to a request without reply payload."""
        return proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read(self, handle: int, offset: int, length: int) -> bytes:
        """Header that precedes ``length`` bytes of read data."""
        if self.structured:
            return proto.OFFSET_DATA_HEADER.pack(
                proto.STRUCTURED_REPLY_MAGIC,
                proto.REPLY_FLAG_DONE,
                proto.REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + length,
                offset,
            )
        return proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """Error reply; structured (with the message) when negotiated."""
        if not self.structured:
            return proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, error, handle)
        text = _clip(message)
        return (
            proto.STRUCTURED_CHUNK.pack(
                proto.STRUCTURED_REPLY_MAGIC,
                proto.REPLY_FLAG_DONE,
                proto.REPLY_TYPE_ERROR,
                handle,
                proto.ERROR_PAYLOAD.size + len(text),
            )
            + proto.ERROR_PAYLOAD.pack(error, len(text))
            + text
        )


def _clip(text: str) -> bytes:
    # Cut at a character boundary: the spec wants valid UTF-8 on the wire.
    return text.encode()[: proto.MAX_STRING].decode(errors="ignore").encode()


def _decode_name(data: bytes) -> str | None:
    if len(data) > proto.MAX_STRING:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
