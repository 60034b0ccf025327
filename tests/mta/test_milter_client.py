"""MilterClientSession against a scripted byte-level milter: negotiation flags,
no-reply flags, progress, timeouts, modifications, failure -> default action."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Optional

import pytest

from milterd.mta import milter_codec as mc
from milterd.mta.milter_client import MilterClientSession
from mta_fixtures import (  # noqa: F401 - pytest fixtures, used by name
    allow_warnings, no_unexpected_warnings, short_dir)

Script = Callable[[object], "list[mc.Response] | None"]


class FakeMilter:
    """Replies to each command with what ``script(command)`` returns
    (None = send nothing)."""

    def __init__(self, optneg: mc.OptNeg, script: Script) -> None:
        self.optneg = optneg
        self.script = script
        self.received: list[object] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = mc.PacketDecoder()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            for p in dec.feed(data):
                cmd = mc.parse_command(p)
                self.received.append(cmd)
                if isinstance(cmd, mc.OptNeg):
                    out: Optional[list[mc.Response]] = [self.optneg]
                else:
                    out = self.script(cmd)
                for r in out or []:
                    writer.write(mc.encode(r))
                await writer.drain()
        writer.close()


async def _with_fake(tmp: Path, fake: FakeMilter, body, **kw):  # type: ignore[no-untyped-def]
    sock = tmp / "f.sock"
    server = await asyncio.start_unix_server(fake.handle, str(sock))
    try:
        session = MilterClientSession("unix:%s" % sock, **kw)
        return await body(session)
    finally:
        server.close()
        await server.wait_closed()


def _cont(cmd: object) -> list[mc.Response]:
    if isinstance(cmd, (mc.Macro, mc.Abort, mc.Quit)):
        return []
    return [mc.Continue()]


@pytest.fixture
def tmp(short_dir: Path, request: pytest.FixtureRequest) -> Path:
    d = short_dir / ("c%d" % (abs(hash(request.node.nodeid)) % 10**8))
    d.mkdir(exist_ok=True)
    return d


def test_skipped_steps_and_no_reply_flags(tmp):
    proto = (mc.SMFIP_NOCONNECT | mc.SMFIP_NOHELO | mc.SMFIP_NR_MAIL | mc.SMFIP_NOBODY
             | mc.SMFIP_NR_HDR | mc.SMFIP_NOEOH)

    def script(cmd):  # type: ignore[no-untyped-def]
        if isinstance(cmd, (mc.MailFrom, mc.Header, mc.Macro)):
            return []  # no-reply stages: the milter stays silent
        return [mc.Continue()]

    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ADDHDRS, proto), script)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        results = [await s.connect("h", "4", 1, "127.0.0.1", {}),
                   await s.helo("x", {}),
                   await s.mail("a@b", (), {"i": "Q1"}),
                   await s.rcpt("c@d", (), {}),
                   await s.header("Subject", " hi"),
                   await s.eoh({}),
                   await s.body(b"body"),
                   await s.eom({})]
        await s.close()
        return results

    results = asyncio.run(_with_fake(tmp, fake, body, command_timeout=2))
    assert all(r.verdict == "continue" and not r.failed for r in results)
    kinds = [type(c).__name__ for c in fake.received if not isinstance(c, mc.Macro)]
    assert kinds == ["OptNeg", "MailFrom", "RcptTo", "Header", "EndOfMessage", "Quit"]
    # without HDR_LEADSPC the leading space is stripped
    assert mc.Header("Subject", "hi") in fake.received


def test_progress_then_modifications_then_replycode(tmp):
    def script(cmd):  # type: ignore[no-untyped-def]
        if isinstance(cmd, mc.EndOfMessage):
            return [mc.Progress(), mc.AppendHeader("X-A", "1"), mc.Progress(),
                    mc.Quarantine("why"), mc.ReplyCode("554 5.7.1 Domain security failure")]
        return _cont(cmd)

    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ALL, 0), script)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        await s.mail("a@b", (), {})
        return await s.eom({})

    res = asyncio.run(_with_fake(tmp, fake, body, command_timeout=2))
    assert res.verdict == "reject" and res.reply == "554 5.7.1 Domain security failure"
    assert res.modifications == (mc.AppendHeader("X-A", "1"), mc.Quarantine("why"))


def test_modification_outside_eom_is_a_protocol_error(tmp, allow_warnings):
    def script(cmd):  # type: ignore[no-untyped-def]
        if isinstance(cmd, mc.MailFrom):
            return [mc.AppendHeader("X", "y"), mc.Continue()]
        return _cont(cmd)

    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ALL, 0), script)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        first = await s.mail("a@b", (), {})
        second = await s.rcpt("c@d", (), {})
        return first, second

    first, second = asyncio.run(_with_fake(tmp, fake, body, command_timeout=2))
    assert first.failed and first.verdict == "tempfail"
    assert first.reply == "451 4.7.1 Service unavailable - try again later"
    assert second.failed  # stays on the default action for the rest of the connection


@pytest.mark.parametrize("default, verdict", [("tempfail", "tempfail"), ("reject", "reject"),
                                              ("accept", "continue")])
def test_timeout_applies_default_action(tmp, default, verdict, allow_warnings):
    def script(cmd):  # type: ignore[no-untyped-def]
        return [] if isinstance(cmd, mc.MailFrom) else _cont(cmd)  # hangs on MAIL

    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ALL, 0), script)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        return await s.mail("a@b", (), {})

    res = asyncio.run(_with_fake(tmp, fake, body, command_timeout=0.2, default_action=default))
    assert res.failed and res.verdict == verdict


def test_accept_ends_the_message_and_macro_lists_are_honoured(tmp):
    def script(cmd):  # type: ignore[no-untyped-def]
        if isinstance(cmd, mc.MailFrom):
            return [mc.Accept()]
        return _cont(cmd)

    lists = ((mc.SMFIM_ENVFROM, "{verify} {cert_fp}"),)
    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ALL, 0, lists), script)
    macros = {"i": "Q1", "{verify}": "OK", "{cert_fp}": "AA:BB", "{client_addr}": "127.0.0.1"}

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        a = await s.mail("a@b", (), macros)
        b = await s.rcpt("c@d", (), macros)
        c = await s.eom(macros)
        return a, b, c

    a, b, c = asyncio.run(_with_fake(tmp, fake, body, command_timeout=2))
    assert a.verdict == "accept" and b.verdict == "continue" and c.verdict == "continue"
    sent = [c for c in fake.received if not isinstance(c, mc.OptNeg)]
    assert sent == [mc.Macro(b"M", (("{verify}", "OK"), ("{cert_fp}", "AA:BB"))),
                    mc.MailFrom("<a@b>")]


def test_unreachable_milter_fails_once_and_keeps_failing(allow_warnings):
    async def body() -> tuple[bool, str]:
        s = MilterClientSession("inet:1@127.0.0.1", connect_timeout=2)
        ok = await s.open()
        res = await s.mail("a@b", (), {})
        return ok, res.reply or ""

    ok, reply = asyncio.run(body())
    assert not ok and reply.startswith("451 4.7.1")


def test_header_leading_space_negotiated(tmp):
    fake = FakeMilter(mc.OptNeg(6, mc.SMFIF_ALL, mc.SMFIP_HDR_LEADSPC), _cont)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        await s.mail("a@b", (), {})
        await s.header("Subject", "  two spaces")
        return s.leading_space

    assert asyncio.run(_with_fake(tmp, fake, body, command_timeout=2)) is True
    assert mc.Header("Subject", "  two spaces") in fake.received


def test_milter_may_only_switch_off_offered_steps(tmp):
    fake = FakeMilter(mc.OptNeg(6, 0xFFFF, 0xFFFFFFFF), _cont)

    async def body(s: MilterClientSession):  # type: ignore[no-untyped-def]
        assert await s.open()
        return s.negotiated

    neg = asyncio.run(_with_fake(tmp, fake, body, command_timeout=2))
    assert neg.protocol == mc.MTA_PROTOCOL_OFFER and neg.actions == mc.SMFIF_ALL
