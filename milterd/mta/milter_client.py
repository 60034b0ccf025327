"""Milter protocol v6 client: the MTA side, as Postfix/Sendmail speak it.

Why: milterd must be tested against an MTA that behaves like Postfix and
Sendmail towards a milter — negotiates options, sends macros before each
stage, skips the stages the milter declined, does not wait for replies the
milter said it will not send, and applies every action it returns. A real
Postfix is slow to set up; this client is small enough to reason about and
exercises the same wire protocol (see :mod:`milterd.mta.milter_codec`).

One :class:`MilterClientSession` per SMTP connection (like Postfix). A milter that is
down, slow or broken does not crash the SMTP session: every later stage
answers with the configured default action (``tempfail`` by default, like
Postfix's ``milter_default_action``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

from . import milter_codec as mc

log = logging.getLogger(__name__)

VerdictName = Literal["continue", "accept", "reject", "tempfail", "discard", "shutdown"]
DefaultAction = Literal["tempfail", "accept", "reject"]

#: Sendmail-style superset of macros this MTA offers, per stage.
DEFAULT_MACROS: dict[int, tuple[str, ...]] = {
    mc.SMFIM_CONNECT: ("j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
                       "{client_addr}", "{client_port}", "{client_name}", "{client_ptr}"),
    mc.SMFIM_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{verify}", "{cert_subject}",
                    "{cert_issuer}", "{cn_subject}", "{cn_issuer}", "{cert_fp}"),
    mc.SMFIM_ENVFROM: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}", "{tls_version}",
                       "{cipher}", "{cipher_bits}", "{verify}", "{cert_subject}", "{cert_issuer}",
                       "{cn_subject}", "{cn_issuer}", "{cert_fp}", "{cert_pubkey_fp}",
                       "{client_addr}", "{client_port}"),
    mc.SMFIM_ENVRCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    mc.SMFIM_DATA: ("i",),
    mc.SMFIM_EOH: ("i",),
    mc.SMFIM_EOM: ("i", "{msg_id}", "{tls_version}", "{cipher}", "{cipher_bits}", "{verify}",
                   "{cert_subject}", "{cert_issuer}", "{cn_subject}", "{cn_issuer}", "{cert_fp}",
                   "{cert_pubkey_fp}"),
}

_STAGE_COMMAND = {
    mc.SMFIM_CONNECT: b"C", mc.SMFIM_HELO: b"H", mc.SMFIM_ENVFROM: b"M",
    mc.SMFIM_ENVRCPT: b"R", mc.SMFIM_DATA: b"T", mc.SMFIM_EOH: b"N", mc.SMFIM_EOM: b"E",
}

#: Replies Postfix uses when a milter rejects/tempfails without its own text.
DEFAULT_REPLIES: dict[str, str] = {
    "reject": "550 5.7.1 Command rejected",
    "tempfail": "451 4.7.1 Service unavailable - try again later",
    "shutdown": "421 4.7.0 Server closing connection",
}


@dataclass(frozen=True)
class SocketSpec:
    """A libmilter socket spec: ``unix:/path`` (or ``local:``) or ``inet:PORT@HOST``."""

    kind: Literal["unix", "inet"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> "SocketSpec":
        proto, sep, rest = spec.partition(":")
        if not sep:
            raise ValueError("milter socket spec needs a 'unix:' or 'inet:' prefix")
        if proto in ("unix", "local"):
            if not rest:
                raise ValueError("unix socket spec needs a path")
            return cls("unix", path=rest)
        if proto in ("inet", "inet6"):
            port, at, host = rest.partition("@")
            if not at or not port.isdigit():
                raise ValueError("inet socket spec must be inet:PORT@HOST")
            return cls("inet", host=host.strip("[]"), port=int(port))
        raise ValueError("unsupported milter socket type %r" % proto)

    def __str__(self) -> str:
        return "unix:%s" % self.path if self.kind == "unix" else "inet:%d@%s" % (self.port, self.host)


@dataclass(frozen=True)
class StageResult:
    """What the milter decided for one stage.

    ``reply`` is the SMTP reply to give (a milter's SMFIR_REPLYCODE verbatim,
    or the Postfix default text); ``None`` means "carry on normally".
    ``modifications`` is only non-empty at end-of-message.
    """

    verdict: VerdictName = "continue"
    reply: Optional[str] = None
    modifications: tuple[mc.Modification, ...] = ()
    failed: bool = False  # the milter was unreachable/broke: default action applied

    @property
    def refuses(self) -> bool:
        return self.verdict in ("reject", "tempfail", "shutdown")


STAGE_CONTINUE = StageResult()


@dataclass
class Negotiated:
    """The result of option negotiation."""

    version: int
    actions: int
    protocol: int
    macro_lists: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def skips(self, flag: int) -> bool:
        return bool(self.protocol & flag)


class MilterClientSession:
    """One milter conversation for one SMTP connection, from the MTA's side (the milter's side
    of milterd is :class:`milterd.inbound.milter_adapter.MilterSession`).

    Every public stage method returns a :class:`StageResult` and never raises
    for milter failures. After the milter said ``accept`` (or after
    ``reject``/``discard`` of the message) the remaining message stages are
    not sent, as libmilter expects.
    """

    def __init__(self, spec: SocketSpec | str, *, default_action: DefaultAction = "tempfail",
                 connect_timeout: float = 5.0, command_timeout: float = 30.0,
                 log_prefix: str = "") -> None:
        self.spec = SocketSpec.parse(spec) if isinstance(spec, str) else spec
        self.default_action = default_action
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.negotiated: Optional[Negotiated] = None
        self.quarantine_reason: Optional[str] = None
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._decoder = mc.PacketDecoder()
        self._pending: list[mc.Packet] = []
        self._failed = False
        self._conn_done = False   # connection-level accept: milter out of the loop
        self._msg_done = False    # message-level accept/discard/reject
        self._skip_body = False
        self._prefix = log_prefix

    # ------------------------------------------------------------------ plumbing

    @property
    def failed(self) -> bool:
        return self._failed

    def _default_result(self) -> StageResult:
        if self.default_action == "accept":
            return StageResult("continue", failed=True)
        return StageResult(self.default_action, DEFAULT_REPLIES[self.default_action], failed=True)

    def _fail(self, why: str, *args: object) -> StageResult:
        if not self._failed:
            log.warning("%smilter %s: " + why + "; default action %s", self._prefix, self.spec,
                        *args, self.default_action)
        self._failed = True
        self._close_transport()
        return self._default_result()

    def _close_transport(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None

    async def _send(self, *messages: mc.Command) -> None:
        assert self._writer is not None
        # One write per batch: avoids the Nagle/delayed-ACK stall Postfix
        # suffers when it writes macro and command separately.
        self._writer.write(b"".join(mc.encode(m) for m in messages))
        await asyncio.wait_for(self._writer.drain(), self.command_timeout)

    async def _read_response(self) -> mc.Response:
        assert self._reader is not None
        while not self._pending:
            data = await asyncio.wait_for(self._reader.read(65536), self.command_timeout)
            if not data:
                raise ConnectionError("milter closed the connection")
            self._pending.extend(self._decoder.feed(data))
        return mc.parse_response(self._pending.pop(0))

    async def _read_verdict(self, *, allow_mods: bool) -> tuple[mc.Response, list[mc.Modification]]:
        mods: list[mc.Modification] = []
        while True:
            resp = await self._read_response()
            if isinstance(resp, mc.Progress):
                continue  # timeout restarts on the next read
            if isinstance(resp, mc.MODIFICATION_TYPES):
                if not allow_mods:
                    raise mc.MilterProtocolError("modification outside end-of-message")
                if isinstance(resp, mc.Quarantine):
                    self.quarantine_reason = resp.reason
                mods.append(resp)  # type: ignore[arg-type]
                continue
            if isinstance(resp, mc.VERDICT_TYPES):
                return resp, mods
            raise mc.MilterProtocolError("unexpected response %r" % type(resp).__name__)

    def _macro_packet(self, stage: int, macros: Mapping[str, str]) -> Optional[mc.Macro]:
        assert self.negotiated is not None
        wanted = self.negotiated.macro_lists.get(stage, DEFAULT_MACROS.get(stage, ()))
        pairs = []
        for name in wanted:
            key = name if len(name) == 1 or name.startswith("{") else "{%s}" % name
            if key in macros:
                pairs.append((key, macros[key]))
        if not pairs:
            return None
        return mc.Macro(_STAGE_COMMAND[stage], tuple(pairs))

    async def _stage(self, command: mc.Command, *, stage: Optional[int], macros: Mapping[str, str],
                     no_reply_flag: int, allow_mods: bool = False,
                     message_level: bool = True) -> StageResult:
        if self._failed:
            return self._default_result()
        if self._conn_done or (message_level and self._msg_done) or self._writer is None:
            return STAGE_CONTINUE
        assert self.negotiated is not None
        batch: list[mc.Command] = []
        if stage is not None:
            m = self._macro_packet(stage, macros)
            if m is not None:
                batch.append(m)
        batch.append(command)
        try:
            await self._send(*batch)
            if self.negotiated.skips(no_reply_flag) if no_reply_flag else False:
                return STAGE_CONTINUE
            resp, mods = await self._read_verdict(allow_mods=allow_mods)
        except asyncio.TimeoutError:
            return self._fail("timed out after %s", type(command).__name__)
        except (OSError, ConnectionError, mc.MilterProtocolError) as exc:
            return self._fail("%s during %s", type(exc).__name__, type(command).__name__)
        return self._interpret(resp, tuple(mods), message_level=message_level,
                               command=command)

    def _interpret(self, resp: mc.Response, mods: tuple[mc.Modification, ...], *,
                   message_level: bool, command: mc.Command) -> StageResult:
        is_rcpt = isinstance(command, mc.RcptTo)
        if isinstance(resp, mc.Continue):
            return StageResult("continue", None, mods)
        if isinstance(resp, mc.Skip):
            self._skip_body = True
            return StageResult("continue", None, mods)
        if isinstance(resp, mc.Accept):
            if message_level:
                self._msg_done = True
            else:
                self._conn_done = True
            return StageResult("accept", None, mods)
        if isinstance(resp, mc.Discard):
            self._msg_done = True
            return StageResult("discard", None, mods)
        if isinstance(resp, (mc.ShutDown, mc.ConnFail)):
            self._conn_done = True
            return StageResult("shutdown", DEFAULT_REPLIES["shutdown"], mods)
        if isinstance(resp, mc.ReplyCode):
            verdict: VerdictName = "reject" if resp.text.startswith("5") else "tempfail"
            if message_level and not is_rcpt:
                self._msg_done = True
            return StageResult(verdict, resp.text, mods)
        if isinstance(resp, (mc.Reject, mc.TempFail)):
            name: VerdictName = "reject" if isinstance(resp, mc.Reject) else "tempfail"
            if message_level and not is_rcpt:
                self._msg_done = True
            return StageResult(name, DEFAULT_REPLIES[name], mods)
        raise AssertionError("unhandled verdict %r" % resp)  # pragma: no cover

    # ------------------------------------------------------------------ public API

    async def open(self) -> bool:
        """Connect and negotiate. False (and default action from then on) on failure."""
        try:
            if self.spec.kind == "unix":
                fut = asyncio.open_unix_connection(self.spec.path)
            else:
                fut = asyncio.open_connection(self.spec.host, self.spec.port)
            self._reader, self._writer = await asyncio.wait_for(fut, self.connect_timeout)
            await self._send(mc.OptNeg(mc.MILTER_VERSION, mc.SMFIF_ALL, mc.MTA_PROTOCOL_OFFER))
            resp = await self._read_response()
        except asyncio.TimeoutError:
            self._fail("connect/negotiate timed out")
            return False
        except (OSError, ConnectionError, mc.MilterProtocolError) as exc:
            self._fail("cannot connect/negotiate (%s)", type(exc).__name__)
            return False
        if not isinstance(resp, mc.OptNeg) or resp.version < 2:
            self._fail("bad option negotiation reply")
            return False
        # A milter may only switch off steps we offered; ignore anything else.
        lists = {stage: tuple(names.split()) for stage, names in resp.macro_lists}
        self.negotiated = Negotiated(resp.version, resp.actions & mc.SMFIF_ALL,
                                     resp.protocol & mc.MTA_PROTOCOL_OFFER, lists)
        log.debug("%smilter %s negotiated actions=0x%x protocol=0x%x lists=%r", self._prefix,
                  self.spec, self.negotiated.actions, self.negotiated.protocol, lists)
        return True

    @property
    def leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values go out (and come back) unstripped."""
        return bool(self.negotiated and self.negotiated.skips(mc.SMFIP_HDR_LEADSPC))

    def _wants(self, no_flag: int) -> bool:
        return self.negotiated is not None and not self.negotiated.skips(no_flag)

    async def connect(self, hostname: str, family: str, port: int, address: str,
                      macros: Mapping[str, str]) -> StageResult:
        if not self._failed and not self._wants(mc.SMFIP_NOCONNECT):
            return STAGE_CONTINUE
        return await self._stage(mc.Connect(hostname, family, port, address),
                                 stage=mc.SMFIM_CONNECT, macros=macros,
                                 no_reply_flag=mc.SMFIP_NR_CONN, message_level=False)

    async def helo(self, name: str, macros: Mapping[str, str]) -> StageResult:
        if not self._failed and not self._wants(mc.SMFIP_NOHELO):
            return STAGE_CONTINUE
        return await self._stage(mc.Helo(name), stage=mc.SMFIM_HELO, macros=macros,
                                 no_reply_flag=mc.SMFIP_NR_HELO, message_level=False)

    async def mail(self, address: str, args: tuple[str, ...],
                   macros: Mapping[str, str]) -> StageResult:
        self._msg_done = False
        self._skip_body = False
        self.quarantine_reason = None
        if not self._failed and not self._wants(mc.SMFIP_NOMAIL):
            return STAGE_CONTINUE
        return await self._stage(mc.MailFrom("<%s>" % address, args), stage=mc.SMFIM_ENVFROM,
                                 macros=macros, no_reply_flag=mc.SMFIP_NR_MAIL)

    async def rcpt(self, address: str, args: tuple[str, ...],
                   macros: Mapping[str, str]) -> StageResult:
        if not self._failed and not self._wants(mc.SMFIP_NORCPT):
            return STAGE_CONTINUE
        return await self._stage(mc.RcptTo("<%s>" % address, args), stage=mc.SMFIM_ENVRCPT,
                                 macros=macros, no_reply_flag=mc.SMFIP_NR_RCPT)

    async def data(self, macros: Mapping[str, str]) -> StageResult:
        if not self._failed and not self._wants(mc.SMFIP_NODATA):
            return STAGE_CONTINUE
        return await self._stage(mc.Data(), stage=mc.SMFIM_DATA, macros=macros,
                                 no_reply_flag=mc.SMFIP_NR_DATA)

    async def header(self, name: str, value: str) -> StageResult:
        """``value`` is the raw text after the colon (folding kept, CRLF ending stripped)."""
        if not self._failed and not self._wants(mc.SMFIP_NOHDRS):
            return STAGE_CONTINUE
        if not self.leading_space and value.startswith(" "):
            value = value[1:]
        return await self._stage(mc.Header(name, value), stage=None, macros={},
                                 no_reply_flag=mc.SMFIP_NR_HDR)

    async def eoh(self, macros: Mapping[str, str]) -> StageResult:
        if not self._failed and not self._wants(mc.SMFIP_NOEOH):
            return STAGE_CONTINUE
        return await self._stage(mc.EndOfHeaders(), stage=mc.SMFIM_EOH, macros=macros,
                                 no_reply_flag=mc.SMFIP_NR_EOH)

    async def body(self, body: bytes) -> StageResult:
        """Send the body in 64 KiB chunks (stops early on a verdict or SMFIR_SKIP)."""
        if not self._failed and not self._wants(mc.SMFIP_NOBODY):
            return STAGE_CONTINUE
        for start in range(0, len(body), mc.BODY_CHUNK):
            if self._skip_body:
                break
            res = await self._stage(mc.Body(body[start:start + mc.BODY_CHUNK]), stage=None,
                                    macros={}, no_reply_flag=mc.SMFIP_NR_BODY)
            if res.verdict != "continue" or res.failed:
                return res
        return STAGE_CONTINUE

    async def eom(self, macros: Mapping[str, str]) -> StageResult:
        """End of message: the only stage whose reply may carry modifications."""
        return await self._stage(mc.EndOfMessage(), stage=mc.SMFIM_EOM, macros=macros,
                                 no_reply_flag=0, allow_mods=True)

    async def abort(self) -> None:
        """SMFIC_ABORT: the current message is over (RSET, rejection, end of DATA)."""
        self._msg_done = False
        self._skip_body = False
        if self._failed or self._writer is None or self._conn_done:
            return
        try:
            await self._send(mc.Abort())
        except (OSError, asyncio.TimeoutError):
            self._fail("abort failed")

    async def close(self) -> None:
        """SMFIC_QUIT and close the socket."""
        if self._writer is not None:
            try:
                await self._send(mc.Quit())
            except (OSError, asyncio.TimeoutError):
                pass
            writer = self._writer
            self._close_transport()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except (OSError, asyncio.TimeoutError):
                pass
