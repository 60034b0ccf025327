"""Milter protocol v6 wire codec: bytes <-> frozen dataclasses, no I/O.

Why a codec of its own: the reference MTA must speak the *MTA side* of the
milter protocol (what Postfix and Sendmail do), which pymilter does not
provide. Keeping it pure (no sockets, no asyncio) makes every packet testable
from raw bytes, and lets the client be a thin loop around it.

Wire format (libmilter ``mfdef.h``): ``uint32 length`` (network order,
counting the command byte) + ``char command`` + payload. Strings are
NUL-terminated. Both directions are modelled: commands (MTA -> milter) and
responses (milter -> MTA), so tests can round-trip each one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Self, Union

MILTER_VERSION = 6
#: libmilter refuses packets above this by default (MILTER_MAX_DATA_SIZE*...);
#: we accept up to 1 MiB + slack, and reject anything larger as a protocol error.
MAX_PACKET_SIZE = 1024 * 1024 + 1024
#: body chunk size Postfix/Sendmail use unless SMFIP_MDS_* was negotiated.
BODY_CHUNK = 65535

# Actions the milter may take (SMFIF_*).
SMFIF_ADDHDRS = 0x001
SMFIF_CHGBODY = 0x002
SMFIF_ADDRCPT = 0x004
SMFIF_DELRCPT = 0x008
SMFIF_CHGHDRS = 0x010
SMFIF_QUARANTINE = 0x020
SMFIF_CHGFROM = 0x040
SMFIF_ADDRCPT_PAR = 0x080
SMFIF_SETSYMLIST = 0x100
SMFIF_ALL = 0x1FF

# Protocol flags (SMFIP_*).
SMFIP_NOCONNECT = 0x00000001
SMFIP_NOHELO = 0x00000002
SMFIP_NOMAIL = 0x00000004
SMFIP_NORCPT = 0x00000008
SMFIP_NOBODY = 0x00000010
SMFIP_NOHDRS = 0x00000020
SMFIP_NOEOH = 0x00000040
SMFIP_NR_HDR = 0x00000080
SMFIP_NOUNKNOWN = 0x00000100
SMFIP_NODATA = 0x00000200
SMFIP_SKIP = 0x00000400
SMFIP_RCPT_REJ = 0x00000800
SMFIP_NR_CONN = 0x00001000
SMFIP_NR_HELO = 0x00002000
SMFIP_NR_MAIL = 0x00004000
SMFIP_NR_RCPT = 0x00008000
SMFIP_NR_DATA = 0x00010000
SMFIP_NR_UNKN = 0x00020000
SMFIP_NR_EOH = 0x00040000
SMFIP_NR_BODY = 0x00080000
SMFIP_HDR_LEADSPC = 0x00100000

#: What this MTA offers: every step/no-reply flag it implements. Not offered:
#: SMFIP_RCPT_REJ (we never pass rejected recipients) and SMFIP_MDS_* (chunks
#: stay at 64 KiB).
MTA_PROTOCOL_OFFER = (
    SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
    | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA
    | SMFIP_SKIP | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
    | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC
)

# Macro stages (SMFIM_*), used in SMFIC_MACRO and in a milter's symbol lists.
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6


class MilterProtocolError(Exception):
    """Malformed, oversized or unexpected packet."""


# --------------------------------------------------------------------------- helpers


def _cstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError("NUL inside a milter string")
    return raw + b"\0"


def _split_cstrs(payload: bytes) -> list[str]:
    """Split NUL-terminated strings; the payload must end with a NUL."""
    if not payload:
        return []
    if not payload.endswith(b"\0"):
        raise MilterProtocolError("string not NUL-terminated")
    return [p.decode("utf-8", "surrogateescape") for p in payload[:-1].split(b"\0")]


def _need_strings(payload: bytes, count: int, what: str) -> list[str]:
    parts = _split_cstrs(payload)
    if len(parts) != count:
        raise MilterProtocolError("%s: expected %d strings, got %d" % (what, count, len(parts)))
    return parts


def _u32(payload: bytes, what: str) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise MilterProtocolError("%s: short payload" % what)
    return struct.unpack("!I", payload[:4])[0], payload[4:]


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Packet:
    """One framed packet: a command byte and its raw payload."""

    code: bytes
    payload: bytes


def frame(code: bytes, payload: bytes = b"") -> bytes:
    """Frame one packet (length counts the command byte)."""
    if len(code) != 1:
        raise ValueError("command code must be one byte")
    size = len(payload) + 1
    if size > MAX_PACKET_SIZE:
        raise ValueError("packet too large")
    return struct.pack("!I", size) + code + payload


class PacketDecoder:
    """Incremental framer: feed it whatever the socket returned.

    Partial reads are buffered; a declared length of 0 or above ``max_size``
    raises :class:`MilterProtocolError` before any payload is buffered, so a
    broken or hostile peer cannot make us allocate gigabytes.
    """

    def __init__(self, max_size: int = MAX_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        out: list[Packet] = []
        while len(self._buf) >= 4:
            (size,) = struct.unpack("!I", self._buf[:4])
            if size < 1 or size > self._max:
                raise MilterProtocolError("bad packet length %d" % size)
            if len(self._buf) < 4 + size:
                break
            code = bytes(self._buf[4:5])
            payload = bytes(self._buf[5 : 4 + size])
            del self._buf[: 4 + size]
            out.append(Packet(code, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet a complete packet."""
        return len(self._buf)


# --------------------------------------------------------------------------- payload layouts
# Most messages share one of a few layouts; each message class names its code (and the label its
# parse errors use) and inherits the layout.


@dataclass(frozen=True)
class _NoPayload:
    """The command byte alone (any payload is ignored, as libmilter does)."""

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls()


@dataclass(frozen=True)
class _Strings:
    """Every field is a string, sent as a NUL-terminated string, in field order."""

    LABEL: ClassVar[str]

    def payload(self) -> bytes:
        return b"".join(_cstr(getattr(self, f.name)) for f in fields(self))

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(*_need_strings(payload, len(fields(cls)), cls.LABEL))


@dataclass(frozen=True)
class _Chunk:
    """The payload is the raw bytes of ``chunk`` (a body chunk)."""

    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        return cls(payload)


@dataclass(frozen=True)
class _IndexedHeader:
    """``uint32 index``, then header name and value."""

    LABEL: ClassVar[str]
    index: int
    name: str
    value: str

    def payload(self) -> bytes:
        return struct.pack("!I", self.index) + _cstr(self.name) + _cstr(self.value)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        index, rest = _u32(payload, cls.LABEL)
        return cls(index, *_need_strings(rest, 2, cls.LABEL))


@dataclass(frozen=True)
class _AddressWithArgs:
    """An address and, optionally, its ESMTP arguments as one string."""

    LABEL: ClassVar[str]
    address: str
    args: str = ""

    def payload(self) -> bytes:
        return _cstr(self.address) + _cstr(self.args)

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        parts = _split_cstrs(payload)
        if not parts or len(parts) > 2:
            raise MilterProtocolError("%s: malformed" % cls.LABEL)
        return cls(parts[0], parts[1] if len(parts) > 1 else "")


# --------------------------------------------------------------------------- commands (MTA -> milter)


@dataclass(frozen=True)
class OptNeg:
    """SMFIC_OPTNEG / SMFIR_OPTNEG (same layout both ways; the milter may append
    symbol lists: stage -> space-separated macro names)."""

    CODE: ClassVar[bytes] = b"O"
    version: int = MILTER_VERSION
    actions: int = SMFIF_ALL
    protocol: int = MTA_PROTOCOL_OFFER
    macro_lists: tuple[tuple[int, str], ...] = ()

    def payload(self) -> bytes:
        out = struct.pack("!III", self.version, self.actions, self.protocol)
        for stage, names in self.macro_lists:
            out += struct.pack("!I", stage) + _cstr(names)
        return out

    @classmethod
    def parse(cls, payload: bytes) -> "OptNeg":
        if len(payload) < 12:
            raise MilterProtocolError("OPTNEG: short payload")
        version, actions, protocol = struct.unpack("!III", payload[:12])
        rest = payload[12:]
        lists: list[tuple[int, str]] = []
        while rest:
            stage, rest = _u32(rest, "OPTNEG macro list")
            end = rest.find(b"\0")
            if end < 0:
                raise MilterProtocolError("OPTNEG: macro list not NUL-terminated")
            lists.append((stage, rest[:end].decode("ascii", "replace")))
            rest = rest[end + 1 :]
        return cls(version, actions, protocol, tuple(lists))


@dataclass(frozen=True)
class Macro:
    """SMFIC_MACRO: macros for the command that follows (no reply)."""

    CODE: ClassVar[bytes] = b"D"
    command: bytes
    macros: tuple[tuple[str, str], ...]

    def payload(self) -> bytes:
        out = self.command
        for name, value in self.macros:
            out += _cstr(name) + _cstr(value)
        return out

    @classmethod
    def parse(cls, payload: bytes) -> "Macro":
        if not payload:
            raise MilterProtocolError("MACRO: empty")
        parts = _split_cstrs(payload[1:])
        if len(parts) % 2:
            raise MilterProtocolError("MACRO: odd name/value count")
        return cls(payload[:1], tuple(zip(parts[0::2], parts[1::2])))


@dataclass(frozen=True)
class Connect:
    """SMFIC_CONNECT. family: '4', '6', 'L' (unix socket) or 'U' (unknown)."""

    CODE: ClassVar[bytes] = b"C"
    hostname: str
    family: str = "4"
    port: int = 0
    address: str = ""

    def payload(self) -> bytes:
        out = _cstr(self.hostname) + self.family.encode("ascii")
        if self.family != "U":
            out += struct.pack("!H", self.port) + _cstr(self.address)
        return out

    @classmethod
    def parse(cls, payload: bytes) -> "Connect":
        end = payload.find(b"\0")
        if end < 0 or len(payload) < end + 2:
            raise MilterProtocolError("CONNECT: malformed")
        host = payload[:end].decode("utf-8", "surrogateescape")
        family = payload[end + 1 : end + 2].decode("ascii")
        if family == "U":
            return cls(host, "U")
        rest = payload[end + 2 :]
        if len(rest) < 3:
            raise MilterProtocolError("CONNECT: short address")
        (port,) = struct.unpack("!H", rest[:2])
        (addr,) = _need_strings(rest[2:], 1, "CONNECT")
        return cls(host, family, port, addr)


@dataclass(frozen=True)
class Helo(_Strings):
    CODE: ClassVar[bytes] = b"H"
    LABEL: ClassVar[str] = "HELO"
    name: str


@dataclass(frozen=True)
class _EnvelopeCommand:
    """``<addr>`` then ESMTP parameters (SMFIC_MAIL and SMFIC_RCPT share the layout)."""

    address: str
    args: tuple[str, ...] = ()

    def payload(self) -> bytes:
        return b"".join(_cstr(s) for s in (self.address, *self.args))

    @classmethod
    def parse(cls, payload: bytes) -> "_EnvelopeCommand":
        parts = _split_cstrs(payload)
        if not parts:
            raise MilterProtocolError("%s: empty" % cls.LABEL)  # type: ignore[attr-defined]
        return cls(parts[0], tuple(parts[1:]))


@dataclass(frozen=True)
class MailFrom(_EnvelopeCommand):
    """SMFIC_MAIL."""

    CODE: ClassVar[bytes] = b"M"
    LABEL: ClassVar[str] = "MAIL"


@dataclass(frozen=True)
class RcptTo(_EnvelopeCommand):
    """SMFIC_RCPT."""

    CODE: ClassVar[bytes] = b"R"
    LABEL: ClassVar[str] = "RCPT"


@dataclass(frozen=True)
class Data(_NoPayload):
    CODE: ClassVar[bytes] = b"T"


@dataclass(frozen=True)
class Header(_Strings):
    CODE: ClassVar[bytes] = b"L"
    LABEL: ClassVar[str] = "HEADER"
    name: str
    value: str


@dataclass(frozen=True)
class EndOfHeaders(_NoPayload):
    CODE: ClassVar[bytes] = b"N"


@dataclass(frozen=True)
class Body(_Chunk):
    CODE: ClassVar[bytes] = b"B"


@dataclass(frozen=True)
class EndOfMessage(_Chunk):
    CODE: ClassVar[bytes] = b"E"
    chunk: bytes = b""


@dataclass(frozen=True)
class Abort(_NoPayload):
    CODE: ClassVar[bytes] = b"A"


@dataclass(frozen=True)
class Quit(_NoPayload):
    CODE: ClassVar[bytes] = b"Q"


@dataclass(frozen=True)
class QuitNewConnection(_NoPayload):
    """SMFIC_QUIT_NC (v6): close this session, keep the socket for a new one."""

    CODE: ClassVar[bytes] = b"K"


@dataclass(frozen=True)
class Unknown(_Strings):
    CODE: ClassVar[bytes] = b"U"
    LABEL: ClassVar[str] = "UNKNOWN"
    command: str


Command = Union[OptNeg, Macro, Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders,
                Body, EndOfMessage, Abort, Quit, QuitNewConnection, Unknown]

# --------------------------------------------------------------------------- responses (milter -> MTA)


@dataclass(frozen=True)
class Accept(_NoPayload):
    """SMFIR_ACCEPT: accept; no further callbacks for this message."""

    CODE: ClassVar[bytes] = b"a"


@dataclass(frozen=True)
class Continue(_NoPayload):
    CODE: ClassVar[bytes] = b"c"


@dataclass(frozen=True)
class Reject(_NoPayload):
    CODE: ClassVar[bytes] = b"r"


@dataclass(frozen=True)
class TempFail(_NoPayload):
    CODE: ClassVar[bytes] = b"t"


@dataclass(frozen=True)
class Discard(_NoPayload):
    CODE: ClassVar[bytes] = b"d"


@dataclass(frozen=True)
class Skip(_NoPayload):
    """SMFIR_SKIP: stop sending body chunks (only with SMFIP_SKIP)."""

    CODE: ClassVar[bytes] = b"s"


@dataclass(frozen=True)
class ReplyCode(_Strings):
    """SMFIR_REPLYCODE: full SMTP reply text, e.g. ``550 5.7.1 go away``."""

    CODE: ClassVar[bytes] = b"y"
    LABEL: ClassVar[str] = "REPLYCODE"
    text: str

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        reply = super().parse(payload)
        if len(reply.text) < 3 or not reply.text[:3].isdigit() or reply.text[0] not in "45":
            raise MilterProtocolError("REPLYCODE: not a 4xx/5xx reply")
        return reply

    @property
    def code(self) -> int:
        return int(self.text[:3])


@dataclass(frozen=True)
class ShutDown(_NoPayload):
    """SMFIR_SHUTDOWN ('4'): 421, close the SMTP session."""

    CODE: ClassVar[bytes] = b"4"


@dataclass(frozen=True)
class ConnFail(_NoPayload):
    CODE: ClassVar[bytes] = b"f"


@dataclass(frozen=True)
class Progress(_NoPayload):
    """SMFIR_PROGRESS: still working — restart the reply timeout."""

    CODE: ClassVar[bytes] = b"p"


@dataclass(frozen=True)
class AppendHeader(_Strings):
    """SMFIR_ADDHEADER: append a header at the end of the header block."""

    CODE: ClassVar[bytes] = b"h"
    LABEL: ClassVar[str] = "ADDHEADER"
    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader(_IndexedHeader):
    """SMFIR_INSHEADER: insert at 0-based ``index`` among all headers."""

    CODE: ClassVar[bytes] = b"i"
    LABEL: ClassVar[str] = "INSHEADER"


@dataclass(frozen=True)
class ChangeHeader(_IndexedHeader):
    """SMFIR_CHGHEADER: change the ``index``-th (1-based) header of that name;
    an empty value deletes it."""

    CODE: ClassVar[bytes] = b"m"
    LABEL: ClassVar[str] = "CHGHEADER"


@dataclass(frozen=True)
class Quarantine(_Strings):
    CODE: ClassVar[bytes] = b"q"
    LABEL: ClassVar[str] = "QUARANTINE"
    reason: str


@dataclass(frozen=True)
class ReplaceBody(_Chunk):
    CODE: ClassVar[bytes] = b"b"


@dataclass(frozen=True)
class AddRcpt(_Strings):
    CODE: ClassVar[bytes] = b"+"
    LABEL: ClassVar[str] = "ADDRCPT"
    address: str


@dataclass(frozen=True)
class AddRcptPar(_AddressWithArgs):
    CODE: ClassVar[bytes] = b"2"
    LABEL: ClassVar[str] = "ADDRCPT_PAR"


@dataclass(frozen=True)
class DelRcpt(_Strings):
    CODE: ClassVar[bytes] = b"-"
    LABEL: ClassVar[str] = "DELRCPT"
    address: str


@dataclass(frozen=True)
class ChangeFrom(_AddressWithArgs):
    CODE: ClassVar[bytes] = b"e"
    LABEL: ClassVar[str] = "CHGFROM"

    def payload(self) -> bytes:
        return _cstr(self.address) + (_cstr(self.args) if self.args else b"")


#: Final verdicts end the wait for a reply; everything else is a modification
#: (only legal after EOM) or progress.
VerdictResponse = Union[Accept, Continue, Reject, TempFail, Discard, Skip, ReplyCode, ShutDown,
                        ConnFail]
Modification = Union[AppendHeader, InsertHeader, ChangeHeader, Quarantine, ReplaceBody,
                     AddRcpt, AddRcptPar, DelRcpt, ChangeFrom]
Response = Union[VerdictResponse, Modification, Progress, OptNeg]

VERDICT_TYPES: tuple[type, ...] = (Accept, Continue, Reject, TempFail, Discard, Skip,
                                   ReplyCode, ShutDown, ConnFail)
MODIFICATION_TYPES: tuple[type, ...] = (AppendHeader, InsertHeader, ChangeHeader, Quarantine,
                                        ReplaceBody, AddRcpt, AddRcptPar, DelRcpt, ChangeFrom)


def _registry(types: tuple[type, ...]) -> dict[bytes, type]:
    reg: dict[bytes, type] = {}
    for t in types:
        code = t.CODE  # type: ignore[attr-defined]
        if code in reg:
            raise RuntimeError("duplicate milter code %r" % code)
        reg[code] = t
    return reg


COMMANDS: dict[bytes, type] = _registry((OptNeg, Macro, Connect, Helo, MailFrom, RcptTo, Data,
                                        Header, EndOfHeaders, Body, EndOfMessage, Abort, Quit,
                                        QuitNewConnection, Unknown))
RESPONSES: dict[bytes, type] = _registry((OptNeg, Progress, *VERDICT_TYPES, *MODIFICATION_TYPES))


def encode(message: Command | Response) -> bytes:
    """Frame a command or a response."""
    return frame(message.CODE, message.payload())  # type: ignore[union-attr]


def parse_command(packet: Packet) -> Command:
    cls = COMMANDS.get(packet.code)
    if cls is None:
        raise MilterProtocolError("unknown command %r" % packet.code)
    return cls.parse(packet.payload)  # type: ignore[no-any-return]


def parse_response(packet: Packet) -> Response:
    cls = RESPONSES.get(packet.code)
    if cls is None:
        raise MilterProtocolError("unknown response %r" % packet.code)
    return cls.parse(packet.payload)  # type: ignore[no-any-return]


def decode_all(data: bytes, *, responses: bool = True) -> list[Command | Response]:
    """Decode a complete byte string (tests, tooling). Leftover bytes are an error."""
    dec = PacketDecoder()
    packets = dec.feed(data)
    if dec.pending:
        raise MilterProtocolError("trailing partial packet")
    parse = parse_response if responses else parse_command
    return [parse(p) for p in packets]

