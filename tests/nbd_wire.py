"""The client side of the NBD wire protocol, for tests that play the client.

Encoders build what a client sends; decoders check what a server answers.
Everything here is written from the protocol spec (doc/proto.md of the
NetworkBlockDevice/nbd project) and shares nothing with
:mod:`memserver.nbd`, so a test that decodes the server's bytes with this
module checks the server against the spec, not against itself.

Decoders take bytes and return the decoded frame plus the bytes after it.
They raise :class:`Incomplete` when more bytes are needed, which lets a
raw-socket test read until a frame is whole::

    buf = b""
    while True:
        try:
            reply, buf = split_reply(buf)
            break
        except Incomplete:
            buf += sock.recv(4096)

Anything malformed raises :class:`WireError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

# Magic numbers.
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
FLAG_C_FIXED_NEWSTYLE = 0x1
FLAG_C_NO_ZEROES = 0x2

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_TOO_BIG = 0x80000009

# Information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 0x1
FLAG_READ_ONLY = 0x2
FLAG_SEND_FLUSH = 0x4
FLAG_SEND_FUA = 0x8
FLAG_ROTATIONAL = 0x10
FLAG_SEND_TRIM = 0x20
FLAG_SEND_WRITE_ZEROES = 0x40
FLAG_SEND_DF = 0x80
FLAG_CAN_MULTI_CONN = 0x100
FLAG_SEND_RESIZE = 0x200
FLAG_SEND_CACHE = 0x400
FLAG_SEND_FAST_ZERO = 0x800

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
CMD_FLAG_FUA = 0x1
CMD_FLAG_NO_HOLE = 0x2
CMD_FLAG_DF = 0x4
CMD_FLAG_REQ_ONE = 0x8
CMD_FLAG_FAST_ZERO = 0x10

# Structured reply chunks.
REPLY_FLAG_DONE = 0x1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = 0x8001

# Error values as the spec numbers them on the wire.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

GREETING_SIZE = 18
EXPORT_NAME_PADDING = 124

_OPTION = struct.Struct(">8sII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class WireError(ValueError):
    """The server's bytes do not follow the protocol."""


class Incomplete(WireError):
    """The bytes end before the frame does; read more and try again."""


def _need(data: bytes, size: int) -> None:
    if len(data) < size:
        raise Incomplete(f"need {size} bytes, have {len(data)}")


# Handshake.


def parse_greeting(data: bytes) -> int:
    """Check the newstyle greeting (exactly 18 bytes); return its flags."""
    _need(data, GREETING_SIZE)
    if len(data) != GREETING_SIZE:
        raise WireError(f"greeting is {len(data)} bytes, not {GREETING_SIZE}")
    if data[:8] != NBDMAGIC or data[8:16] != IHAVEOPT:
        raise WireError(f"not a newstyle greeting: {data[:16]!r}")
    return int.from_bytes(data[16:], "big")


def client_flags(flags: int) -> bytes:
    """The client's 32-bit flags, sent right after the greeting."""
    return flags.to_bytes(4, "big")


def option(code: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """An option request; ``length`` overrides the header's length field."""
    declared = len(data) if length is None else length
    return _OPTION.pack(IHAVEOPT, code, declared) + data


def info_request(name: str | bytes, infos: Iterable[int] = ()) -> bytes:
    """The data of an INFO or GO option: export name, then requested infos."""
    raw = name.encode() if isinstance(name, str) else name
    wanted = list(infos)
    return (
        len(raw).to_bytes(4, "big")
        + raw
        + len(wanted).to_bytes(2, "big")
        + b"".join(i.to_bytes(2, "big") for i in wanted)
    )


@dataclass(frozen=True)
class OptionReply:
    """One option reply: the option it answers, its type and its data."""

    option: int
    reply: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply & 0x80000000)


@dataclass(frozen=True)
class Info:
    """A decoded NBD_REP_INFO: ``kind`` is an INFO_* type, ``values`` its fields.

    INFO_EXPORT gives ``(size, transmission flags)``, INFO_NAME and
    INFO_DESCRIPTION a one-string tuple, INFO_BLOCK_SIZE
    ``(minimum, preferred, maximum)``.
    """

    kind: int
    values: tuple[int | str, ...]


def split_option_reply(data: bytes) -> tuple[OptionReply, bytes]:
    """Decode the option reply at the start of ``data``."""
    _need(data, _OPTION_REPLY.size)
    magic, code, reply, length = _OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise WireError(f"bad option reply magic {magic:#x}")
    end = _OPTION_REPLY.size + length
    _need(data, end)
    return OptionReply(code, reply, bytes(data[_OPTION_REPLY.size : end])), data[end:]


def option_replies(data: bytes) -> list[OptionReply]:
    """Decode a buffer holding whole option replies and nothing else."""
    replies = []
    while data:
        reply, data = split_option_reply(data)
        replies.append(reply)
    return replies


def decode_info(reply: OptionReply) -> Info:
    """Decode the payload of an NBD_REP_INFO reply."""
    if reply.reply != REP_INFO:
        raise WireError(f"reply type {reply.reply:#x} is not NBD_REP_INFO")
    _need(reply.data, 2)
    kind = int.from_bytes(reply.data[:2], "big")
    body = reply.data[2:]
    values: tuple[int | str, ...]
    if kind == INFO_EXPORT:
        if len(body) != 10:
            raise WireError(f"INFO_EXPORT of {len(body)} bytes")
        values = struct.unpack(">QH", body)
    elif kind in (INFO_NAME, INFO_DESCRIPTION):
        values = (body.decode(),)
    elif kind == INFO_BLOCK_SIZE:
        if len(body) != 12:
            raise WireError(f"INFO_BLOCK_SIZE of {len(body)} bytes")
        values = struct.unpack(">III", body)
    else:
        raise WireError(f"unknown info type {kind}")
    return Info(kind, values)


def parse_export_name_reply(data: bytes, *, zeroes: bool) -> tuple[int, int]:
    """Decode the whole answer to EXPORT_NAME; return (size, transmission flags).

    ``zeroes`` says whether the 124 bytes of padding must follow (they do
    unless both sides agreed on NO_ZEROES).
    """
    expected = 10 + (EXPORT_NAME_PADDING if zeroes else 0)
    _need(data, expected)
    if len(data) != expected:
        raise WireError(f"EXPORT_NAME reply is {len(data)} bytes, not {expected}")
    if any(data[10:]):
        raise WireError("EXPORT_NAME padding is not all zeroes")
    size, flags = struct.unpack_from(">QH", data)
    return size, flags


# Transmission.


def request(
    cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    """A request header; a write's payload is appended by the caller."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)


@dataclass(frozen=True)
class SimpleReply:
    """A simple reply; ``data`` is the payload of a successful read."""

    error: int
    handle: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    """One structured reply chunk."""

    flags: int
    type: int
    handle: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    def error(self) -> tuple[int, str]:
        """The (error, message) of an error chunk."""
        if not self.type & 0x8000:
            raise WireError(f"chunk type {self.type:#x} is not an error")
        _need(self.payload, 6)
        error, length = struct.unpack_from(">IH", self.payload)
        message = self.payload[6:]
        if len(message) < length:
            raise WireError("error message overruns its chunk")
        return error, message[:length].decode()

    def offset_data(self) -> tuple[int, bytes]:
        """The (offset, data) of an OFFSET_DATA chunk."""
        if self.type != REPLY_TYPE_OFFSET_DATA:
            raise WireError(f"chunk type {self.type:#x} is not OFFSET_DATA")
        _need(self.payload, 8)
        return int.from_bytes(self.payload[:8], "big"), self.payload[8:]


def split_reply(
    data: bytes, *, read_length: int = 0
) -> tuple[SimpleReply | Chunk, bytes]:
    """Decode the reply or chunk at the start of ``data``.

    A simple reply carries no length, so a successful simple reply to a read
    takes ``read_length`` bytes of data with it; pass the length the read
    asked for (0 for any other request).
    """
    _need(data, 4)
    magic = int.from_bytes(data[:4], "big")
    if magic == SIMPLE_REPLY_MAGIC:
        _need(data, _SIMPLE_REPLY.size)
        _, error, handle = _SIMPLE_REPLY.unpack_from(data)
        end = _SIMPLE_REPLY.size + (0 if error else read_length)
        _need(data, end)
        payload = bytes(data[_SIMPLE_REPLY.size : end])
        return SimpleReply(error, handle, payload), data[end:]
    if magic == STRUCTURED_REPLY_MAGIC:
        _need(data, _CHUNK.size)
        _, flags, kind, handle, length = _CHUNK.unpack_from(data)
        end = _CHUNK.size + length
        _need(data, end)
        return Chunk(flags, kind, handle, bytes(data[_CHUNK.size : end])), data[end:]
    raise WireError(f"bad reply magic {magic:#x}")
