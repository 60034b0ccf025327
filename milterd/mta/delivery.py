"""Delivery: local Maildir, and relay over SMTP with per-domain TLS policy.

Outbound policy, after Exchange's TLSSendDomainSecureList:

* domain on ``send_domains`` -> STARTTLS is required, the server chain must
  verify against our CAs and a certificate name must cover the domain. Any
  failure defers the message (it stays queued and is *never* sent in clear)
  and is reported as ``on_outbound_result(domain, False, reason)`` with an
  outbound reason of :mod:`milterd.policy.reasons` — the same words milterd
  counts for Postfix: ``starttls_not_offered`` | ``handshake_failed`` |
  ``untrusted_cert`` | ``name_mismatch``, or ``other`` for a failure that is
  not TLS (no route, connection failed, SMTP error; the cause is in
  ``RelayResult.detail``, the log and the queue file). Success reports
  ``(domain, True, "secured")``.
* any other domain -> opportunistic TLS: STARTTLS when offered, certificate
  not checked; a failed handshake falls back to plaintext on a new
  connection. Reported with ``tls`` or ``plaintext``.

smtplib runs in a worker thread: it is the stdlib's well-tested client and
outbound volume in tests/demos is small.
"""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from cryptography import x509

from milterd.policy import reasons

from .config import MtaConfig
from .protocol_log import ProtocolLog, SessionLog
from .queue import MailQueue, QueuedMessage
from .tls import CertFacts, TlsHandshakeFacts, cert_covers_domain, client_context, facts_from_ssl

log = logging.getLogger(__name__)

OutboundCallback = Callable[[str, bool, str], None]


# ---------------------------------------------------------------------- local delivery


def deliver_maildir(root: Path, recipient: str, content: bytes, queue_id: str) -> Path:
    """Maildir delivery: write to tmp/, fsync, link into new/ (atomic for readers)."""
    local, _, domain = recipient.rpartition("@")
    safe_local = "".join(c for c in local.lower() if c.isalnum() or c in "._+-") or "_"
    box = root / domain.lower() / safe_local
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    name = "%d.%s_%d.%s" % (time.time(), queue_id, os.getpid(), socket.gethostname())
    tmp = box / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    final = box / "new" / name
    os.rename(tmp, final)
    dfd = os.open(box / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


# ---------------------------------------------------------------------- outbound SMTP


@dataclass(frozen=True)
class RelayResult:
    ok: bool
    reason: str              # failed: an outbound reason; ok: secured | tls | plaintext
    permanent: bool = False  # a 5xx from the receiver: retrying will not help
    accepted: tuple[str, ...] = ()
    tls: Optional[TlsHandshakeFacts] = None
    detail: str = ""         # the cause of an "other" failure: no_route | connect | smtp_error

    def describe(self) -> str:
        return "%s (%s)" % (self.reason, self.detail) if self.detail else self.reason


class _RetryInPlaintext(Exception):
    """Opportunistic TLS: the handshake failed; deliver again without STARTTLS."""


class _LoggingSMTP(smtplib.SMTP):
    """smtplib with protocol-log hooks; the DATA payload is never logged."""

    def __init__(self, plog: SessionLog, **kw: object) -> None:
        self._plog = plog
        self._in_data = False
        super().__init__(**kw)  # type: ignore[arg-type]

    def send(self, s: bytes | str) -> None:  # noqa: D401 - smtplib API
        if self._in_data:
            # smtplib sends the whole DATA payload in one send() after 354.
            self._in_data = False
            self._plog.info("message content (%d bytes) not logged" % len(s))
        else:
            text = s.decode("ascii", "replace") if isinstance(s, bytes) else s
            for line in text.rstrip("\r\n").split("\r\n"):
                self._plog.sent(line)
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, msg = super().getreply()
        lines = msg.decode("utf-8", "replace").split("\n") or [""]
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            self._plog.received("%d%s%s" % (code, sep, line))
        self._in_data = code == 354
        return code, msg


def send_message(cfg: MtaConfig, cas: Sequence[x509.Certificate], plog_root: ProtocolLog,
                 domain: str, mail_from: str, rcpts: Sequence[str], content: bytes,
                 local_cert: Optional[CertFacts], *, timeout: float = 30.0) -> RelayResult:
    """Deliver to one domain (blocking; run in a thread). Opportunistic TLS: a
    broken handshake is retried once in plaintext on a new connection."""
    try:
        return _session(cfg, cas, plog_root, domain, mail_from, rcpts, content, local_cert,
                        timeout=timeout, plaintext_only=False)
    except _RetryInPlaintext:
        return _session(cfg, cas, plog_root, domain, mail_from, rcpts, content, local_cert,
                        timeout=timeout, plaintext_only=True)


def _session(cfg: MtaConfig, cas: Sequence[x509.Certificate], plog_root: ProtocolLog,
             domain: str, mail_from: str, rcpts: Sequence[str], content: bytes,
             local_cert: Optional[CertFacts], *, timeout: float,
             plaintext_only: bool) -> RelayResult:
    route = cfg.route(domain)
    if route is None:
        return RelayResult(False, reasons.OUTBOUND_OTHER, detail="no_route")
    host, port = route
    secure = cfg.on_send_list(domain)
    plog = plog_root.session("Send", "", "%s:%d" % (host, port))
    plog.connect()
    try:
        smtp = _LoggingSMTP(plog, host=host, port=port, local_hostname=cfg.hostname,
                            timeout=timeout)
    except (OSError, smtplib.SMTPException) as exc:
        plog.disconnect("connect failed: %s" % type(exc).__name__)
        return RelayResult(False, reasons.OUTBOUND_OTHER, detail="connect")
    tls: Optional[TlsHandshakeFacts] = None
    try:
        smtp.ehlo()
        if not plaintext_only and smtp.has_extn("starttls"):
            try:
                smtp.starttls(context=client_context(cfg.tls_cert, cfg.tls_key))
            except (ssl.SSLError, OSError) as exc:
                plog.info("TLS handshake failed (%s)" % type(exc).__name__)
                if secure:
                    return RelayResult(False, reasons.OUTBOUND_HANDSHAKE_FAILED)
                raise _RetryInPlaintext
            assert isinstance(smtp.sock, ssl.SSLSocket)
            tls = facts_from_ssl(smtp.sock, cas, local_cert)
            plog.tls(tls)
            if secure:
                if tls.peer_cert is None or not tls.verified:
                    plog.info("domain secure: untrusted certificate",
                              tls.verify_reason)
                    return RelayResult(False, reasons.OUTBOUND_UNTRUSTED_CERT, tls=tls)
                if not cert_covers_domain(tls.peer_cert, domain):
                    plog.info("domain secure: certificate names %s do not cover %s"
                              % (";".join(tls.peer_cert.dns_names or (tls.peer_cert.subject_cn,)),
                                 domain))
                    return RelayResult(False, reasons.OUTBOUND_NAME_MISMATCH, tls=tls)
            smtp.ehlo()
        elif secure:
            plog.info("domain secure: STARTTLS not offered")
            return RelayResult(False, reasons.OUTBOUND_STARTTLS_NOT_OFFERED)
        plog.info("%s;%d, sending message" % (domain, len(rcpts)))
        refused = smtp.sendmail(mail_from, list(rcpts), content)
        accepted = tuple(r for r in rcpts if r not in refused)
        reason = "secured" if secure else ("tls" if tls else "plaintext")
        return RelayResult(True, reason, accepted=accepted, tls=tls)
    except smtplib.SMTPRecipientsRefused as exc:
        permanent = all(code >= 500 for code, _ in exc.recipients.values())
        return RelayResult(False, reasons.OUTBOUND_OTHER, permanent=permanent, tls=tls,
                              detail="smtp_error")
    except smtplib.SMTPResponseException as exc:
        return RelayResult(False, reasons.OUTBOUND_OTHER, permanent=exc.smtp_code >= 500,
                              tls=tls, detail="smtp_error")
    except (smtplib.SMTPException, OSError) as exc:
        log.info("outbound %s: %s", domain, type(exc).__name__)
        return RelayResult(False, reasons.OUTBOUND_OTHER, tls=tls, detail="smtp_error")
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()
        plog.disconnect()


# ---------------------------------------------------------------------- scheduler


@dataclass
class DeliveryStats:
    """Plain counters (the Prometheus wiring lives elsewhere)."""

    delivered_local: int = 0
    delivered_remote: int = 0
    deferred: int = 0
    failed: int = 0
    secured_sent: dict[str, int] = field(default_factory=dict)
    outbound_failures: dict[tuple[str, str], int] = field(default_factory=dict)


class DeliveryAgent:
    """Delivers queued messages; retries with exponential backoff, bounded."""

    def __init__(self, cfg: MtaConfig, queue: MailQueue, plog: ProtocolLog,
                 cas: Sequence[x509.Certificate], local_cert: Optional[CertFacts],
                 on_outbound_result: Optional[OutboundCallback] = None) -> None:
        self.cfg = cfg
        self.queue = queue
        self.plog = plog
        self.cas = list(cas)
        self.local_cert = local_cert
        self.stats = DeliveryStats()
        self._callback = on_outbound_result
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="delivery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def kick(self) -> None:
        """A new message is queued: look at the queue now."""
        self._wake.set()

    def _report(self, domain: str, ok: bool, reason: str) -> None:
        if ok and reason == "secured":
            self.stats.secured_sent[domain] = self.stats.secured_sent.get(domain, 0) + 1
        elif not ok and self.cfg.on_send_list(domain):
            key = (domain, reason)
            self.stats.outbound_failures[key] = self.stats.outbound_failures.get(key, 0) + 1
        if self._callback is not None:
            try:
                self._callback(domain, ok, reason)
            except Exception:  # a broken observer must not stop delivery
                log.exception("on_outbound_result callback failed")

    def backoff(self, attempts: int) -> float:
        return min(self.cfg.retry_base * (2 ** attempts), self.cfg.retry_max_delay)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the pass: a kick during the pass is not lost
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery pass failed")
            due = await asyncio.to_thread(self.queue.next_due)
            delay = 3600.0 if due is None else max(0.05, due - time.time())
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> None:
        now = time.time()
        for qid in list(self.queue.ids()):
            try:
                meta, content = await asyncio.to_thread(self.queue.load, qid)
            except (OSError, ValueError):
                log.warning("unreadable queue file %s", qid)
                continue
            if meta.next_attempt > now:
                continue
            await self._deliver(meta, content)

    async def _deliver(self, meta: QueuedMessage, content: bytes) -> None:
        remaining: list[str] = []
        errors: list[str] = []
        by_domain: dict[str, list[str]] = {}
        for rcpt in meta.recipients:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        for domain, rcpts in by_domain.items():
            if self.cfg.is_local(domain):
                for rcpt in rcpts:
                    try:
                        await asyncio.to_thread(deliver_maildir, self.cfg.maildir_root, rcpt,
                                                content, meta.queue_id)
                        self.stats.delivered_local += 1
                        log.info("%s: delivered to %s (maildir)", meta.queue_id, rcpt)
                    except OSError as exc:
                        remaining.append(rcpt)
                        errors.append("maildir: %s" % type(exc).__name__)
                continue
            res = await asyncio.to_thread(send_message, self.cfg, self.cas, self.plog, domain,
                                          meta.mail_from, rcpts, content, self.local_cert)
            self._report(domain, res.ok, res.reason)
            if res.ok:
                self.stats.delivered_remote += len(res.accepted)
                log.info("%s: relayed to %s (%s)", meta.queue_id, domain, res.reason)
            elif res.permanent:
                self.stats.failed += len(rcpts)
                log.warning("%s: %s refused permanently (%s)", meta.queue_id, domain,
                            res.describe())
            else:
                remaining.extend(rcpts)
                errors.append("%s: %s" % (domain, res.describe()))
                log.info("%s: deferred for %s (%s)", meta.queue_id, domain, res.describe())
        if not remaining:
            await asyncio.to_thread(self.queue.remove, meta.queue_id)
            return
        self.stats.deferred += 1
        error = "; ".join(errors)
        if meta.attempts + 1 >= self.cfg.max_attempts:
            log.warning("%s: giving up after %d attempts: %s", meta.queue_id,
                        meta.attempts + 1, error)
            await asyncio.to_thread(self.queue.give_up, meta, content, error)
            return
        await asyncio.to_thread(self.queue.update, meta, content, recipients=tuple(remaining),
                                retry_in=self.backoff(meta.attempts), error=error)
