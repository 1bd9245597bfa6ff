"""The NBD server state machine, driven in memory exactly as a client drives it.

Every test feeds :class:`ServerConnection` the bytes a client would send and
decodes what comes back with :mod:`tests.nbd_wire`, a client-side codec
written from the spec; nothing here decodes with the server's own encoders.
"""

from __future__ import annotations

import errno
import struct
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memserver.nbd import proto
from memserver.nbd.errors import ProtocolError
from memserver.nbd.server import (
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    Aborted,
    Command,
    Disconnect,
    Event,
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
from tests import nbd_wire as w

KiB = 1024
MiB = 1024 * KiB

DISK = ExportInfo("disk", MiB, "scratch RAM")
BARE = ExportInfo("bare", 64 * KiB)
LONG = ExportInfo("L" * 300, 64 * KiB, "an export with a long name")
# "é" is two bytes in UTF-8: a byte-wise cut at 4096 would split one in half.
WORDY = ExportInfo("wordy", MiB, "x" + "é" * 3000)
EXPORTS = {export.name: export for export in (DISK, BARE, LONG, WORDY)}

NEWSTYLE = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES
# What a memserver export offers, spelled with the spec's numbers.
EXPECTED_TRANSMISSION_FLAGS = (
    w.FLAG_HAS_FLAGS
    | w.FLAG_SEND_FLUSH
    | w.FLAG_SEND_FUA
    | w.FLAG_SEND_TRIM
    | w.FLAG_SEND_WRITE_ZEROES
    | w.FLAG_SEND_FAST_ZERO
    | w.FLAG_SEND_CACHE
    | w.FLAG_CAN_MULTI_CONN
)
DEFAULT_BLOCK_SIZES = (1, 4096, 32 * MiB)
# Limits small enough that an oversized write's payload is cheap to send.
SMALL_LIMITS = Limits(preferred_block=512, max_payload=4096)


class Client:
    """The client end of one in-memory session: it feeds and collects."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        catalogue: list[ExportInfo] | None = None,
    ) -> None:
        self.lookups: list[str] = []
        listing = None if catalogue is None else (lambda: list(catalogue))
        self.conn = ServerConnection(self._lookup, limits=limits, catalogue=listing)
        self.greeting = self.conn.initiate()

    def _lookup(self, name: str) -> ExportInfo | None:
        self.lookups.append(name)
        return EXPORTS.get(name)

    def send(self, data: bytes, *, step: int | None = None) -> list[Event]:
        """Feed ``data`` (in pieces of ``step`` bytes) and collect the events."""
        size = step or max(len(data), 1)
        events: list[Event] = []
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            self.conn.receive_data(piece)
            events += drain(self.conn, len(piece))
        return events

    def replies(self) -> list[w.OptionReply]:
        return w.option_replies(self.conn.data_to_send())

    def negotiate(self, *, structured: bool = False, export: str = "disk") -> None:
        data = w.client_flags(NEWSTYLE)
        if structured:
            data += w.option(w.OPT_STRUCTURED_REPLY)
        data += w.option(w.OPT_GO, w.info_request(export))
        assert self.send(data) == [HandshakeDone(EXPORTS[export], structured)]
        assert self.replies()[-1] == w.OptionReply(w.OPT_GO, w.REP_ACK, b"")
        assert self.conn.phase is Phase.TRANSMISSION


def drain(conn: ServerConnection, fed: int) -> list[Event]:
    """Collect events until the connection wants more bytes.

    Payload views are copied and released, as a transport must before its
    next call.  The bound turns a machine that never settles (which would
    hang its transport) into a failure.
    """
    events: list[Event] = []
    for _ in range(3 * fed + 8):
        event = conn.next_event()
        if event is None:
            return events
        if isinstance(event, WriteData):
            data = event.data
            event = WriteData(event.offset, memoryview(bytes(data)))
            data.release()
        elif isinstance(event, Write) and event.data is not None:
            data = event.data
            event = Write(
                event.flags,
                event.handle,
                event.offset,
                event.length,
                memoryview(bytes(data)),
            )
            data.release()
        events.append(event)
    pytest.fail(f"no end to the events after {fed} bytes: {events[-5:]}")


def mv(data: bytes) -> memoryview:
    return memoryview(data)


def raw_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply laid out by hand from the spec, for byte-exact checks."""
    return (
        bytes.fromhex("0003e889045565a9")
        + struct.pack(">III", option, reply, len(data))
        + data
    )


def error_text(reply: w.OptionReply) -> str:
    assert reply.is_error
    return reply.data.decode()


@pytest.fixture
def client() -> Client:
    session = Client()
    session.negotiate()
    return session


@pytest.fixture
def small() -> Client:
    session = Client(SMALL_LIMITS)
    session.negotiate()
    return session


# Greeting and client flags.


def test_greeting_offers_fixed_newstyle_and_no_zeroes() -> None:
    greeting = Client().greeting
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    assert w.parse_greeting(greeting) == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES


def test_nothing_happens_until_the_client_flags_are_whole() -> None:
    session = Client()
    assert session.conn.next_event() is None
    assert session.send(w.client_flags(NEWSTYLE)[:3]) == []
    assert session.send(w.client_flags(NEWSTYLE)[3:]) == []
    assert session.conn.data_to_send() == b""
    assert session.conn.phase is Phase.HANDSHAKE


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="unknown handshake flags"):
        session.send(w.client_flags(flags))
    assert session.conn.phase is Phase.CLOSED
    assert session.conn.next_event() is None
    assert session.conn.data_to_send() == b""


# NBD_OPT_EXPORT_NAME.


@pytest.mark.parametrize(
    ("flags", "zeroes"),
    [
        (NEWSTYLE, False),
        (w.FLAG_C_FIXED_NEWSTYLE, True),
        (0, True),
        (w.FLAG_C_NO_ZEROES, False),
    ],
)
def test_export_name_enters_transmission(flags: int, zeroes: bool) -> None:
    session = Client()
    events = session.send(w.client_flags(flags) + w.option(w.OPT_EXPORT_NAME, b"disk"))
    assert events == [HandshakeDone(DISK, False)]
    answer = session.conn.data_to_send()
    assert w.parse_export_name_reply(answer, zeroes=zeroes) == (
        MiB,
        EXPECTED_TRANSMISSION_FLAGS,
    )
    assert session.lookups == ["disk"]
    assert session.conn.phase is Phase.TRANSMISSION
    assert session.conn.export == DISK


def test_export_name_of_an_unknown_export_drops_the_connection() -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="unknown export"):
        session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_EXPORT_NAME, b"nope"))
    assert session.lookups == ["nope"]
    assert session.conn.data_to_send() == b""
    with pytest.raises(ProtocolError, match="after the session ended"):
        session.conn.receive_data(b"more")


@pytest.mark.parametrize("name", [b"\xff\xfe", b"d" * 4097], ids=["utf8", "long"])
def test_export_name_that_is_no_valid_name_is_never_looked_up(name: bytes) -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="unknown export"):
        session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_EXPORT_NAME, name))
    assert session.lookups == []


# NBD_OPT_ABORT.


def test_abort_is_acknowledged_and_ends_the_session() -> None:
    session = Client()
    events = session.send(
        w.client_flags(NEWSTYLE) + w.option(w.OPT_ABORT) + b"ignored after abort"
    )
    assert events == [Aborted()]
    assert session.conn.data_to_send() == raw_option_reply(w.OPT_ABORT, w.REP_ACK)
    assert session.conn.phase is Phase.CLOSED
    assert session.conn.next_event() is None
    with pytest.raises(ProtocolError, match="after the session ended"):
        session.conn.receive_data(b"x")


# NBD_OPT_LIST.


@pytest.mark.parametrize(
    ("limits", "catalogue"),
    [(None, [DISK]), (Limits(allow_list=True), None)],
    ids=["policy", "no-catalogue"],
)
def test_list_is_refused_unless_allowed_and_possible(
    limits: Limits | None, catalogue: list[ExportInfo] | None
) -> None:
    session = Client(limits, catalogue=catalogue)
    assert session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_LIST)) == []
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (w.OPT_LIST, w.REP_ERR_POLICY)
    assert "disabled" in error_text(reply)
    # The session goes on.
    assert session.send(w.option(w.OPT_GO, w.info_request("disk"))) == [
        HandshakeDone(DISK, False)
    ]


def test_list_names_every_export_when_allowed() -> None:
    session = Client(Limits(allow_list=True), catalogue=[DISK, LONG])
    assert session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_LIST)) == []
    assert session.replies() == [
        w.OptionReply(w.OPT_LIST, w.REP_SERVER, b"\x00\x00\x00\x04disk"),
        w.OptionReply(w.OPT_LIST, w.REP_SERVER, (300).to_bytes(4, "big") + b"L" * 300),
        w.OptionReply(w.OPT_LIST, w.REP_ACK, b""),
    ]


def test_list_of_no_exports_is_just_an_ack() -> None:
    session = Client(Limits(allow_list=True), catalogue=[])
    session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_LIST))
    assert session.conn.data_to_send() == raw_option_reply(w.OPT_LIST, w.REP_ACK)


def test_list_with_data_is_invalid() -> None:
    session = Client(Limits(allow_list=True), catalogue=[DISK])
    session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_LIST, b"x"))
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (w.OPT_LIST, w.REP_ERR_INVALID)
    assert "takes no data" in error_text(reply)


# NBD_OPT_INFO and NBD_OPT_GO.


def info_replies(session: Client, option: int) -> list[w.Info]:
    """Decode a successful INFO/GO answer: its infos, checked to end in ACK."""
    *infos, ack = session.replies()
    assert ack == w.OptionReply(option, w.REP_ACK, b"")
    assert all(reply.option == option for reply in infos)
    return [w.decode_info(reply) for reply in infos]


@pytest.mark.parametrize("option", [w.OPT_INFO, w.OPT_GO])
def test_info_and_go_report_name_description_and_block_sizes(option: int) -> None:
    session = Client()
    wanted = [w.INFO_NAME, w.INFO_DESCRIPTION, w.INFO_BLOCK_SIZE, w.INFO_NAME, 99]
    events = session.send(
        w.client_flags(NEWSTYLE) + w.option(option, w.info_request("disk", wanted))
    )
    assert events == ([HandshakeDone(DISK, False)] if option == w.OPT_GO else [])
    assert info_replies(session, option) == [
        w.Info(w.INFO_EXPORT, (MiB, EXPECTED_TRANSMISSION_FLAGS)),
        w.Info(w.INFO_NAME, ("disk",)),
        w.Info(w.INFO_DESCRIPTION, ("scratch RAM",)),
        w.Info(w.INFO_BLOCK_SIZE, DEFAULT_BLOCK_SIZES),
    ]


def test_info_sends_export_and_block_sizes_even_unasked() -> None:
    session = Client()
    session.send(
        w.client_flags(NEWSTYLE) + w.option(w.OPT_INFO, w.info_request("disk"))
    )
    assert info_replies(session, w.OPT_INFO) == [
        w.Info(w.INFO_EXPORT, (MiB, EXPECTED_TRANSMISSION_FLAGS)),
        w.Info(w.INFO_BLOCK_SIZE, DEFAULT_BLOCK_SIZES),
    ]
    assert session.conn.phase is Phase.HANDSHAKE


def test_info_leaves_out_an_empty_description() -> None:
    session = Client(Limits(min_block=512, preferred_block=8192, max_payload=MiB))
    session.send(
        w.client_flags(NEWSTYLE)
        + w.option(w.OPT_INFO, w.info_request("bare", [w.INFO_DESCRIPTION]))
    )
    assert info_replies(session, w.OPT_INFO) == [
        w.Info(w.INFO_EXPORT, (64 * KiB, EXPECTED_TRANSMISSION_FLAGS)),
        w.Info(w.INFO_BLOCK_SIZE, (512, 8192, MiB)),
    ]


def test_long_description_is_clipped_to_4096_bytes_of_valid_utf8() -> None:
    session = Client()
    session.send(
        w.client_flags(NEWSTYLE)
        + w.option(w.OPT_INFO, w.info_request("wordy", [w.INFO_DESCRIPTION]))
    )
    description = info_replies(session, w.OPT_INFO)[1]
    assert description == w.Info(w.INFO_DESCRIPTION, ("x" + "é" * 2047,))


def test_go_ends_the_handshake_and_requests_may_follow_in_the_same_buffer() -> None:
    session = Client()
    events = session.send(
        w.client_flags(NEWSTYLE)
        + w.option(w.OPT_INFO, w.info_request("bare"))
        + w.option(w.OPT_GO, w.info_request("disk"))
        + w.request(w.CMD_READ, 1, 512, 512)
    )
    assert events == [HandshakeDone(DISK, False), Command(w.CMD_READ, 0, 1, 512, 512)]
    replies = session.replies()
    assert [(r.option, r.reply) for r in replies] == [
        (w.OPT_INFO, w.REP_INFO),
        (w.OPT_INFO, w.REP_INFO),
        (w.OPT_INFO, w.REP_ACK),
        (w.OPT_GO, w.REP_INFO),
        (w.OPT_GO, w.REP_INFO),
        (w.OPT_GO, w.REP_ACK),
    ]
    assert session.lookups == ["bare", "disk"]


def name_field(name: bytes, declared: int | None = None) -> bytes:
    length = len(name) if declared is None else declared
    return length.to_bytes(4, "big") + name


MALFORMED_INFO = {
    "empty": (b"", "truncated"),
    "five-bytes": (b"\x00\x00\x00\x00\x00", "truncated"),
    "name-overruns": (name_field(b"disk", 5) + b"\x00\x00", "overruns"),
    "name-overruns-count": (name_field(b"disk", 6) + b"\x00\x00", "overruns"),
    "bad-utf8": (name_field(b"\xc3(") + b"\x00\x00", "UTF-8"),
    "name-over-4096": (name_field(b"d" * 4097) + b"\x00\x00", "UTF-8"),
    "count-too-big": (name_field(b"disk") + b"\x00\x02\x00\x01", "count"),
    "count-too-small": (name_field(b"disk") + b"\x00\x00\x00\x01", "count"),
    "odd-trailing-byte": (name_field(b"disk") + b"\x00\x01\x00\x01\x00", "count"),
}


@pytest.mark.parametrize("option", [w.OPT_INFO, w.OPT_GO])
@pytest.mark.parametrize("case", sorted(MALFORMED_INFO))
def test_malformed_info_and_go_are_invalid(option: int, case: str) -> None:
    data, reason = MALFORMED_INFO[case]
    session = Client()
    assert session.send(w.client_flags(NEWSTYLE) + w.option(option, data)) == []
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (option, w.REP_ERR_INVALID)
    assert reason in error_text(reply)
    assert session.lookups == []
    assert session.conn.phase is Phase.HANDSHAKE


@pytest.mark.parametrize("option", [w.OPT_INFO, w.OPT_GO])
def test_info_and_go_report_an_unknown_export(option: int) -> None:
    session = Client()
    request = w.option(option, w.info_request("missing", [w.INFO_NAME]))
    assert session.send(w.client_flags(NEWSTYLE) + request) == []
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (option, w.REP_ERR_UNKNOWN)
    assert "no such export" in error_text(reply)
    assert session.conn.phase is Phase.HANDSHAKE
    assert session.send(w.option(w.OPT_GO, w.info_request("bare"))) == [
        HandshakeDone(BARE, False)
    ]


# NBD_OPT_STRUCTURED_REPLY, NBD_OPT_STARTTLS and options we do not know.


def test_structured_reply_is_acknowledged_and_carried_into_transmission() -> None:
    session = Client()
    assert (
        session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_STRUCTURED_REPLY)) == []
    )
    assert session.conn.data_to_send() == raw_option_reply(
        w.OPT_STRUCTURED_REPLY, w.REP_ACK
    )
    assert session.send(w.option(w.OPT_EXPORT_NAME, b"disk")) == [
        HandshakeDone(DISK, True)
    ]
    assert session.conn.structured


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    session = Client()
    session.send(w.client_flags(NEWSTYLE) + w.option(w.OPT_STRUCTURED_REPLY, b"\0"))
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (w.OPT_STRUCTURED_REPLY, w.REP_ERR_INVALID)
    assert "takes no data" in error_text(reply)
    assert session.send(w.option(w.OPT_GO, w.info_request("disk"))) == [
        HandshakeDone(DISK, False)
    ]


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (w.OPT_STARTTLS, "TLS is not configured"),
        (w.OPT_PEEK_EXPORT, "unsupported"),
        (w.OPT_LIST_META_CONTEXT, "unsupported"),
        (w.OPT_SET_META_CONTEXT, "unsupported"),
        (w.OPT_EXTENDED_HEADERS, "unsupported"),
        (0, "unsupported"),
        (12, "unsupported"),
        (0xFFFFFFFF, "unsupported"),
    ],
)
def test_unsupported_options_are_refused_and_the_session_goes_on(
    option: int, reason: str
) -> None:
    session = Client()
    assert session.send(w.client_flags(NEWSTYLE) + w.option(option, b"data")) == []
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (option, w.REP_ERR_UNSUP)
    assert reason in error_text(reply)
    assert session.send(w.option(w.OPT_GO, w.info_request("disk"))) == [
        HandshakeDone(DISK, False)
    ]


# Oversized options and too many options.

OVERSIZE = MAX_OPTION_LENGTH + 1000


def test_option_data_of_exactly_the_limit_is_read() -> None:
    session = Client()
    session.send(w.client_flags(NEWSTYLE) + w.option(42, bytes(MAX_OPTION_LENGTH)))
    [reply] = session.replies()
    assert (reply.option, reply.reply) == (42, w.REP_ERR_UNSUP)


@pytest.mark.parametrize("option", [42, w.OPT_LIST, w.OPT_GO])
def test_oversized_option_is_refused_and_the_next_one_answered(option: int) -> None:
    # Regression: the option behind the skipped data, already buffered, used
    # to wait for more bytes that a client waiting for its reply never sends.
    session = Client()
    events = session.send(
        w.client_flags(NEWSTYLE)
        + w.option(option, b"\x01" * OVERSIZE)
        + w.option(w.OPT_GO, w.info_request("disk"))
    )
    assert events == [HandshakeDone(DISK, False)]
    refusal, *rest = session.replies()
    assert (refusal.option, refusal.reply) == (option, w.REP_ERR_TOO_BIG)
    assert str(OVERSIZE) in error_text(refusal)
    assert [r.option for r in rest] == [w.OPT_GO] * len(rest)
    assert session.lookups == ["disk"]


def test_oversized_option_data_arriving_in_pieces_is_skipped() -> None:
    session = Client()
    header = w.option(42, length=OVERSIZE)
    assert session.send(w.client_flags(NEWSTYLE) + header) == []
    # Refused at once: the client learns before it has sent everything.
    [refusal] = session.replies()
    assert (refusal.option, refusal.reply) == (42, w.REP_ERR_TOO_BIG)

    data = b"\x07" * OVERSIZE
    assert session.send(data[:100], step=1) == []
    assert session.send(data[100:-50], step=1000) == []
    assert session.conn.data_to_send() == b""
    tail = data[-50:] + w.option(w.OPT_GO, w.info_request("disk"))
    assert session.send(tail, step=7) == [HandshakeDone(DISK, False)]
    assert session.replies()[-1] == w.OptionReply(w.OPT_GO, w.REP_ACK, b"")


@pytest.mark.parametrize("flags", [NEWSTYLE, 0])
def test_oversized_export_name_drops_the_connection(flags: int) -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="too big"):
        session.send(
            w.client_flags(flags) + w.option(w.OPT_EXPORT_NAME, length=OVERSIZE)
        )
    assert session.conn.phase is Phase.CLOSED


def test_oversized_option_from_a_client_without_fixed_newstyle_drops_it() -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="too big"):
        session.send(w.client_flags(0) + w.option(42, length=OVERSIZE))


def test_more_options_than_the_limit_drop_the_connection() -> None:
    session = Client()
    many = w.option(w.OPT_STARTTLS) * MAX_OPTIONS
    assert session.send(w.client_flags(NEWSTYLE) + many) == []
    assert len(session.replies()) == MAX_OPTIONS
    with pytest.raises(ProtocolError, match=f"more than {MAX_OPTIONS} options"):
        session.send(w.option(w.OPT_GO, w.info_request("disk")))


def test_options_arriving_a_byte_at_a_time_are_counted_once() -> None:
    # Regression: each piece of a partly arrived option used to count as a
    # new option, so a long GO sent in small pieces hit the option limit.
    session = Client()
    options = w.option(w.OPT_INFO, w.info_request("bare")) * (MAX_OPTIONS - 1)
    assert session.send(w.client_flags(NEWSTYLE) + options, step=1) == []
    go = w.option(w.OPT_GO, w.info_request(LONG.name, [w.INFO_NAME]))
    assert session.send(go, step=1) == [HandshakeDone(LONG, False)]
    assert session.lookups == ["bare"] * (MAX_OPTIONS - 1) + [LONG.name]


@pytest.mark.parametrize("flags", [0, w.FLAG_C_NO_ZEROES])
@pytest.mark.parametrize("option", [w.OPT_GO, w.OPT_STRUCTURED_REPLY, w.OPT_ABORT, 42])
def test_client_without_fixed_newstyle_may_only_send_export_name(
    flags: int, option: int
) -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="needs fixed newstyle"):
        session.send(w.client_flags(flags) + w.option(option))
    assert session.conn.data_to_send() == b""


def test_bad_option_magic_drops_the_connection() -> None:
    session = Client()
    with pytest.raises(ProtocolError, match="bad option magic"):
        session.send(w.client_flags(NEWSTYLE) + b"IHAVEOPX" + bytes(8))
    assert session.conn.phase is Phase.CLOSED


def test_partial_option_waits_for_the_rest() -> None:
    session = Client()
    go = w.option(w.OPT_GO, w.info_request("disk"))
    assert session.send(w.client_flags(NEWSTYLE) + go[:15]) == []
    assert session.send(go[15:-1]) == []
    assert session.conn.data_to_send() == b""
    assert session.send(go[-1:]) == [HandshakeDone(DISK, False)]


# Transmission: valid requests.

DATA_COMMANDS = [w.CMD_READ, w.CMD_TRIM, w.CMD_CACHE, w.CMD_WRITE_ZEROES]


@pytest.mark.parametrize("flags", [0, w.CMD_FLAG_FUA])
@pytest.mark.parametrize("cmd", DATA_COMMANDS)
def test_commands_without_payload(client: Client, cmd: int, flags: int) -> None:
    events = client.send(w.request(cmd, 0xDEADBEEF, 4096, 8192, flags))
    assert events == [Command(cmd, flags, 0xDEADBEEF, 4096, 8192)]


@pytest.mark.parametrize("flags", [0, w.CMD_FLAG_FUA])
def test_flush(client: Client, flags: int) -> None:
    assert client.send(w.request(w.CMD_FLUSH, 3, flags=flags)) == [
        Command(w.CMD_FLUSH, flags, 3, 0, 0)
    ]


@pytest.mark.parametrize("flags", [0, w.CMD_FLAG_FUA])
def test_write_whose_payload_is_buffered_comes_whole(
    client: Client, flags: int
) -> None:
    events = client.send(w.request(w.CMD_WRITE, 2**64 - 1, MiB - 4, 4, flags) + b"tail")
    assert events == [Write(flags, 2**64 - 1, MiB - 4, 4, mv(b"tail"))]
    assert client.conn.payload_target() is None


def test_write_payload_a_byte_at_a_time(client: Client) -> None:
    payload = bytes(range(40))
    events = client.send(
        w.request(w.CMD_WRITE, 8, 1000, 40, w.CMD_FLAG_FUA) + payload, step=1
    )
    assert events == [
        Write(w.CMD_FLAG_FUA, 8, 1000, 40),
        *(WriteData(1000 + i, mv(payload[i : i + 1])) for i in range(40)),
        WriteDone(w.CMD_FLAG_FUA, 8, 1000, 40),
    ]


def test_write_payload_in_uneven_pieces(client: Client) -> None:
    header = w.request(w.CMD_WRITE, 5, 0, 10)
    assert client.send(header + b"abc") == [
        Write(0, 5, 0, 10),
        WriteData(0, mv(b"abc")),
    ]
    assert client.send(b"defghij" + w.request(w.CMD_FLUSH, 6)) == [
        WriteData(3, mv(b"defghij")),
        WriteDone(0, 5, 0, 10),
        Command(w.CMD_FLUSH, 0, 6, 0, 0),
    ]


def test_write_zeroes_accepts_no_hole_and_fast_zero(client: Client) -> None:
    flags = w.CMD_FLAG_FUA | w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FAST_ZERO
    assert client.send(w.request(w.CMD_WRITE_ZEROES, 1, 0, MiB, flags)) == [
        Command(w.CMD_WRITE_ZEROES, flags, 1, 0, MiB)
    ]


def test_requests_pipelined_in_one_buffer(client: Client) -> None:
    stream = (
        w.request(w.CMD_READ, 1, 0, 512)
        + w.request(w.CMD_WRITE, 2, 512, 3)
        + b"xyz"
        + w.request(w.CMD_READ, 3, 0, 0)
        + w.request(w.CMD_WRITE, 4, MiB, 2)
        + b"no"
        + w.request(w.CMD_TRIM, 5, 0, 4096)
        + w.request(w.CMD_FLUSH, 6)
        + w.request(w.CMD_DISC, 7)
    )
    events = client.send(stream)
    assert events[:3] == [
        Command(w.CMD_READ, 0, 1, 0, 512),
        Write(0, 2, 512, 3, mv(b"xyz")),
        Rejected(w.CMD_READ, 3, w.EINVAL, "read of length 0"),
    ]
    assert isinstance(events[3], Rejected)
    assert (events[3].handle, events[3].error) == (4, w.ENOSPC)
    assert events[4:] == [
        Command(w.CMD_TRIM, 0, 5, 0, 4096),
        Command(w.CMD_FLUSH, 0, 6, 0, 0),
        Disconnect(),
    ]


# Transmission: refused requests.


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (w.CMD_READ, w.CMD_FLAG_NO_HOLE),
        (w.CMD_READ, w.CMD_FLAG_DF),
        (w.CMD_READ, w.CMD_FLAG_REQ_ONE),
        (w.CMD_READ, 0x8000),
        (w.CMD_FLUSH, w.CMD_FLAG_NO_HOLE),
        (w.CMD_TRIM, w.CMD_FLAG_FAST_ZERO),
        (w.CMD_CACHE, w.CMD_FLAG_DF),
        (w.CMD_WRITE_ZEROES, w.CMD_FLAG_DF),
        (w.CMD_WRITE_ZEROES, w.CMD_FLAG_REQ_ONE | w.CMD_FLAG_FUA),
    ],
)
def test_flags_a_command_does_not_take_are_rejected(
    client: Client, cmd: int, flags: int
) -> None:
    length = 0 if cmd == w.CMD_FLUSH else 512
    [event] = client.send(w.request(cmd, 9, 0, length, flags))
    assert isinstance(event, Rejected)
    assert (event.cmd, event.handle, event.error) == (cmd, 9, w.EINVAL)
    assert f"flags {flags:#x} are not valid" in event.message


@pytest.mark.parametrize("flags", [w.CMD_FLAG_NO_HOLE, w.CMD_FLAG_FAST_ZERO, 0xFFFF])
def test_write_with_flags_it_does_not_take_is_rejected_after_its_payload(
    client: Client, flags: int
) -> None:
    [event] = client.send(w.request(w.CMD_WRITE, 9, 0, 4, flags) + b"data")
    assert isinstance(event, Rejected)
    assert (event.cmd, event.handle, event.error) == (w.CMD_WRITE, 9, w.EINVAL)
    assert "not valid for write" in event.message


@pytest.mark.parametrize(
    ("cmd", "name"),
    [
        (w.CMD_BLOCK_STATUS, "block_status"),
        (w.CMD_RESIZE, "resize"),
        (9, "command 9"),
        (0xFFFF, "command 65535"),
    ],
)
def test_unsupported_commands_are_rejected(client: Client, cmd: int, name: str) -> None:
    assert client.send(w.request(cmd, 4, 0, 512)) == [
        Rejected(cmd, 4, w.EINVAL, f"{name} is not supported")
    ]


@pytest.mark.parametrize("cmd", [*DATA_COMMANDS, w.CMD_WRITE])
def test_zero_length_is_rejected(client: Client, cmd: int) -> None:
    [event] = client.send(w.request(cmd, 1, 512, 0))
    assert isinstance(event, Rejected)
    assert (event.cmd, event.handle, event.error) == (cmd, 1, w.EINVAL)
    assert event.message.endswith("of length 0")


@pytest.mark.parametrize(("offset", "length"), [(1, 0), (0, 1), (4096, 4096)])
def test_flush_must_have_offset_and_length_zero(
    client: Client, offset: int, length: int
) -> None:
    assert client.send(w.request(w.CMD_FLUSH, 2, offset, length)) == [
        Rejected(w.CMD_FLUSH, 2, w.EINVAL, "flush must have offset and length 0")
    ]


def test_read_past_max_payload_overflows(small: Client) -> None:
    assert small.send(w.request(w.CMD_READ, 1, 0, 4097)) == [
        Rejected(
            w.CMD_READ, 1, w.EOVERFLOW, "read of 4097 bytes exceeds the 4096 limit"
        )
    ]
    assert small.send(w.request(w.CMD_READ, 2, 0, 4096)) == [
        Command(w.CMD_READ, 0, 2, 0, 4096)
    ]


def test_write_past_max_payload_overflows_after_its_payload(small: Client) -> None:
    payload = b"\x55" * 4097
    events = small.send(w.request(w.CMD_WRITE, 1, 0, 4097) + payload[:4000])
    assert events == []
    assert small.conn.payload_target() is None
    assert small.send(payload[4000:] + w.request(w.CMD_FLUSH, 2)) == [
        Rejected(
            w.CMD_WRITE, 1, w.EOVERFLOW, "write of 4097 bytes exceeds the 4096 limit"
        ),
        Command(w.CMD_FLUSH, 0, 2, 0, 0),
    ]


@pytest.mark.parametrize("cmd", [w.CMD_TRIM, w.CMD_WRITE_ZEROES, w.CMD_CACHE])
def test_commands_without_payload_may_exceed_max_payload(
    small: Client, cmd: int
) -> None:
    assert small.send(w.request(cmd, 1, 0, MiB)) == [Command(cmd, 0, 1, 0, MiB)]


@pytest.mark.parametrize(
    ("offset", "length"), [(1, 512), (512, 1), (256, 512), (0, 4095)]
)
@pytest.mark.parametrize("cmd", [*DATA_COMMANDS, w.CMD_WRITE])
def test_requests_must_be_aligned_to_min_block(
    cmd: int, offset: int, length: int
) -> None:
    session = Client(Limits(min_block=512))
    session.negotiate()
    payload = bytes(length) if cmd == w.CMD_WRITE else b""
    [event] = session.send(w.request(cmd, 7, offset, length) + payload)
    assert isinstance(event, Rejected)
    assert (event.cmd, event.error) == (cmd, w.EINVAL)
    assert "not aligned to 512 bytes" in event.message
    # Aligned requests and flush are fine.
    payload = bytes(1024) if cmd == w.CMD_WRITE else b""
    [event] = session.send(w.request(cmd, 8, 512, 1024) + payload)
    assert not isinstance(event, Rejected)
    assert session.send(w.request(w.CMD_FLUSH, 9)) == [Command(w.CMD_FLUSH, 0, 9, 0, 0)]


OUT_OF_RANGE_ERRORS = {
    w.CMD_READ: w.EINVAL,
    w.CMD_CACHE: w.EINVAL,
    w.CMD_WRITE: w.ENOSPC,
    w.CMD_TRIM: w.ENOSPC,
    w.CMD_WRITE_ZEROES: w.ENOSPC,
}


@pytest.mark.parametrize(
    ("offset", "length"), [(MiB - 511, 512), (MiB, 1), (2**64 - 1, 1)]
)
@pytest.mark.parametrize("cmd", sorted(OUT_OF_RANGE_ERRORS))
def test_requests_past_the_end_fail(
    client: Client, cmd: int, offset: int, length: int
) -> None:
    payload = bytes(length) if cmd == w.CMD_WRITE else b""
    [event] = client.send(w.request(cmd, 3, offset, length) + payload)
    assert isinstance(event, Rejected)
    assert (event.cmd, event.handle) == (cmd, 3)
    assert event.error == OUT_OF_RANGE_ERRORS[cmd]
    assert f"ends past the export's {MiB} bytes" in event.message


@pytest.mark.parametrize("cmd", sorted(OUT_OF_RANGE_ERRORS))
def test_requests_ending_at_the_end_are_fine(client: Client, cmd: int) -> None:
    payload = bytes(512) if cmd == w.CMD_WRITE else b""
    [event] = client.send(w.request(cmd, 3, MiB - 512, 512) + payload)
    assert not isinstance(event, Rejected)


def test_rejected_write_payload_is_skipped_a_byte_at_a_time(client: Client) -> None:
    stream = (
        w.request(w.CMD_WRITE, 1, MiB, 16) + bytes(16) + w.request(w.CMD_READ, 2, 0, 8)
    )
    rejected, command = client.send(stream, step=1)
    assert isinstance(rejected, Rejected)
    assert (rejected.cmd, rejected.handle, rejected.error) == (w.CMD_WRITE, 1, w.ENOSPC)
    assert command == Command(w.CMD_READ, 0, 2, 0, 8)


# Direct payload placement.


def test_payload_placed_directly_by_the_transport(client: Client) -> None:
    assert client.conn.payload_target() is None
    assert client.send(w.request(w.CMD_WRITE, 9, 4096, 1000)) == [
        Write(0, 9, 4096, 1000)
    ]
    assert client.conn.payload_target() == (4096, 1000)
    client.conn.payload_received(600)
    assert client.conn.payload_target() == (4696, 400)
    assert client.conn.next_event() is None
    # The rest may still come through the buffer.
    assert client.send(b"r" * 400) == [
        WriteData(4696, mv(b"r" * 400)),
        WriteDone(0, 9, 4096, 1000),
    ]


def test_payload_placed_entirely_by_the_transport(client: Client) -> None:
    client.send(w.request(w.CMD_WRITE, 1, 0, 100))
    client.conn.payload_received(100)
    assert client.conn.payload_target() is None
    assert client.send(w.request(w.CMD_FLUSH, 2)) == [
        WriteDone(0, 1, 0, 100),
        Command(w.CMD_FLUSH, 0, 2, 0, 0),
    ]


@pytest.mark.parametrize("count", [0, -1, 101])
def test_payload_received_refuses_counts_that_do_not_fit(
    client: Client, count: int
) -> None:
    client.send(w.request(w.CMD_WRITE, 1, 0, 100))
    with pytest.raises(ValueError, match=f"no room for {count} payload bytes"):
        client.conn.payload_received(count)
    assert client.conn.payload_target() == (0, 100)


def test_payload_received_without_a_write_waiting_is_an_error(client: Client) -> None:
    with pytest.raises(ValueError, match="no room for 1 payload bytes"):
        client.conn.payload_received(1)
    # Nor for a refused write, whose payload is only ever skipped.
    client.send(w.request(w.CMD_WRITE, 1, MiB, 100))
    assert client.conn.payload_target() is None
    with pytest.raises(ValueError, match="no room"):
        client.conn.payload_received(1)


def test_no_payload_target_while_buffered_bytes_come_first(client: Client) -> None:
    conn = client.conn
    conn.receive_data(w.request(w.CMD_WRITE, 1, 0, 100) + b"early")
    assert conn.next_event() == Write(0, 1, 0, 100)
    assert conn.payload_target() is None
    event = conn.next_event()
    assert isinstance(event, WriteData)
    assert (event.offset, bytes(event.data)) == (0, b"early")
    event.data.release()
    assert conn.payload_target() == (5, 95)


# The end of a session.


def test_disc_ends_the_session(client: Client) -> None:
    events = client.send(w.request(w.CMD_DISC, 1, flags=w.CMD_FLAG_FUA) + b"junk")
    assert events == [Disconnect()]
    assert client.conn.phase is Phase.CLOSED
    assert client.conn.next_event() is None
    with pytest.raises(ProtocolError, match="after the session ended"):
        client.conn.receive_data(w.request(w.CMD_READ, 2, 0, 1))


def test_bad_request_magic_drops_the_connection(client: Client) -> None:
    bad = b"\x25\x60\x95\x14" + w.request(w.CMD_READ, 1, 0, 1)[4:]
    with pytest.raises(ProtocolError, match="bad request magic 0x25609514"):
        client.send(bad)
    assert client.conn.phase is Phase.CLOSED
    assert client.conn.next_event() is None


def test_receive_buffer_is_compacted_once_64_kib_are_consumed(client: Client) -> None:
    big = 70_000
    header = w.request(w.CMD_READ, 2, 0, 8)
    events = client.send(w.request(w.CMD_WRITE, 1, 0, big) + b"w" * big + header[:10])
    assert events == [Write(0, 1, 0, big, mv(b"w" * big))]
    events = client.send(header[10:])
    assert events == [Command(w.CMD_READ, 0, 2, 0, 8)]
    # Compaction is about memory, so look at the buffer itself.
    assert len(client.conn._buffer) == len(header)


# Reply encoders.


def test_simple_replies(client: Client) -> None:
    conn = client.conn
    reply, rest = w.split_reply(conn.reply_ok(7))
    assert (reply, rest) == (w.SimpleReply(0, 7), b"")
    header = conn.reply_read(8, 4096, 3)
    assert len(header) == 16
    assert w.split_reply(header + b"abc", read_length=3) == (
        w.SimpleReply(0, 8, b"abc"),
        b"",
    )
    error = conn.reply_error(9, w.ENOSPC, "the message has nowhere to go")
    assert w.split_reply(error, read_length=100) == (w.SimpleReply(w.ENOSPC, 9), b"")


def test_structured_replies() -> None:
    session = Client()
    session.negotiate(structured=True)
    conn = session.conn
    # Replies without payload may stay simple, as the spec allows.
    assert w.split_reply(conn.reply_ok(1)) == (w.SimpleReply(0, 1), b"")

    header = conn.reply_read(2, 1 << 40, 5)
    chunk, rest = w.split_reply(header + b"hello")
    assert rest == b""
    assert isinstance(chunk, w.Chunk)
    assert (chunk.type, chunk.handle, chunk.done) == (w.REPLY_TYPE_OFFSET_DATA, 2, True)
    assert chunk.offset_data() == (1 << 40, b"hello")

    chunk, rest = w.split_reply(conn.reply_error(3, w.EIO, "slab went away"))
    assert rest == b""
    assert isinstance(chunk, w.Chunk)
    assert (chunk.type, chunk.handle, chunk.done) == (w.REPLY_TYPE_ERROR, 3, True)
    assert chunk.error() == (w.EIO, "slab went away")

    chunk, _ = w.split_reply(conn.reply_error(4, w.EINVAL))
    assert isinstance(chunk, w.Chunk)
    assert chunk.error() == (w.EINVAL, "")
    assert chunk.payload == b"\x00\x00\x00\x16\x00\x00"


def test_structured_error_message_is_clipped_to_4096_bytes_of_valid_utf8() -> None:
    session = Client()
    session.negotiate(structured=True)
    chunk, _ = w.split_reply(session.conn.reply_error(1, w.EIO, "x" + "é" * 3000))
    assert isinstance(chunk, w.Chunk)
    error, message = chunk.error()
    assert (error, message) == (w.EIO, "x" + "é" * 2047)
    assert len(message.encode()) == 4095


# Limits and error mapping.


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"min_block": 4096},
        {"min_block": 512, "preferred_block": 512, "max_payload": 512},
        {"max_payload": 1 << 31},
    ],
)
def test_valid_limits(kwargs: dict[str, int]) -> None:
    limits = Limits(**kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        assert getattr(limits, name) == value


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"min_block": 0}, "min_block must be a power of two, not 0"),
        ({"min_block": -4}, "min_block must be a power of two"),
        ({"min_block": 3}, "min_block must be a power of two, not 3"),
        ({"preferred_block": 4095}, "preferred_block must be a power of two"),
        ({"max_payload": 3 * MiB}, "max_payload must be a power of two"),
        ({"max_payload": 1 << 32}, "max_payload must be at most 2 GiB"),
        ({"min_block": 8192}, "min <= preferred <= max"),
        ({"preferred_block": 64 * MiB}, "min <= preferred <= max"),
    ],
)
def test_invalid_limits_are_refused(kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Limits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("local", "wire"),
    [
        (errno.EPERM, w.EPERM),
        (errno.EACCES, w.EPERM),
        (errno.EROFS, w.EPERM),
        (errno.EIO, w.EIO),
        (errno.ENOMEM, w.ENOMEM),
        (errno.EINVAL, w.EINVAL),
        (errno.ENOSPC, w.ENOSPC),
        (errno.EDQUOT, w.ENOSPC),
        (errno.EFBIG, w.ENOSPC),
        (errno.EOVERFLOW, w.EOVERFLOW),
        (errno.ENOTSUP, w.ENOTSUP),
        (errno.ESHUTDOWN, w.ESHUTDOWN),
        # Anything the spec has no number for becomes EINVAL.
        (errno.ENOENT, w.EINVAL),
        (errno.EBADF, w.EINVAL),
        (errno.EAGAIN, w.EINVAL),
        (0, w.EINVAL),
    ],
)
def test_wire_error_maps_local_errno_onto_the_spec(local: int, wire: int) -> None:
    assert proto.wire_error(local) == wire


# Properties: any input, any split.


def feed_until_dropped(conn: ServerConnection, pieces: list[bytes]) -> list[Event]:
    """Feed pieces as a transport would; stop where the connection drops.

    Only ProtocolError may escape the machine, and after it the session is
    closed for good.
    """
    events: list[Event] = []
    for piece in pieces:
        try:
            conn.receive_data(piece)
            events += drain(conn, len(piece))
        except ProtocolError:
            assert conn.phase is Phase.CLOSED
            assert conn.next_event() is None
            break
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    return [data[a:b] for a, b in pairwise(points)]


PREFIXES = [
    b"",
    w.client_flags(NEWSTYLE),
    w.client_flags(0),
    w.client_flags(NEWSTYLE) + w.option(w.OPT_GO, w.info_request("disk")),
    w.client_flags(NEWSTYLE) + w.option(w.OPT_EXPORT_NAME, b"bare"),
]


@settings(deadline=None)
@given(
    prefix=st.sampled_from(PREFIXES),
    junk=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_any_bytes_only_ever_raise_protocol_error(
    prefix: bytes, junk: bytes, cuts: list[int]
) -> None:
    conn = Client(SMALL_LIMITS).conn
    feed_until_dropped(conn, split(prefix + junk, cuts))


# A valid session, built from pieces a client may send.

HANDLES = st.integers(0, 2**64 - 1)
NAMES = st.sampled_from(["disk", "bare", LONG.name, "missing", "ünïcødé"])
OPTIONS = st.one_of(
    st.builds(
        lambda name, infos: w.option(w.OPT_INFO, w.info_request(name, infos)),
        NAMES,
        st.lists(st.integers(0, 5), max_size=4),
    ),
    st.builds(
        w.option,
        st.sampled_from(
            [w.OPT_LIST, w.OPT_STARTTLS, w.OPT_STRUCTURED_REPLY, w.OPT_PEEK_EXPORT, 42]
        ),
        st.one_of(st.just(b""), st.binary(max_size=16)),
    ),
    st.builds(
        lambda extra: w.option(42, bytes(MAX_OPTION_LENGTH + extra)),
        st.integers(1, 64),
    ),
)
GO = st.builds(
    lambda name, infos: w.option(w.OPT_GO, w.info_request(name, infos)),
    st.sampled_from(["disk", LONG.name]),
    st.lists(st.integers(0, 5), max_size=3),
)
REQUESTS = st.one_of(
    st.builds(
        w.request,
        st.sampled_from([*DATA_COMMANDS, w.CMD_FLUSH, w.CMD_BLOCK_STATUS, 77]),
        HANDLES,
        st.one_of(st.integers(0, 70_000), st.just(2**64 - 1)),
        st.one_of(st.integers(0, 5000), st.just(2**32 - 1)),
        st.sampled_from([0, w.CMD_FLAG_FUA, w.CMD_FLAG_NO_HOLE, 0x40]),
    ),
    st.builds(
        lambda handle, offset, payload, flags: (
            w.request(w.CMD_WRITE, handle, offset, len(payload), flags) + payload
        ),
        HANDLES,
        st.integers(0, 70_000),
        st.one_of(st.binary(max_size=64), st.binary(min_size=4090, max_size=4100)),
        st.sampled_from([0, w.CMD_FLAG_FUA, w.CMD_FLAG_NO_HOLE]),
    ),
)
SESSIONS = st.builds(
    lambda options, go, requests: (
        w.client_flags(NEWSTYLE)
        + b"".join(options)
        + go
        + b"".join(requests)
        + w.request(w.CMD_DISC, 0)
    ),
    st.lists(OPTIONS, max_size=5),
    GO,
    st.lists(REQUESTS, max_size=8),
)


def canonical(events: list[Event]) -> list[object]:
    """The meaning of a stream of events, whatever pieces the bytes came in.

    A write that came whole and one that came in pieces mean the same; so do
    payload pieces that follow each other.
    """
    result: list[object] = []
    for event in events:
        if isinstance(event, Write):
            fields = (event.flags, event.handle, event.offset, event.length)
            result.append(("write", *fields))
            if event.data is not None:
                result.append(("data", event.offset, bytes(event.data)))
                result.append(("done", *fields))
        elif isinstance(event, WriteData):
            last = result[-1]
            if isinstance(last, tuple) and last[0] == "data":
                result[-1] = ("data", last[1], last[2] + bytes(event.data))
            else:
                result.append(("data", event.offset, bytes(event.data)))
        elif isinstance(event, WriteDone):
            result.append(
                ("done", event.flags, event.handle, event.offset, event.length)
            )
        else:
            result.append(event)
    return result


def run_session(pieces: list[bytes]) -> tuple[list[object], bytes]:
    conn = Client(SMALL_LIMITS).conn
    events: list[Event] = []
    sent = b""
    for piece in pieces:
        conn.receive_data(piece)
        events += drain(conn, len(piece))
        sent += conn.data_to_send()
    return canonical(events), sent


@settings(deadline=None, max_examples=150)
@given(session=SESSIONS, data=st.data())
def test_a_session_means_the_same_however_it_is_split(
    session: bytes, data: st.DataObject
) -> None:
    whole_events, whole_sent = run_session([session])
    assert whole_events[-1] == Disconnect()
    cuts = data.draw(st.lists(st.integers(1, len(session) - 1), max_size=40))
    pieces = split(session, cuts)
    assert run_session(pieces) == (whole_events, whole_sent)


@settings(deadline=None, max_examples=150)
@given(
    session=SESSIONS,
    edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6),
    cuts=st.lists(st.integers(0, 2**16), max_size=12),
)
def test_corrupted_sessions_only_ever_raise_protocol_error(
    session: bytes, edits: list[tuple[int, int]], cuts: list[int]
) -> None:
    corrupted = bytearray(session)
    for position, value in edits:
        corrupted[position % len(corrupted)] = value
    conn = Client(SMALL_LIMITS).conn
    feed_until_dropped(conn, split(bytes(corrupted), cuts))
