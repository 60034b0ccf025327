"""The milter v6 codec on raw bytes: every command and response, framing,
partial reads, size limits, malformed input; plus the pure header-edit
function and socket specs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterd.mta import milter_codec as mc
from milterd.mta.message import HeaderField, apply_header_modifications
from milterd.mta.milter_client import SocketSpec


def pkt(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


COMMANDS = [
    (mc.OptNeg(6, 0x1FF, 0x1FFFFF),
     pkt(b"O", b"\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")),
    (mc.Macro(b"C", (("j", "mx.test"), ("{client_addr}", "127.0.0.1"))),
     pkt(b"D", b"Cj\x00mx.test\x00{client_addr}\x00127.0.0.1\x00")),
    (mc.Connect("[127.0.0.1]", "4", 2525, "127.0.0.1"),
     pkt(b"C", b"[127.0.0.1]\x004\x09\xdd127.0.0.1\x00")),
    (mc.Connect("localhost", "U"), pkt(b"C", b"localhost\x00U")),
    (mc.Connect("h", "6", 25, "::1"), pkt(b"C", b"h\x006\x00\x19::1\x00")),
    (mc.Helo("client.test"), pkt(b"H", b"client.test\x00")),
    (mc.MailFrom("<a@b.test>", ("SIZE=10", "BODY=8BITMIME")),
     pkt(b"M", b"<a@b.test>\x00SIZE=10\x00BODY=8BITMIME\x00")),
    (mc.RcptTo("<c@d.test>"), pkt(b"R", b"<c@d.test>\x00")),
    (mc.Data(), pkt(b"T")),
    (mc.Header("Subject", "hi there"), pkt(b"L", b"Subject\x00hi there\x00")),
    (mc.EndOfHeaders(), pkt(b"N")),
    (mc.Body(b"line\r\n\x00binary"), pkt(b"B", b"line\r\n\x00binary")),
    (mc.EndOfMessage(), pkt(b"E")),
    (mc.Abort(), pkt(b"A")),
    (mc.Quit(), pkt(b"Q")),
    (mc.QuitNewConnection(), pkt(b"K")),
    (mc.Unknown("XFOO bar"), pkt(b"U", b"XFOO bar\x00")),
]

RESPONSES = [
    (mc.Accept(), pkt(b"a")),
    (mc.Continue(), pkt(b"c")),
    (mc.Reject(), pkt(b"r")),
    (mc.TempFail(), pkt(b"t")),
    (mc.Discard(), pkt(b"d")),
    (mc.Skip(), pkt(b"s")),
    (mc.Progress(), pkt(b"p")),
    (mc.ShutDown(), pkt(b"4")),
    (mc.ConnFail(), pkt(b"f")),
    (mc.ReplyCode("550 5.7.1 go away"), pkt(b"y", b"550 5.7.1 go away\x00")),
    (mc.AppendHeader("X-A", "1"), pkt(b"h", b"X-A\x001\x00")),
    (mc.InsertHeader(0, "X-B", "2"), pkt(b"i", b"\x00\x00\x00\x00X-B\x002\x00")),
    (mc.ChangeHeader(2, "Subject", ""), pkt(b"m", b"\x00\x00\x00\x02Subject\x00\x00")),
    (mc.Quarantine("spam"), pkt(b"q", b"spam\x00")),
    (mc.ReplaceBody(b"new body"), pkt(b"b", b"new body")),
    (mc.AddRcpt("<x@y>"), pkt(b"+", b"<x@y>\x00")),
    (mc.AddRcptPar("<x@y>", "NOTIFY=NEVER"), pkt(b"2", b"<x@y>\x00NOTIFY=NEVER\x00")),
    (mc.DelRcpt("<x@y>"), pkt(b"-", b"<x@y>\x00")),
    (mc.ChangeFrom("<s@t>", "SIZE=1"), pkt(b"e", b"<s@t>\x00SIZE=1\x00")),
    (mc.OptNeg(6, 0x11, 0x13, ((mc.SMFIM_ENVFROM, "{verify} {cert_fp}"),)),
     pkt(b"O", b"\x00\x00\x00\x06\x00\x00\x00\x11\x00\x00\x00\x13"
               b"\x00\x00\x00\x02{verify} {cert_fp}\x00")),
]


@pytest.mark.parametrize("message, raw", COMMANDS, ids=lambda x: type(x).__name__)
def test_command_encodes_to_raw_bytes_and_back(message, raw):
    assert mc.encode(message) == raw
    assert mc.decode_all(raw, responses=False) == [message]


@pytest.mark.parametrize("message, raw", RESPONSES, ids=lambda x: type(x).__name__)
def test_response_encodes_to_raw_bytes_and_back(message, raw):
    assert mc.encode(message) == raw
    assert mc.decode_all(raw) == [message]


def test_registries_cover_distinct_codes():
    assert len(mc.COMMANDS) == 15 and len(mc.RESPONSES) == 20


def test_partial_reads_one_byte_at_a_time():
    stream = b"".join(raw for _, raw in RESPONSES)
    dec = mc.PacketDecoder()
    packets = []
    for i in range(len(stream)):
        packets += dec.feed(stream[i:i + 1])
    assert dec.pending == 0
    assert [mc.parse_response(p) for p in packets] == [m for m, _ in RESPONSES]


def test_several_packets_in_one_read_and_a_split_tail():
    a, b = mc.encode(mc.AppendHeader("X", "y")), mc.encode(mc.Accept())
    dec = mc.PacketDecoder()
    assert [mc.parse_response(p) for p in dec.feed(a + b[:3])] == [mc.AppendHeader("X", "y")]
    assert dec.pending == 3
    assert [mc.parse_response(p) for p in dec.feed(b[3:])] == [mc.Accept()]


def test_oversized_length_is_refused_before_buffering():
    dec = mc.PacketDecoder(max_size=1024)
    with pytest.raises(mc.MilterProtocolError):
        dec.feed(struct.pack("!I", 1025) + b"b")
    with pytest.raises(mc.MilterProtocolError):
        mc.PacketDecoder().feed(struct.pack("!I", 0))


@pytest.mark.parametrize("raw", [
    pkt(b"h", b"X-A\x001"),                 # value not NUL-terminated
    pkt(b"h", b"X-A\x00"),                  # value missing
    pkt(b"y", b"250 ok\x00"),               # REPLYCODE must be 4xx/5xx
    pkt(b"i", b"\x00\x00"),                 # short index
    pkt(b"O", b"\x00\x00\x00\x06"),         # short OPTNEG
    pkt(b"Z"),                              # unknown code
])
def test_malformed_responses_raise(raw):
    with pytest.raises(mc.MilterProtocolError):
        mc.decode_all(raw)


def test_trailing_partial_packet_is_an_error():
    with pytest.raises(mc.MilterProtocolError):
        mc.decode_all(mc.encode(mc.Accept()) + b"\x00\x00")


def test_nul_inside_a_string_is_refused_on_encode():
    with pytest.raises(ValueError):
        mc.encode(mc.Helo("a\x00b"))


_text = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                       blacklist_categories=("Cs",)), max_size=200)


@given(name=_text.filter(bool), value=_text)
def test_header_round_trip(name, value):
    assert mc.decode_all(mc.encode(mc.Header(name, value)), responses=False) == [
        mc.Header(name, value)]


@given(addr=_text, args=st.lists(_text.filter(bool), max_size=4))
def test_mail_round_trip(addr, args):
    m = mc.MailFrom(addr or "<>", tuple(args))
    assert mc.decode_all(mc.encode(m), responses=False) == [m]


@given(body=st.binary(max_size=5000), splits=st.lists(st.integers(0, 5000), max_size=5))
def test_body_round_trip_with_arbitrary_splits(body, splits):
    raw = mc.encode(mc.Body(body))
    dec = mc.PacketDecoder()
    out = []
    last = 0
    for cut in sorted(set(min(s, len(raw)) for s in splits)) + [len(raw)]:
        out += dec.feed(raw[last:cut])
        last = cut
    assert [mc.parse_command(p) for p in out] == [mc.Body(body)]


# ---------------------------------------------------------------------- header edits


def _hdrs() -> list[HeaderField]:
    return [HeaderField("Received", " from x", hidden=True), HeaderField("Subject", " a"),
            HeaderField("X-Dup", " 1"), HeaderField("X-Dup", " 2")]


def test_add_insert_change_delete():
    out = apply_header_modifications(_hdrs(), (
        mc.AppendHeader("X-End", "e"),
        mc.InsertHeader(0, "X-Top", "t"),
        mc.ChangeHeader(2, "x-dup", "second"),
        mc.ChangeHeader(1, "Subject", ""),
    ), leading_space=False)
    assert [(h.name, h.value) for h in out] == [
        ("X-Top", " t"), ("Received", " from x"), ("X-Dup", " 1"), ("X-Dup", " second"),
        ("X-End", " e")]


def test_change_of_missing_header_adds_it_and_hidden_headers_are_untouchable():
    out = apply_header_modifications(_hdrs(), (
        mc.ChangeHeader(1, "Received", "forged"),   # our Received is hidden: adds instead
        mc.ChangeHeader(5, "X-Dup", ""),            # deleting a missing one: no-op
    ), leading_space=False)
    assert out[0].value == " from x"
    assert out[-1].name == "Received" and out[-1].value == " forged"
    assert len(out) == 5


def test_leading_space_mode_keeps_values_verbatim():
    out = apply_header_modifications([], (mc.AppendHeader("X", "\tv"),), leading_space=True)
    assert out[0].render() == b"X:\tv\r\n"
    out = apply_header_modifications([], (mc.AppendHeader("X", "v\n\tw"),), leading_space=False)
    assert out[0].render() == b"X: v\r\n\tw\r\n"


@pytest.mark.parametrize("spec, expected", [
    ("unix:/run/m.sock", SocketSpec("unix", path="/run/m.sock")),
    ("local:/run/m.sock", SocketSpec("unix", path="/run/m.sock")),
    ("inet:8894@127.0.0.1", SocketSpec("inet", host="127.0.0.1", port=8894)),
    ("inet6:8894@[::1]", SocketSpec("inet", host="::1", port=8894)),
])
def test_socket_specs(spec, expected):
    assert SocketSpec.parse(spec) == expected


@pytest.mark.parametrize("spec", ["/run/m.sock", "inet:127.0.0.1", "tcp:1@x", "unix:"])
def test_bad_socket_specs(spec):
    with pytest.raises(ValueError):
        SocketSpec.parse(spec)
