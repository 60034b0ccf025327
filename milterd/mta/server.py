"""The reference MTA's SMTP server: ESMTP + STARTTLS + milter, on aiosmtpd.

Why aiosmtpd: it is the maintained asyncio SMTP server of the aio-libs
project (successor of the stdlib's removed ``smtpd``), implements ESMTP,
STARTTLS (RFC 3207: state reset after the handshake) and size limits, and
exposes handler hooks for every stage (``handle_EHLO``, ``handle_MAIL``,
``handle_RCPT``, ``handle_DATA``, ``handle_STARTTLS`` ...). Writing our own
SMTP parser would be more code to get wrong; the parts we add are what
Postfix/Sendmail add around a milter.

Shape (as in aiosmtpd itself): connection state (:class:`SmtpConnection` —
peer, TLS facts, macros, the milter session, the protocol log) is kept apart
from message state (aiosmtpd's ``Envelope``). Every SMTP stage goes through
the milter; a milter's reply becomes the SMTP reply verbatim; header
changes from end-of-message are applied to the stored message, under our
own Received header. A message is fsynced to the queue before the 250.
Exceptions never reach the client as text: the one error boundary
(:meth:`Handler.handle_exception`) answers ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Optional

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from . import milter_codec as mc
from .config import MtaConfig
from .delivery import DeliveryAgent, OutboundCallback
from .message import HeaderField, apply_header_modifications, render_message, split_message
from .milter_client import STAGE_CONTINUE, MilterClientSession, StageResult
from .protocol_log import ProtocolLog, SessionLog
from .queue import MailQueue, new_queue_id
from .tls import CertFacts, TlsHandshakeFacts, facts_from_ssl, load_ca_certs, local_cert_facts, \
    server_context

log = logging.getLogger(__name__)

IDENT = "ESMTP milterd-mta"


@dataclass
class InboundStats:
    accepted: int = 0
    rejected: int = 0
    tempfailed: int = 0
    discarded: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SmtpConnection:
    """Per-connection state; survives STARTTLS (aiosmtpd's Session does not)."""

    plog: SessionLog
    client_addr: str
    client_port: int
    local_addr: str
    local_port: int
    milter: Optional[MilterClientSession]
    macros: dict[str, str] = field(default_factory=dict)
    connect_task: Optional[asyncio.Task[StageResult]] = None
    connect_result: StageResult = STAGE_CONTINUE
    tls: Optional[TlsHandshakeFacts] = None
    helo: str = ""
    queue_id: str = ""
    message_open: bool = False  # milter has seen MAIL but not EOM
    discard: bool = False       # a milter said DISCARD for the current message

    @property
    def client_name(self) -> str:
        return "[%s]" % self.client_addr  # no DNS on loopback: Sendmail's bracket form


class MtaSMTP(SMTP):
    """aiosmtpd's SMTP with a protocol log and a milter connect stage.

    Only public extension points are used: ``push``, ``smtp_*`` methods and
    the asyncio protocol callbacks.
    """

    def __init__(self, handler: "Handler", **kw: Any) -> None:
        super().__init__(handler, **kw)
        self.mta_handler = handler
        self.conn: Optional[SmtpConnection] = None

    # -- connection lifecycle -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.conn is None
        super().connection_made(transport)
        if first:
            self.conn = self.mta_handler.open_connection(transport)
            self.mta_handler.connection_started(self)

    def connection_lost(self, error: Optional[Exception]) -> None:
        conn = self.conn
        super().connection_lost(error)
        self.mta_handler.connection_ended(self)
        if conn is not None:
            self.mta_handler.close_connection(conn)

    def abort_connection(self) -> None:
        """Shutdown: drop the client (no reply; it will retry later)."""
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: str) -> None:  # type: ignore[override]
        if self.conn is not None:
            for line in str(status).split("\r\n"):
                self.conn.plog.sent(line)
        await super().push(status)

    async def _gate(self, verb: str, arg: Optional[str]) -> bool:
        """Log the command; refuse it when the milter refused the connection."""
        conn = self.conn
        assert conn is not None
        conn.plog.received(verb if arg is None else "%s %s" % (verb, arg))
        if conn.connect_task is not None:
            conn.connect_result = await conn.connect_task
            conn.connect_task = None
        res = conn.connect_result
        if res.refuses and not res.failed and verb != "QUIT":
            await self.push(res.reply or "554 5.7.1 Connection rejected")
            return False
        return True

    # -- commands: log, gate, then aiosmtpd's implementation -------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if await self._gate("HELO", hostname):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._gate("EHLO", hostname):
            await super().smtp_EHLO(hostname)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if await self._gate("STARTTLS", arg):
            await super().smtp_STARTTLS(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: Optional[str]) -> None:
        if await self._gate("MAIL", arg):
            await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: Optional[str]) -> None:
        if await self._gate("RCPT", arg):
            await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if not await self._gate("DATA", arg):
            return
        conn = self.conn
        assert conn is not None and self.envelope is not None
        if self.envelope.rcpt_tos and not arg and conn.milter is not None:
            res = await conn.milter.data(conn.macros)
            conn.discard = conn.discard or res.verdict == "discard"
            if res.refuses:
                await self.mta_handler.end_message(conn)
                self.envelope.mail_from = None
                self.envelope.rcpt_tos.clear()
                self.mta_handler.count(res)
                await self.push(res.reply or "554 5.7.1 Rejected")
                return
        await super().smtp_DATA(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if await self._gate("RSET", arg):
            await super().smtp_RSET(arg)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if await self._gate("NOOP", arg):
            await super().smtp_NOOP(arg)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        if await self._gate("QUIT", arg):
            await super().smtp_QUIT(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        # Logged redacted by the protocol log; we offer no mechanisms.
        if await self._gate("AUTH", arg):
            await self.push("502 5.5.1 AUTH not supported")

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if await self._gate("VRFY", arg):
            await self.push("252 2.0.0 Cannot VRFY user")

    async def smtp_EXPN(self, arg: str) -> None:
        if await self._gate("EXPN", arg):
            await self.push("502 5.5.1 EXPN not implemented")


class Handler:
    """aiosmtpd hooks: each SMTP stage runs through the milter."""

    def __init__(self, mta: "Mta") -> None:
        self.mta = mta
        self.cfg = mta.cfg
        self._bg: set[asyncio.Task[Any]] = set()
        self.live: set[MtaSMTP] = set()
        self._no_live = asyncio.Event()
        self._no_live.set()

    # -- helpers ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def count(self, res: StageResult) -> None:
        stats = self.mta.stats
        if res.verdict == "reject":
            stats.rejected += 1
        elif res.verdict in ("tempfail", "shutdown"):
            stats.tempfailed += 1

    def open_connection(self, transport: asyncio.BaseTransport) -> SmtpConnection:
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        plog = self.mta.plog.session("Receive", "%s:%s" % local[:2], "%s:%s" % peer[:2])
        plog.connect()
        milter = None
        if self.cfg.milter:
            milter = MilterClientSession(
                self.cfg.milter, default_action=self.cfg.milter_default_action,  # type: ignore[arg-type]
                command_timeout=self.cfg.milter_timeout, log_prefix="%s: " % plog.session_id)
        conn = SmtpConnection(plog, str(peer[0]), int(peer[1]), str(local[0]), int(local[1]),
                              milter)
        conn.macros.update({
            "j": self.cfg.hostname, "{daemon_name}": "milterd-mta",
            "{daemon_addr}": conn.local_addr, "{daemon_port}": str(conn.local_port),
            "{client_addr}": conn.client_addr, "{client_port}": str(conn.client_port),
            "{client_name}": conn.client_name, "{client_ptr}": conn.client_name,
            "_": "%s [%s]" % (conn.client_name, conn.client_addr),
        })
        if milter is not None:
            conn.connect_task = asyncio.get_running_loop().create_task(
                self._milter_connect(conn, milter))
        return conn

    async def _milter_connect(self, conn: SmtpConnection,
                              milter: MilterClientSession) -> StageResult:
        if not await milter.open():
            return StageResult("continue", failed=True)  # enforced from MAIL on
        family = "6" if ":" in conn.client_addr else "4"
        res = await milter.connect(conn.client_name, family, conn.client_port, conn.client_addr,
                                   conn.macros)
        if res.refuses and not res.failed:
            self.count(res)
            conn.plog.info("milter refused connection", res.reply or "")
        return res

    def close_connection(self, conn: SmtpConnection) -> None:
        conn.plog.disconnect()
        if conn.connect_task is not None:
            conn.connect_task.cancel()
        if conn.milter is not None:
            self._spawn(self._close_milter(conn))

    def connection_started(self, proto: "MtaSMTP") -> None:
        self.live.add(proto)
        self._no_live.clear()

    def connection_ended(self, proto: "MtaSMTP") -> None:
        self.live.discard(proto)
        if not self.live:
            self._no_live.set()

    async def drain(self, timeout: float = 5.0) -> None:
        """Shutdown: close live sessions and wait for their milter goodbyes
        (connection_lost arrives a few loop iterations after close())."""
        for proto in list(self.live):
            proto.abort_connection()

        async def settle() -> None:
            while self.live or self._bg:
                if self._bg:
                    await asyncio.wait(set(self._bg))
                else:
                    await self._no_live.wait()

        try:
            await asyncio.wait_for(settle(), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d session(s) did not close in time", len(self.live))

    async def _close_milter(self, conn: SmtpConnection) -> None:
        assert conn.milter is not None
        if conn.message_open:
            await conn.milter.abort()
        await conn.milter.close()

    async def end_message(self, conn: SmtpConnection) -> None:
        """The transaction ended before end-of-message: tell the milter."""
        if conn.milter is not None and conn.message_open:
            await conn.milter.abort()
        conn.message_open = False

    @staticmethod
    def _conn(server: SMTP) -> SmtpConnection:
        assert isinstance(server, MtaSMTP) and server.conn is not None
        return server.conn

    async def _helo_stage(self, conn: SmtpConnection, hostname: str) -> Optional[str]:
        conn.helo = hostname
        if conn.milter is None:
            return None
        if conn.message_open:
            await self.end_message(conn)
        res = await conn.milter.helo(hostname, conn.macros)
        if res.refuses and not res.failed:
            self.count(res)
            return res.reply
        return None

    # -- aiosmtpd hooks ----------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        conn = self._conn(server)
        refusal = await self._helo_stage(conn, hostname)
        if refusal:
            return [refusal]
        session.host_name = hostname
        # aiosmtpd would advertise AUTH after STARTTLS; we have no authenticator.
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        out[0] = "250-%s Hello %s [%s]" % (self.cfg.hostname, hostname, conn.client_addr) \
            if len(out) > 1 else "250 %s" % self.cfg.hostname
        return out

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        conn = self._conn(server)
        refusal = await self._helo_stage(conn, hostname)
        if refusal:
            return refusal
        session.host_name = hostname
        return "250 %s" % self.cfg.hostname

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        conn = self._conn(server)
        sslobj = (session.ssl or {}).get("ssl_object")
        if not isinstance(sslobj, (ssl.SSLObject, ssl.SSLSocket)):
            return False
        conn.tls = facts_from_ssl(sslobj, self.mta.cas, self.mta.local_cert)
        conn.macros.update(conn.tls.sendmail_macros())
        conn.plog.tls(conn.tls)
        if self.cfg.require_client_cert and not conn.tls.verified:
            conn.plog.info("client certificate required", conn.tls.verify_reason)
            return False  # aiosmtpd then answers 554 to everything but QUIT
        return True

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        conn = self._conn(server)
        if conn.message_open:
            await self.end_message(conn)
        conn.queue_id = new_queue_id()
        conn.discard = False
        conn.macros["i"] = conn.queue_id
        conn.macros["{mail_addr}"] = address
        conn.plog.info("%s, receiving message" % conn.queue_id)
        if conn.milter is not None:
            conn.message_open = True
            res = await conn.milter.mail(address, tuple(mail_options), conn.macros)
            conn.discard = res.verdict == "discard"
            if res.refuses:
                self.count(res)
                await self.end_message(conn)
                return res.reply or "550 5.7.1 Rejected"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        conn = self._conn(server)
        domain = address.rpartition("@")[2].lower()
        if not domain or not (self.cfg.is_local(domain) or self.cfg.route(domain)):
            return "554 5.7.1 <%s>: Relay access denied" % address
        conn.macros["{rcpt_addr}"] = address
        conn.macros["{rcpt_host}"] = domain
        conn.macros["{rcpt_mailer}"] = "local" if self.cfg.is_local(domain) else "esmtp"
        if conn.milter is not None:
            res = await conn.milter.rcpt(address, tuple(rcpt_options), conn.macros)
            conn.discard = conn.discard or res.verdict == "discard"
            if res.refuses:
                self.count(res)
                return res.reply or "550 5.7.1 Rejected"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.end_message(self._conn(server))
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__, exc_info=error)
        return "451 4.3.0 Error: internal error, try again later"

    def _received(self, conn: SmtpConnection, rcpts: list[str]) -> HeaderField:
        with_ = "ESMTPS" if conn.tls else "ESMTP"
        tls = ""
        if conn.tls:
            tls = "\n\t(version=%s cipher=%s bits=%d verify=%s)" % (
                conn.tls.version, conn.tls.cipher, conn.tls.bits, conn.tls.verify_macro)
        for_ = "\n\tfor <%s>" % rcpts[0] if len(rcpts) == 1 else ""
        peer = ("[%s]" % conn.client_addr if conn.client_name == "[%s]" % conn.client_addr
                else "%s [%s]" % (conn.client_name, conn.client_addr))
        value = " from %s (%s)%s\n\tby %s (milterd-mta) with %s id %s%s;\n\t%s" % (
            conn.helo or "unknown", peer, tls, self.cfg.hostname,
            with_, conn.queue_id, for_, email.utils.formatdate(localtime=False))
        return HeaderField("Received", value, hidden=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        conn = self._conn(server)
        raw = envelope.original_content or b""
        headers, body = split_message(raw)
        mods: tuple[mc.Modification, ...] = ()
        discard = False
        milter = conn.milter
        if milter is not None:
            going = ("continue", "accept")  # accept: the client stops sending by itself
            res = STAGE_CONTINUE
            for h in headers:
                res = await milter.header(h.name, h.value.replace("\r\n", "\n"))
                if res.verdict not in going:
                    break
            if res.verdict in going:
                res = await milter.eoh(conn.macros)
            if res.verdict in going:
                res = await milter.body(body)
            if res.verdict in going:
                res = await milter.eom(conn.macros)
                mods = res.modifications
            elif conn.message_open:
                await milter.abort()  # ended before end-of-message
            conn.message_open = False
            if res.refuses:
                self.count(res)
                return res.reply or "554 5.7.1 Rejected"
            discard = res.verdict == "discard"
        if discard or conn.discard:
            self.mta.stats.discarded += 1
            conn.plog.info("%s discarded by milter" % conn.queue_id)
            return "250 2.0.0 Ok: queued as %s" % conn.queue_id
        mail_from = envelope.mail_from or ""
        rcpts = list(envelope.rcpt_tos)
        all_headers = [self._received(conn, rcpts), *headers]
        if mods:
            leadspc = milter.leading_space if milter else False
            all_headers = apply_header_modifications(all_headers, mods, leading_space=leadspc)
            replaced = b"".join(m.chunk for m in mods if isinstance(m, mc.ReplaceBody))
            if any(isinstance(m, mc.ReplaceBody) for m in mods):
                body = replaced.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            for m in mods:
                if isinstance(m, mc.ChangeFrom):
                    mail_from = m.address.strip("<>")
                elif isinstance(m, (mc.AddRcpt, mc.AddRcptPar)):
                    rcpts.append(m.address.strip("<>"))
                elif isinstance(m, mc.DelRcpt):
                    addr = m.address.strip("<>").lower()
                    rcpts = [r for r in rcpts if r.lower() != addr]
                elif isinstance(m, mc.Quarantine):
                    self.mta.stats.quarantined.append((conn.queue_id, m.reason))
                    conn.plog.info("%s quarantine requested: %s" % (conn.queue_id, m.reason))
        content = render_message(all_headers, body)
        if not rcpts:
            self.mta.stats.discarded += 1
            return "250 2.0.0 Ok: queued as %s" % conn.queue_id
        await asyncio.to_thread(self.mta.queue.enqueue, conn.queue_id, mail_from, tuple(rcpts),
                                content)
        self.mta.stats.accepted += 1
        self.mta.delivery.kick()
        conn.plog.info("%s queued for %d recipient(s)" % (conn.queue_id, len(rcpts)))
        return "250 2.0.0 Ok: queued as %s" % conn.queue_id


class Mta:
    """The reference MTA: SMTP server + queue + delivery agent in one loop.

    ``await mta.start()`` binds (``cfg.listen_port=0`` picks a free port, see
    :attr:`port`), re-queues what a previous run left and writes
    ``cfg.ready_file``; ``await mta.stop()`` closes everything.
    """

    def __init__(self, cfg: MtaConfig, *, on_outbound_result: Optional[OutboundCallback] = None,
                 protocol_log: Optional[ProtocolLog] = None) -> None:
        self.cfg = cfg
        self.stats = InboundStats()
        self.plog = protocol_log or ProtocolLog(cfg.protocol_log)
        self.cas = load_ca_certs(cfg.ca_files)
        self.local_cert: Optional[CertFacts] = (local_cert_facts(cfg.tls_cert)
                                                if cfg.tls_cert else None)
        self.tls_context: Optional[ssl.SSLContext] = None
        if cfg.tls_cert and cfg.tls_key:
            self.tls_context = server_context(cfg.tls_cert, cfg.tls_key,
                                              request_client_cert=True, ca_files=cfg.ca_files)
        self.queue = MailQueue(cfg.queue_dir)
        self.delivery = DeliveryAgent(cfg, self.queue, self.plog, self.cas, self.local_cert,
                                      on_outbound_result)
        self.handler = Handler(self)
        self._server: Optional[asyncio.base_events.Server] = None
        self.port = 0

    def _protocol(self) -> MtaSMTP:
        return MtaSMTP(self.handler, hostname=self.cfg.hostname, ident=IDENT,
                       tls_context=self.tls_context, data_size_limit=self.cfg.data_size_limit,
                       enable_SMTPUTF8=False, decode_data=False,
                       loop=asyncio.get_running_loop())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.cfg.listen_host,
                                                self.cfg.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.delivery.start()
        log.info("listening on %s:%d (queued: %d)", self.cfg.listen_host, self.port,
                 len(self.queue))
        if self.cfg.ready_file is not None:
            tmp = self.cfg.ready_file.with_suffix(".tmp")
            tmp.write_text("%d\n" % self.port)
            os.replace(tmp, self.cfg.ready_file)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self.handler.drain()
            await self._server.wait_closed()
            self._server = None
        await self.delivery.stop()
        self.plog.close()
